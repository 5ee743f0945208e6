"""Leak-scan cost against de-identification time on the `make bench` tree (issue 7: <= 20 %).

Both on one core in this process: the library de-identifies every subject (``deidentify_unit``,
which also collects the identifiers), then ``leakscan.scan_unit`` searches each subject's release
files for them.  Run alone (``python benchmarks/verify.py TREE``) or from ``benchmarks/run.py``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from deidflow import inventory
from deidflow.pseudonym import Pseudonymizer
from deidflow.qc import leakscan
from deidflow.release import deidentify_unit

KEY = "benchmark-key-0123456789abcdef"
SETTINGS = {"options": [], "private": "remove", "overrides": [], "pseudonym_length": 8,
            "date_offset_days": [-365, -1], "mapping_csv": "", "key_file": ""}


def bench_verify(tree: Path, scratch: Path) -> dict:
    """Seconds to de-identify the tree and to leak-scan the result (one core each), and the
    scan with pixel data searched too."""
    os.environ["DEIDFLOW_KEY"] = KEY
    restricted, release = scratch / "verify_restricted", scratch / "verify_release"
    restricted.mkdir(mode=0o700, exist_ok=True)
    inv = inventory.build(tree, Pseudonymizer(KEY.encode()))
    inventory.write(inv, restricted)
    manifests = [restricted / "manifests" / f"{s}.json" for s in inv.subjects]
    t = time.perf_counter()
    for mf in manifests:
        w = restricted / "w" / mf.stem
        deidentify_unit(mf, release / "sourcedata" / "dicom", restricted, w / "done.json", w / "u.csv", w / "q.jsonl",
                        SETTINGS)
    deid = time.perf_counter() - t
    for f in release.rglob("*.dcm"):  # same page-cache state for both scans
        f.read_bytes()
    t = time.perf_counter()
    hits = sum(len(s["hits"]) for mf in manifests
               for s in leakscan.scan_unit(release, restricted, mf)["subjects"].values())
    scan = time.perf_counter() - t
    t = time.perf_counter()
    for mf in manifests:
        leakscan.scan_unit(release, restricted, mf, pixel_data=True)
    full = time.perf_counter() - t
    return {"files": len(inv.rows), "deidentify_s": deid, "scan_s": scan, "scan_pixel_data_s": full, "hits": hits}


def table_rows(r: dict) -> list[tuple]:
    return [("measure", "seconds", "share of de-identification"),
            ("de-identify (library, one core)", f"{r['deidentify_s']:.2f}", ""),
            ("leak scan, default (headers, names, text)", f"{r['scan_s']:.2f}",
             f"{r['scan_s'] / r['deidentify_s']:.0%} (target <= 20%)"),
            ("leak scan with --pixel-data", f"{r['scan_pixel_data_s']:.2f}",
             f"{r['scan_pixel_data_s'] / r['deidentify_s']:.0%}"),
            ("hits (must be 0)", str(r["hits"]), "")]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import table  # noqa: E402
    with tempfile.TemporaryDirectory() as d:
        res = bench_verify(Path(sys.argv[1]), Path(d))
    table(f"6. Leak scan vs de-identification ({res['files']} files)", table_rows(res))
