"""The dataset-level leak scan and the QC report's self-check against the number of subjects
(issue 21): one combined matcher over every subject's values, one pass over each text.

A synthetic restricted folder holds N one-subject job units (the worst case: one manifest per
subject) with the identifier files the dicom stage writes (name, ID, birth and study dates,
accession number, institution, three UIDs); the text checked is a report-sized table with one line
per subject.  ``python benchmarks/leakscan_scale.py 1000 5000`` prints the table.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from deidflow.qc import identifiers, leakscan  # noqa: E402
from tables import table  # noqa: E402


def synthetic_restricted(root: Path, n: int) -> tuple[Path, str]:
    """``n`` one-subject units with identifiers; the report-like text (one line per subject)."""
    (root / "manifests").mkdir(parents=True)
    lines = []
    for i in range(n):
        s, unit = f"sub-{i:06d}", f"u{i:06d}"
        (root / "manifests" / f"{unit}.json").write_text(json.dumps(
            {"unit": unit, "subjects": [{"subject": s, "files": [{"relpath": f"P{i:07d}/IM_0001.dcm"}]}]}))
        y, m, d = 1930 + i % 70, 1 + i % 12, 1 + i % 28
        values = [["name", "PatientName", f"SURNAME{i}^GIVEN{i % 97}"], ["id", "PatientID", f"P{i:07d}"],
                  ["date", "PatientBirthDate", f"{y}{m:02d}{d:02d}"], ["date", "StudyDate", f"2021{m:02d}{d:02d}"],
                  ["id", "AccessionNumber", f"ACC{i:08d}"], ["id", "InstitutionName", f"Hospital {i % 50}"],
                  *[["uid", k, f"1.2.826.0.1.3680043.9.{i}.{j}"] for j, k in
                    enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))]]
        identifiers.write(root, unit, "dicom", s, values)
        # the words of a report row include the anchors many subjects' values share (surname, hospital)
        lines.append(f"<tr><td>{s}</td><td>1 file</td><td>clean</td><td>surname and hospital removed</td>"
                     "<td>CT</td></tr>")
    return root, "\n".join(lines)


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        restricted, text = synthetic_restricted(Path(tmp) / "restricted", n)
        t = time.perf_counter()
        matcher = leakscan.dataset_matcher(restricted)
        build = time.perf_counter() - t
        t = time.perf_counter()
        found = leakscan.text_hits([matcher], {"page": text, "table": text})
        check = time.perf_counter() - t
        assert found == {"page": 0, "table": 0}, found
        t = time.perf_counter()
        leaky = text + f"\n<td>SURNAME{n // 2}</td>"
        assert leakscan.text_hits([matcher], {"page": leaky})["page"] == 1
        return {"subjects": n, "forms": len(matcher), "build_s": build, "self_check_s": check,
                "leak_found_s": time.perf_counter() - t}


def table_rows(results: list[dict]) -> list[tuple]:
    rows = [("subjects", "searched forms", "matcher build s", "report self-check s", "per subject ms")]
    for r in results:
        rows.append((f"{r['subjects']:,}", f"{r['forms']:,}", f"{r['build_s']:.2f}", f"{r['self_check_s']:.2f}",
                     f"{1000 * r['self_check_s'] / r['subjects']:.2f}"))
    return rows


def main(sizes: list[int]) -> None:
    results = [measure(n) for n in sizes]
    table("Report self-check / dataset leak scan vs subjects (one combined matcher)", table_rows(results))
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"growth {b['subjects'] / a['subjects']:.0f}x subjects -> "
              f"{b['self_check_s'] / a['self_check_s']:.1f}x self-check time (linear: "
              f"{b['subjects'] / a['subjects']:.0f}x)")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 5000])
