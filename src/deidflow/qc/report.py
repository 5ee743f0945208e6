"""The QC report: one self-contained HTML file a privacy officer can read and sign off.

``derivatives/deidflow/qc/report.html`` in the release: dataset summary (subjects, studies,
series, files in and out per format, quarantined files by keyed source ID with their reasons),
settings, versions, key fingerprint, per-subject actions by attribute, QC renderings the stages left
in ``derivatives/deidflow/qc/<subject>/<stage>/index.json`` and the leak-scan result; a
filterable subject table and inline SVG charts.  Images are inline data URIs, there is no external
resource (a Content-Security-Policy forbids any), and it opens offline.

It lives in the release, so it holds no identifying value: original paths are never shown,
quarantine reasons are checked value by value, renderings whose kind contains ``before`` (the
original face, burned-in text) go only into the restricted copy ``restricted/qc/report-full.html``,
and the finished page is searched for every subject's original values before it is written.
The ``verify_dataset`` job writes it into ``restricted/staging/qc`` with the one matcher it also
scans the dataset-level files with; ``publish_dataset`` copies it into the release.
The public page is deterministic (same key and input, same bytes); the run time is in the
restricted copy only.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import string
import time
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from .. import inventory
from ..errors import PublicError
from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, display_path, make_restricted_dir
from ..publish import QC_SUBDIR, current_subjects, dataset_files_withheld, late_leaks
from . import attributes, audit, evidence, leakscan
from .identifiers import Matcher

ACTION_NAMES = {"X": "removed", "Z": "emptied", "D": "dummy value", "U": "keyed UID", "C": "cleaned/shifted",
                "P": "pseudonym", "R": "replaced", "K": "kept"}
ACTION_COLORS = {"X": "#b3261e", "Z": "#e8a33d", "D": "#7b5ea7", "U": "#2a7ab0", "C": "#3d9a5b", "P": "#1f3a5f",
                 "R": "#8f6b3a", "K": "#9aa5b1"}
VERSION_PACKAGES = ("pydicom", "numpy", "nibabel", "pyarrow", "snakemake", "dcm2niix", "antspyx", "onnxruntime")
FORMAT_NAMES = {"dicom": "DICOM", "nifti1": "NIfTI", "nifti2": "NIfTI", "analyze": "Analyze/NIfTI pair",
                "img": "Analyze/NIfTI pair", "json": "JSON", "mgh": "MGH", "minc1": "MINC", "minc2": "MINC",
                "parrec": "PAR/REC", "rec": "PAR/REC", "twix": "twix", "tiff": "TIFF"}
_DATA_URI = re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+")
_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def e(text) -> str:
    return html.escape(str(text), quote=True)


def _tsv_unescape(field: str) -> str:
    return re.sub(r"\\[\\tnr]", lambda m: _UNESCAPE[m.group()], field)


# ------------------------------------------------------------------------------------------------
# Gathering (restricted inputs -> public facts)
# ------------------------------------------------------------------------------------------------
def _inventory_rows(restricted: Path) -> list[dict]:
    if not (Path(restricted) / "inventory.parquet").exists():
        return []
    cols = ["relpath", "format", "status", "reason", "modality", "sop_class", "subject", "session", "series_label",
            "src_id"]
    table = inventory.read(restricted)
    cols = [c for c in cols if c in table.schema.names]
    return table.select(cols).to_pylist()


def _quarantine(restricted: Path, rows: list[dict]) -> list[dict]:
    """Quarantined files by keyed source ID, subject (when known), format and reason."""
    by_path = {display_path(r["relpath"]): r for r in rows}
    out = []
    q = Path(restricted) / "quarantine.tsv"
    lines = q.read_text(encoding="utf-8", errors="replace").splitlines()[1:] if q.exists() else []
    for line in lines:
        if not line:
            continue
        f, _, reason = line.partition("\t")
        f, reason = _tsv_unescape(f), _tsv_unescape(reason)
        r = by_path.get(f, {})
        out.append({"src_id": r.get("src_id") or "(not in inventory)", "subject": r.get("subject") or "",
                    "format": r.get("format") or "", "reason": reason, "_path": f})
    return sorted(out, key=lambda x: (x["src_id"], x["reason"]))


def _release_formats(release: Path, staged: Path | None = None, subjects: Iterable[str] | None = None,
                     restricted: Path | None = None, withhold_staged: bool = False) -> tuple[Counter, dict[str, Counter]]:
    """Files per format, overall and per subject (QC products excluded), of the release as
    ``publish_dataset`` will leave it: the published subjects (only ``subjects``, when given: a
    withdrawn subject's folders are about to go), the dataset-level files staged in ``staged`` or
    already published — none of the staged ones when ``withhold_staged`` (a leak-scan hit keeps
    them out, and their earlier copies leave) — nothing set aside as foreign.  One walk (os.walk:
    no Path object per file)."""
    from ..publish import foreign_entries
    total: Counter = Counter()
    per: dict[str, Counter] = defaultdict(Counter)
    current = None if subjects is None else set(subjects)
    dataset: set[str] = set()
    foreign = {str(p) for p in foreign_entries(release, restricted)}  # publish_dataset sets them aside
    if withhold_staged and staged and Path(staged).is_dir():
        foreign |= {os.path.join(str(release), str(p.relative_to(staged))) for p in Path(staged).rglob("*")
                    if p.is_file()}
    roots = ((str(release), True), *(((str(staged), False),) if staged and not withhold_staged else ()))
    for root, is_release in roots:
        qc = os.path.join(root, QC_SUBDIR)
        for folder, dirs, files in os.walk(root):
            if is_release:
                dirs[:] = [d for d in dirs if os.path.join(folder, d) not in foreign]
            if folder == qc:
                dirs[:] = []
                continue
            rel = folder[len(root) + 1:]
            parts = rel.split(os.sep) if rel else []
            folder_sub = next((part for part in parts if _SUBJECT_DIR.match(part)), None)
            if current is not None and folder_sub is not None and folder_sub not in current:
                dirs[:] = []
                continue
            for name in files:
                if ((is_release and os.path.join(folder, name) in foreign)
                        or (not parts and name == evidence.INCOMPLETE_MARKER)):
                    continue  # foreign, or the run's own marker
                sub = folder_sub
                if sub is None:
                    m = _SUBJECT_FILE.match(name)
                    sub = m.group(1) if m else None
                if sub is None:
                    dataset.add(os.path.join(rel, name))  # staged or published, counted once
                elif current is None or sub in current:
                    fmt = _format_of(name)
                    total[fmt] += 1
                    per[sub][fmt] += 1
    for path in dataset:
        total[_format_of(path)] += 1
    return total, per


_SUBJECT_DIR = re.compile(r"^sub-[A-Za-z0-9]+$")
_SUBJECT_FILE = re.compile(r"^(sub-[A-Za-z0-9]+)_")


def _format_of(name: str) -> str:
    low = name.lower()
    for ext, fmt in ((".dcm", "DICOM"), (".nii.gz", "NIfTI"), (".nii", "NIfTI"), (".json", "JSON"),
                     (".tsv", "TSV"), (".hdr", "Analyze/NIfTI pair"), (".img", "Analyze/NIfTI pair"),
                     (".mnc", "MINC"), (".mgz", "MGH"), (".mgh", "MGH"), (".par", "PAR/REC"), (".rec", "PAR/REC"),
                     (".dat", "twix"), (".bval", "BIDS bval/bvec"), (".bvec", "BIDS bval/bvec"), (".png", "PNG"),
                     (".tif", "TIFF"), (".tiff", "TIFF"), (".svs", "TIFF")):
        if low.endswith(ext):
            return fmt
    return "other"


def _verify_results(restricted: Path) -> tuple[dict, dict | None]:
    subjects: dict[str, dict] = {}
    excluded: Counter = Counter()
    searched = 0
    pixel = False
    for f in sorted((Path(restricted) / "done" / "verify").glob("*.json")):
        r = json.loads(f.read_text())
        subjects.update(r["subjects"])
        excluded.update(r.get("excluded_forms", {}))
        searched += r.get("searched_forms", 0)
        pixel = pixel or r.get("pixel_data_scanned", False)
    ds_file = Path(restricted) / "done" / "verify_dataset.json"
    dataset = json.loads(ds_file.read_text()) if ds_file.exists() else None
    return {"subjects": subjects, "excluded": dict(sorted(excluded.items())), "searched": searched,
            "pixel_data": pixel}, dataset


def is_before(kind: str, file: str = "") -> bool:
    """True for a rendering of data before de-identification (original face, burned-in text):
    its kind or its file name ends in ``before``.  The pixel stage's public *after* pictures have
    the kind ``pixels_before_after`` (the pair's name): not a before-image."""
    stem = re.sub(r"\.png$", "", str(file).lower())
    return str(kind).lower().endswith("before") or stem.endswith(("_before", "-before"))


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; (0, 0) when it is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return 0, 0
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _qc_images(release: Path, restricted: Path, subject: str, *, restricted_copy: bool) -> list[dict]:
    """The renderings stages left for ``subject`` (index.json per stage), as data URIs; the
    restricted copy also shows those the stages kept in ``restricted/qc`` (original faces,
    burned-in text before redaction)."""
    out = []
    seen = set()
    bases = [Path(release) / QC_SUBDIR / subject]
    if restricted_copy:
        bases.append(Path(restricted) / "qc" / subject)
    for index in sorted(i for base in bases for i in base.glob("*/index.json")):
        try:
            items = json.loads(index.read_text(encoding="utf-8"))
        except ValueError:
            continue
        for it in items if isinstance(items, list) else ():
            if not isinstance(it, dict):
                continue
            kind, file = str(it.get("kind", "")), str(it.get("file", ""))
            if is_before(kind, file) and not restricted_copy:
                continue
            png = index.parent / file
            if png.suffix.lower() != ".png" or not png.is_file() or index.parent not in png.resolve().parents:
                continue
            key = (index.parent.name, file)
            if key in seen:
                continue
            seen.add(key)
            data = png.read_bytes()
            w, h = _png_size(data)
            out.append({"stage": index.parent.name, "kind": kind, "caption": str(it.get("caption", "")),
                        "file": file, "after": str(it.get("after", "")), "before": is_before(kind, file),
                        "width": w, "height": h,
                        "uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii")})
    return out


def _images_of(release: Path, restricted: Path, subjects: Iterable[str], *, restricted_copy: bool) -> dict[str, list[dict]]:
    """:func:`_qc_images` of each subject; the QC folders are listed once (most subjects of a large
    dataset have no rendering)."""
    bases = [Path(release) / QC_SUBDIR] + ([Path(restricted) / "qc"] if restricted_copy else [])
    having = set()
    for base in bases:
        try:
            having |= {e.name for e in os.scandir(base) if e.is_dir()}
        except (FileNotFoundError, NotADirectoryError):
            pass
    return {s: _qc_images(release, restricted, s, restricted_copy=restricted_copy) if s in having else []
            for s in subjects}


def _before_images_in_release(release: Path, subjects: Iterable[str] | None = None) -> int:
    n = 0
    current = None if subjects is None else set(subjects)
    for index in sorted((Path(release) / QC_SUBDIR).glob("sub-*/*/index.json")):
        if current is not None and index.parent.parent.name not in current:
            continue
        try:
            n += sum(1 for it in json.loads(index.read_text())
                     if is_before(str(it.get("kind", "")), str(it.get("file", ""))))
        except (ValueError, AttributeError):
            continue
    return n


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata
    from .. import __version__
    out = {"deidflow": __version__, "python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------------------
# Charts (inline SVG)
# ------------------------------------------------------------------------------------------------
def bar_chart(items: list[tuple[str, Mapping[str, int]]], title: str, colors: Mapping[str, str] | None = None,
              width: int = 560) -> str:
    """A horizontal (stacked) bar chart as an SVG string: ``items`` = [(label, {segment: count})]."""
    colors = colors or {}
    row, label_w, top = 20, 230, 26
    total_max = max([sum(v.values()) for _, v in items] or [1]) or 1
    segs = sorted({k for _, v in items for k in v})
    height = top + row * len(items) + 28
    bar_w = width - label_w - 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{e(title)}" font-family="sans-serif" font-size="11">',
           f'<text x="0" y="14" font-size="13" font-weight="bold">{e(title)}</text>']
    for i, (label, values) in enumerate(items):
        y = top + i * row
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{e(label[:40])}</text>')
        x = float(label_w)
        for s in segs:
            v = values.get(s, 0)
            if not v:
                continue
            w = max(1.0, bar_w * v / total_max)
            out.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" '
                       f'fill="{colors.get(s, "#2a7ab0")}"><title>{e(label)}: {e(s)} {v}</title></rect>')
            x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + 13}">{sum(values.values())}</text>')
    if len(segs) > 1 or colors:
        x = 0
        y = top + row * len(items) + 14
        for s in segs:
            out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colors.get(s, "#2a7ab0")}"/>'
                       f'<text x="{x + 14}" y="{y}">{e(s)} {e(ACTION_NAMES.get(s, ""))}</text>')
            x += 130
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _table(headers: Iterable[str], rows: Iterable[Iterable], *, numeric: Iterable[int] = (), attrs: str = "",
           row_attrs: Iterable[str] | None = None) -> str:
    numeric = set(numeric)
    head = "".join(f'<th class="n">{e(h)}</th>' if i in numeric else f"<th>{e(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    row_attrs = list(row_attrs) if row_attrs is not None else None
    for j, r in enumerate(rows):
        cells = "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        extra = f" {row_attrs[j]}" if row_attrs else ""
        body.append(f"<tr{extra}>{cells}</tr>")
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status(s: str) -> str:
    return {"clean": '<span class="ok">clean</span>', "leak": '<span class="bad">LEAK</span>'}.get(
        s, '<span class="warn">not scanned</span>')


DETAIL_LIMIT = 200  # subjects with a detail section of their own each (beyond: only those with findings)
PICTURE_LIMIT = 300  # face and pixel pictures shown inline (all are in derivatives/deidflow/qc)
CREATOR_WITHHELD = "(creator withheld: it holds an identifying value)"
REASON_WITHHELD = "(reason withheld: it contains an identifying value; see the restricted quarantine.tsv)"
SETTING_WITHHELD = "(value withheld: it contains an identifying value; see the restricted run-config.yaml)"
BIG = 512  # face pictures are shown at least this wide (whole-number scaling, pixels kept sharp)


def build(release: Path, restricted: Path, staged: Path | None = None, dataset_verify: Mapping | None = None,
          on_leak: str = "withhold") -> dict:
    """Everything the public report shows, gathered from the restricted folder, the release and
    the staged dataset-level files ``staged`` (``write_report`` adds the before-images for the
    restricted copy).  ``dataset_verify`` is the scan of those files, when it was just made;
    ``on_leak`` (``verify.on_leak``) says whether ``publish_dataset`` will publish them after a hit."""
    release, restricted = Path(release), Path(restricted)
    rows = _inventory_rows(restricted)
    run = json.loads((restricted / "run.json").read_text()) if (restricted / "run.json").exists() else {}
    ok = [r for r in rows if r.get("status") == "ok"]
    subjects = sorted({r["subject"] for r in ok if r.get("subject")})
    verify, dataset = _verify_results(restricted)
    dataset = dict(dataset_verify) if dataset_verify is not None else dataset
    subjects = sorted(set(subjects) | set(verify["subjects"]))
    current = current_subjects(restricted)
    if current is not None:  # a withdrawn subject's records stay in the restricted folder, not in the report
        subjects = [s for s in subjects if s in current]
    facts_audit = audit.scan(restricted, current)
    counts, audited = facts_audit.counts, facts_audit.files
    withhold_staged = dataset_files_withheld(dataset or {}, on_leak)
    late_hits = (dataset or {}).get("late") or {}  # published subjects holding a later subject's values
    late = late_leaks(dataset or {}, on_leak)[0]  # publish_dataset takes them out of the release
    in_release = current - set(late) if current is not None else None
    out_total, out_per = _release_formats(release, staged, in_release, restricted, withhold_staged)
    quarantine = _quarantine(restricted, rows)
    record = evidence.run_record(restricted, run)
    q_by_subject = Counter(q["subject"] for q in quarantine)
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        if r.get("subject"):
            by_subject[r["subject"]].append(r)
    images = _images_of(release, restricted, subjects, restricted_copy=False)
    per = {}
    for s in subjects:
        mine = by_subject.get(s, [])
        per[s] = {
            "sessions": len({r["session"] for r in mine if r.get("session")}),
            "series": len({(r.get("session"), r.get("series_label")) for r in mine if r.get("series_label")}),
            "files_in": len(mine),
            "released": sum(out_per.get(s, Counter()).values()),
            "formats": dict(sorted(out_per.get(s, Counter()).items())),
            "quarantined": q_by_subject.get(s, 0),
            "audited_files": audited.get(s, 0),
            "actions": counts.get(s, Counter()),
            "images": images[s],
            "verify": _with_late(verify["subjects"].get(s), late_hits.get(s)),
        }
    input_dir = Path(record["paths"]["input"]) if record["paths"].get("input") else None
    dicom_roots = [release / "sourcedata" / "dicom", restricted / "work" / "dicom"]
    src_paths = {r["src_id"]: r["relpath"] for r in rows if r.get("src_id")}
    kind_of = {r["src_id"]: (r.get("sop_class"), r.get("modality")) for r in rows if r.get("src_id")}
    attrs = attributes.attribute_table(facts_audit, dicom_roots, input_dir, src_paths, kind_of)
    pairs, kinds = [], set()  # dciodvfy: one series per kind of object (SOP class and modality)
    for _, (name, source, _) in sorted(facts_audit.series.items()):
        kind = kind_of.get(source)
        if kind is None or kind in kinds or not name.lower().endswith(".dcm") or input_dir is None:
            continue
        out = next((root / name for root in dicom_roots if (root / name).is_file()), None)
        if out is not None and src_paths.get(source):
            kinds.add(kind)
            pairs.append((input_dir / src_paths[source], out))
    return {
        "run": run, "record": record, "subjects": subjects, "per": per, "quarantine": quarantine, "verify": verify,
        "dataset_verify": dataset,
        "formats_in": dict(sorted(Counter(FORMAT_NAMES.get(r.get("format") or "", "other") for r in rows).items())),
        "formats_out": dict(sorted(out_total.items())), "files_in": len(rows),
        **_accounting(rows, quarantine, facts_audit.sources),
        "modalities": dict(sorted(Counter((r.get("modality") or "other") for r in ok).items())),
        "studies": len({r["session"] for r in ok if r.get("session")}),
        "series": len({(r.get("session"), r.get("series_label")) for r in ok if r.get("series_label")}),
        "before_in_release": _before_images_in_release(release, current), "versions": _versions(),
        "attributes": attrs, "faces": _current(evidence.face_decisions(restricted), current),
        "pixels": _current(evidence.pixel_series(facts_audit.pixels, restricted), current),
        "pixel_mode": str(((run.get("settings") or {}).get("pixels") or {}).get("clean", "")),
        "gate": evidence.gate(release, restricted), "dciodvfy": evidence.dciodvfy(pairs),
        "bids_validator": evidence.bids_validator(release, None if withhold_staged else staged, restricted, in_release,
                                                  withheld=staged if withhold_staged else None),
        "restricted_copy": False,
    }


def _with_late(result: dict | None, late: list[dict] | None) -> dict | None:
    """A subject's leak-scan result with the hits the dataset gate found in its published files
    (the values of a subject added since its unit's scan): a leak, shown as its own scan's are."""
    if not late or result is None:
        return result
    return {**result, "status": "leak", "hits": sorted([*result.get("hits", ()), *late],
                                                       key=lambda h: (h["file"], h["location"]))}


def _current(rows: list[dict] | None, current: set[str] | None) -> list[dict] | None:
    """The rows of the current input's subjects (``current``; all when it is not known)."""
    return rows if rows is None or current is None else [r for r in rows if not r["subject"] or r["subject"] in current]


def _accounting(rows: list[dict], quarantine: list[dict], sources: set[str]) -> dict[str, int]:
    """Input files with a released file recorded in the audit (by source ID), quarantined (by
    path) and neither."""
    held = {q["_path"] for q in quarantine}
    released = quarantined = 0
    for r in rows:
        if display_path(r["relpath"]) in held:
            quarantined += 1
        elif r.get("src_id") in sources:
            released += 1
    return {"files_released_in": released, "files_quarantined_in": quarantined,
            "files_unaccounted": len(rows) - released - quarantined}


# ------------------------------------------------------------------------------------------------
# Sign-off
# ------------------------------------------------------------------------------------------------
def checks(facts: Mapping) -> list[tuple[str, str, str, str]]:
    """(check, PASS/WARN/FAIL, what was found, anchor of the evidence) for the sign-off panel."""
    out = []
    n_in, n_ok = facts.get("files_in", 0), facts.get("files_released_in", 0)
    n_q, missing = facts.get("files_quarantined_in", 0), facts.get("files_unaccounted", 0)
    gate = facts.get("gate") or {}
    withheld = gate.get("withheld")
    text = f"{n_in} input file(s): {n_ok} released (audited), {n_q} quarantined with a reason"
    if withheld:
        text += f"; {len(withheld)} subject(s) withheld by the release gate"
    if missing:
        text += f"; {missing} neither released nor quarantined"
    out.append(("Every input file released or quarantined", "FAIL" if missing else "WARN" if n_q else "PASS",
                text, "quarantine"))
    per, subjects = facts.get("per", {}), facts.get("subjects", [])
    ds = facts.get("dataset_verify")
    leaky = [s for s in subjects if (per[s]["verify"] or {}).get("status") == "leak"]
    unscanned = [s for s in subjects if not per[s]["verify"]]
    held = set(withheld or ())
    released_leaks = [s for s in leaky if s not in held]
    if released_leaks or (ds and ds.get("hits")):
        out.append(("Leak scan: metadata", "FAIL", f"original identifying values found in {len(released_leaks)} "
                    "released subject(s)" + (" and the dataset-level files (kept in staging, out of the release, "
                                             "unless verify.on_leak is publish)" if ds and ds.get("hits") else ""),
                    "leak-scan"))
    elif leaky:
        out.append(("Leak scan: metadata", "WARN", f"original identifying values found in {len(leaky)} subject(s), "
                    "every one withheld by the release gate (not in the release)", "leak-scan"))
    elif unscanned or ds is None:
        out.append(("Leak scan: metadata", "WARN", f"not complete: {len(unscanned)} subject(s) not scanned"
                    + ("; dataset-level files not scanned" if ds is None else ""), "leak-scan"))
    else:
        out.append(("Leak scan: metadata", "PASS", f"{len(subjects)} subject(s) and the dataset-level files: "
                    "no original identifying value", "leak-scan"))
    v = facts.get("verify") or {}
    if v.get("pixel_data"):
        out.append(("Leak scan: pixel data", "FAIL" if leaky else "PASS",
                    "image samples byte-searched for the original values", "leak-scan"))
    else:
        out.append(("Leak scan: pixel data", "WARN", "image samples were not byte-searched (deidflow verify "
                    "--pixel-data does); burned-in text is screened by the pixel step below", "leak-scan"))
    faces = facts.get("faces")
    if faces is None:
        out.append(("Faces", "WARN", "not available: the face stage did not run (face.method none or no head images)",
                    "faces"))
    else:
        cands = [f for f in faces if f["method"] != "none"]
        done = [f for f in cands if f["decision"] in ("defaced", "skull-stripped")]
        held = [f for f in cands if f["decision"] == "withheld"]
        open_ = len(cands) - len(done) - len(held)
        out.append(("Faces", "FAIL" if open_ else "WARN" if held else "PASS",
                    f"{len(faces)} image(s) considered, {len(cands)} face candidate(s): {len(done)} defaced, "
                    f"{len(held)} withheld" + (f", {open_} without a result" if open_ else ""), "faces"))
    mode = facts.get("pixel_mode", "")
    pix = facts.get("pixels") or []
    screened = len(pix)
    cleaned = sum(1 for s in pix if s["boxes"] or s["files_cleaned"])
    if mode in ("off", "False", "false"):
        out.append(("Burned-in text", "WARN", "the pixel step is off (pixels.clean: off): nothing was screened",
                    "pixels"))
    elif not mode:
        out.append(("Burned-in text", "WARN", "not available: the run record does not say how pixels were screened",
                    "pixels"))
    elif not screened:
        out.append(("Burned-in text", "WARN", f"no series was screened (pixels.clean: {mode}: the selection picked "
                    "no image)", "pixels"))
    else:
        out.append(("Burned-in text", "PASS", f"{screened} series screened or cleaned ({sum(s['files'] for s in pix)} "
                    f"files), {cleaned} with text cleaned ({sum(s['boxes'] for s in pix)} boxes)", "pixels"))
    dv = facts.get("dciodvfy")
    if dv is None:
        out.append(("DICOM conformance", "WARN", "not available: dciodvfy is not installed", "run-record"))
    else:
        out.append(("DICOM conformance", "FAIL" if dv["new_kinds"] else "PASS",
                    f"dciodvfy on {dv['checked']} released file(s) and their originals: "
                    + (f"{len(dv['new_kinds'])} new error kind(s)" if dv["new_kinds"] else "no new error kind"),
                    "run-record"))
    bv = facts.get("bids_validator")
    if bv is None:
        out.append(("BIDS validator", "WARN", "not available: bids-validator is not installed or the release is "
                    "not a BIDS tree", "run-record"))
    else:
        out.append(("BIDS validator", "PASS" if bv["ok"] else "FAIL", bv["summary"], "run-record"))
    leaky_published = gate.get("published_with_leaks")
    if leaky_published:
        out.append(("Release complete", "FAIL", f"{len(leaky_published)} subject(s) published with leak-scan hits "
                    "(verify.on_leak: publish)", "leak-scan"))
    elif withheld:
        out.append(("Release complete", "WARN", f"{len(withheld)} subject(s) withheld by the release gate "
                    "(leak-scan hits): the release is safe to share but incomplete", "quarantine"))
    elif withheld is None:
        out.append(("Release complete", "WARN", "not available: the release gate's record (withheld.json) is "
                    "missing", "quarantine"))
    else:
        out.append(("Release complete", "PASS", "no subject withheld" + (
            f"; {evidence.INCOMPLETE_MARKER} lies at the release root while this run is under way: deidflow removes "
            "it when the run succeeds — share the release only once it is gone" if gate.get("incomplete") else
            f"; no {evidence.INCOMPLETE_MARKER} marker at the release root"), "quarantine"))
    return out


def expected_exit(facts: Mapping) -> tuple[int, str]:
    """The exit status the run ends with, as far as the report can tell (it is written before)."""
    gate = facts.get("gate") or {}
    held = set(gate.get("withheld") or ())
    per = facts.get("per", {})
    leaks = [s for s in facts.get("subjects", []) if (per[s]["verify"] or {}).get("status") == "leak" and s not in held]
    if gate.get("withheld") or gate.get("published_with_leaks") or facts.get("quarantine"):
        return 3, "release incomplete: files or subjects withheld, or leaks published"
    if leaks:
        return 3, "leak-scan hits in the release"
    if (facts.get("dataset_verify") or {}).get("hits"):
        return 3, "leak-scan hits in the dataset-level files: withheld, or published under verify.on_leak publish"
    return 0, "release complete"


def _state(state: str) -> str:
    return f'<span class="state {e(state)}">{e(state)}</span>'


def _picture(im: Mapping, subject: str, *, big: bool = False) -> str:
    """A figure with the picture; ``big`` scales it by a whole number to at least :data:`BIG`
    pixels wide (sharp pixels); a click shows it enlarged."""
    w, h = im.get("width") or 0, im.get("height") or 0
    size = ""
    if big and w and h:
        k = max(1, -(-BIG // w))
        size = f' class="big zoom" width="{w * k}" height="{h * k}"'
    else:
        size = ' class="zoom"'
    label = "before (restricted copy only)" if im.get("before") else "after"
    return (f'<figure><img alt="{e(subject)} {e(im["kind"])}" data-before="{"yes" if im.get("before") else "no"}"'
            f'{size} src="{im["uri"]}"><figcaption><b>{e(label)}</b> \u00b7 {e(im["caption"] or im["kind"])}'
            "</figcaption></figure>")


def _signoff(facts: Mapping) -> str:
    rows = "".join(f'<tr data-check="{e(name)}" data-state="{e(state)}"><td>{_state(state)}</td><td><b>{e(name)}</b>'
                   f'</td><td>{e(text)}</td><td><a href="#{e(anchor)}">evidence</a></td></tr>'
                   for name, state, text, anchor in checks(facts))
    worst = "FAIL" if "FAIL" in rows else "WARN" if "WARN" in rows else "PASS"
    verdict = {"FAIL": "Do not share this release: at least one check failed.",
               "WARN": "Review every WARN line before signing off.",
               "PASS": "Every check passed."}[worst]
    return (f'<section id="signoff" data-overall="{worst}"><h2>Sign-off {_state(worst)}</h2><p>{e(verdict)}</p>'
            f'<table class="signoff"><tbody>{rows}</tbody></table></section>')


def _run_record(facts: Mapping, restricted_copy: bool) -> str:
    rec = facts.get("record") or {}
    run = facts.get("run") or {}
    code, why = expected_exit(facts)
    cmd = rec.get("command")
    if cmd is None:
        command = '<span class="warn">not available</span> (this run did not record its command line)'
    elif restricted_copy:
        command = f"<code>{e(' '.join(cmd))}</code>"
    else:  # the release must not depend on how the command was typed (--cores, --restricted …)
        command = '<span class="muted">in the restricted copy (paths as given)</span>'
    diff = rec.get("diff") or []
    diff_html = "none (every setting at its default)" if not diff else "<br>".join(
        f"<code>{e(k)}</code>: {e(_shown(k, v, restricted_copy))} "
        f'<span class="muted">(default {e(_shown(k, d, restricted_copy))})</span>' for k, v, d in diff)
    items = [("deidflow version", e(rec.get("version") or facts.get("versions", {}).get("deidflow", ""))),
             ("command line", command),
             ("configuration hash", f"<code>{e(rec.get('config_hash') or 'not available')}</code> "
                                    '<span class="muted">(sha256 of the settings, paths excluded)</span>'),
             ("differences from the defaults", diff_html),
             ("key fingerprint", f"<code>{e(run.get('key_fingerprint', '') or 'not available')}</code>"),
             ("exit status", f"{code} ({e(why)}) <span class=\"muted\">as expected when this report was written; "
                             "the command's own status is final</span>")]
    if restricted_copy:
        items.insert(0, ("date", e(rec.get("date") or "not available")))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    stages = rec.get("stages") or []
    extra = ""
    if restricted_copy and stages:
        extra = "<h3>Wall time per stage (job logs)</h3>" + _table(
            ["stage", "jobs", "wall span (s)", "summed job time (s)"],
            [(e(s), n, f"{span:.1f}", f"{tot:.1f}") for s, n, span, tot in stages], numeric=(1, 2, 3))
    elif not restricted_copy:
        extra = '<p class="muted">Date and wall time per stage: restricted copy (this page is the same for the same input and key).</p>'
    dv, bv = facts.get("dciodvfy"), facts.get("bids_validator")
    tools = [("dciodvfy", "not installed" if dv is None else
              f"{dv['checked']} file(s) checked; new error kinds: " + (", ".join(dv["new_kinds"]) or "none")),
             ("BIDS validator", "not installed or no BIDS tree" if bv is None else bv["summary"])]
    extra += "<h3>Validators</h3>" + _table(["tool", "result"], [(e(a), e(b)) for a, b in tools])
    return f'<section id="run-record"><h2>Run record</h2><dl class="record">{body}</dl>{extra}</section>'


def _shown(key: str, value, restricted_copy: bool) -> str:
    if evidence.is_path_key(key.rsplit(".", 1)[-1]) and value and not restricted_copy:
        return "(a path: restricted copy)"
    return json.dumps(value, ensure_ascii=False, default=str)


def _leak_section(facts: Mapping, status_of: Mapping[str, str]) -> str:
    per, subjects = facts["per"], facts["subjects"]
    v, ds = facts["verify"], facts["dataset_verify"]
    ex = ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in v["excluded"].items()) or "none"
    scanned = sum((per[s]["verify"] or {}).get("bytes_scanned", 0) for s in subjects)
    skipped = sum((per[s]["verify"] or {}).get("bytes_not_scanned", 0) for s in subjects)
    lines = [f"<p>Every release file of every subject was searched for that subject's (and its job unit's) "
             f"original identifying values: {v['searched']} searched forms; forms excluded by the documented "
             f"rules (docs/qc.md): {e(ex)}. {scanned:,} bytes searched; {skipped:,} bytes of image samples "
             + ("also searched." if v["pixel_data"] else "not byte-searched (pixel data, NIfTI image blocks).")
             + "</p>"]
    if ds is not None:
        lines.append(f"<p>Dataset-level files: {ds['files']}, {_status(ds['status'])}.</p>")
    hits = [(s, h) for s in subjects for h in ((per[s]["verify"] or {}).get("hits") or ())]
    hits += [("dataset", h) for h in (ds or {}).get("hits", ())]
    if hits:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for s, h in hits:  # where it was found, without per-file positions
            where = re.sub(r"\b(byte offset|line) \d+", r"\1 …", str(h.get("location", "")))
            groups[(where, str(h.get("kind", "")))].append((s, h))
        rows = []
        for (field_, kind), items in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            files = sorted({(s, h["file"]) for s, h in items})
            detail = _table(["scope", "file", "location", "original attribute", "value hash", "value of"],
                            [(e(s), f"<code>{e(h['file'])}</code>", e(h["location"]), e(h["field"]),
                              f"<code>{e(h['value_hash'])}</code>", e(h["owner"])) for s, h in items[:500]])
            more = f'<p class="muted">{len(items) - 500} more in the restricted verify records.</p>' if len(items) > 500 else ""
            rows.append(f'<tr class="leak-group"><td><code>{e(field_)}</code></td><td>{e(kind)}</td>'
                        f'<td class="n">{len(files)}</td><td class="n">{len({s for s, _ in files})}</td>'
                        f'<td><details class="group"><summary>{len(items)} hit(s)</summary>{detail}{more}</details></td></tr>')
        lines.append(f"<h3>Hits by attribute and kind of identifier ({len(hits)} in {len({h['file'] for _, h in hits})} "
                     "file(s))</h3><table id=\"leak-groups\"><thead><tr><th>where (attribute path)</th><th>identifier kind</th>"
                     '<th class="n">files</th><th class="n">subjects</th><th>per file</th></tr></thead><tbody>'
                     + "".join(rows) + "</tbody></table>")
    return '<section id="leak-scan"><h2>Leak scan</h2>' + "".join(lines) + "</section>"


def _faces_section(facts: Mapping) -> str:
    faces = facts.get("faces")
    if faces is None:
        return ('<section id="faces"><h2>Faces</h2><p class="warn">Not available: the face stage left no '
                "decisions (it did not run, or face.method is none).</p></section>")
    per = facts["per"]
    rows = []
    for f in faces:
        frac = f"{100 * f['removed_fraction']:.1f} %" if isinstance(f.get("removed_fraction"), (int, float)) else ""
        state = {"defaced": "ok", "skull-stripped": "ok", "withheld": "warn"}.get(f["decision"], "muted")
        rows.append((e(f["subject"]), f"<code>{e(f['image'])}</code>", f'<span class="{state}">{e(f["decision"])}</span>',
                     e(f["withheld"] or f["reason"]), e(f["backend"]), frac,
                     "" if f.get("dicom_files") is None else e(f["dicom_files"])))
    parts = [f'<p>{len(faces)} image(s) considered; every one is listed with the decision and its reason. '
             "Pictures: the skin surface seen from the front after defacing (before: restricted copy only) and "
             "slices with the removed region outlined in red. Click a picture to enlarge it.</p>",
             '<div class="filters"><label>Filter <input type="search" data-filter="face-table" '
             'placeholder="subject, decision, reason"></label><span id="face-table-count" class="muted"></span></div>',
             _table(["subject", "image", "decision", "reason", "backend", "removed", "DICOM files"], rows,
                    numeric=(6,), attrs='id="face-table" class="filterable" data-page="100"')]
    shown = 0
    for f in faces:
        if f["decision"] not in ("defaced", "skull-stripped") or f["mask_from"] not in ("", f["image"]):
            continue
        pics = [im for im in per.get(f["subject"], {}).get("images", ())
                if im["stage"] == "face" and im["caption"].startswith(f["image"] + ":")]
        if not pics or shown >= PICTURE_LIMIT:
            continue
        shown += 1
        order = {"face_front_before": 0, "face_front_after": 1}
        pics = sorted(pics, key=lambda im: (order.get(im["kind"], 2), im["kind"]))
        parts.append(f'<h3 id="face-{e(f["subject"])}-{shown}">{e(f["subject"])} \u00b7 <code>{e(f["image"])}</code></h3>'
                     '<div class="pair">' + "".join(_picture(im, f["subject"], big=True) for im in pics) + "</div>")
    if shown >= PICTURE_LIMIT:
        parts.append(f'<p class="muted">Pictures of the first {PICTURE_LIMIT} images; all are in derivatives/deidflow/qc.</p>')
    return '<section id="faces"><h2>Faces</h2>' + "".join(parts) + "</section>"


def _pixels_section(facts: Mapping) -> str:
    pix = facts.get("pixels") or []
    mode = facts.get("pixel_mode") or "not recorded"
    head = (f"<p>Pixel step: <code>pixels.clean: {e(mode)}</code>. Per series: files and frames screened for "
            "burned-in text, files where text was found, boxes blanked; after-pictures with the blanked boxes "
            "outlined (before: restricted copy only).</p>")
    if not pix:
        return f'<section id="pixels"><h2>Burned-in text</h2>{head}<p>No series was screened.</p></section>'
    def found(s):
        return "—" if s["text_found"] is None else "yes" if s["text_found"] else "no"
    rows = [(e(s["subject"]), f"<code>{e(s['series'])}</code>", s["files"],
             s["frames"] if s["frames_known"] else "not recorded", found(s), s["files_cleaned"], s["boxes"],
             s["withheld"] + s["dropped"], e(s["decision"] + (f" ({s['why']})" if s["why"] else ""))) for s in pix]
    parts = [head, '<div class="filters"><label>Filter <input type="search" data-filter="pixel-table" '
             'placeholder="subject, series, decision"></label><span id="pixel-table-count" class="muted"></span></div>',
             _table(["subject", "series", "files", "frames screened", "text found", "files cleaned", "boxes cleaned",
                     "files withheld or dropped", "decision"], rows, numeric=(2, 3, 5, 6, 7),
                    attrs='id="pixel-table" class="filterable" data-page="100"') + _pager("pixel-table")]
    per = facts["per"]
    shown = 0
    for s in pix:
        pics = [im for im in per.get(s["subject"], {}).get("images", ())
                if im["stage"] == "pixels" and im["caption"].rpartition(":")[0].rpartition("/")[0] == s["series"]]
        if not pics or shown >= PICTURE_LIMIT:
            continue
        shown += 1
        pics = sorted(pics, key=lambda im: (not im.get("before"), im["file"]))
        parts.append(f'<h3>{e(s["subject"])} \u00b7 <code>{e(s["series"])}</code></h3><div class="pair">'
                     + "".join(_picture(im, s["subject"]) for im in pics) + "</div>")
    return '<section id="pixels"><h2>Burned-in text</h2>' + "".join(parts) + "</section>"


def _attributes_section(facts: Mapping) -> str:
    at = facts.get("attributes") or {"rows": [], "survives": [], "series_read": 0, "series": 0}
    rows, row_attrs = [], []
    for r in at["rows"]:
        rows.append((f"<code>{e(r['path'])}</code>", e(r["keyword"]), f"<code>{e(r['tag'])}</code>", e(r["creator"]),
                     e(r["private_name"]), e(r["vr"]), f"{e(r['action'])} {e(ACTION_NAMES.get(r['action'], ''))}",
                     r["files"]))
        row_attrs.append(f'data-action="{e(r["action"])}"')
    opts = "".join(f'<option value="{c}">{c} {e(n)}</option>' for c, n in ACTION_NAMES.items())
    survives = at["survives"]
    sv = ("<p>None.</p>" if not survives else '<ul class="survives">' + "".join(
        f"<li><code>{e(r['path'])}</code>" + (f" ({e(r['creator'])}" + (f": {e(r['private_name'])}" if r["private_name"] else "")
                                              + ")" if r["creator"] else "") + f" \u00b7 {r['files']}</li>"
        for r in survives) + "</ul>")
    return ('<section id="attributes"><h2>Kept, changed and removed attributes</h2>'
            f"<p>Changed and removed: every audited file. Kept: read from the released DICOM, one file per series "
            f"counted for every file of its series: {at['series_read']} of {at['series']} series "
            f"({at.get('files_read', 0)} of {at.get('files', 0)} files; at most {attributes.PER_KIND} series per kind "
            f"of object and {attributes.MAX_SERIES} in all), so kept counts are over those files. Private tags "
            "are named by their creator and pydicom's private dictionary.</p>"
            "<h3>What survives (kept text, dates, names and private attributes, for a human to skim)</h3>" + sv
            + '<h3>Every attribute</h3><div class="filters"><label>Filter <input type="search" data-filter="attr-table" '
            'placeholder="keyword, tag, creator"></label><label>Action <select data-table="attr-table" '
            f'data-attr="data-action"><option value="">all</option>{opts}</select></label>'
            '<span id="attr-table-count" class="muted"></span></div>'
            + _table(["attribute path", "keyword", "tag", "private creator", "private name", "VR", "action", "files"],
                     rows, numeric=(7,), attrs='id="attr-table" class="filterable" data-page="200"', row_attrs=row_attrs)
            + _pager("attr-table") + "</section>")


def _pager(table_id: str) -> str:
    return (f'<div class="pager" id="{table_id}-pager"><button class="prev" type="button">\u2039 previous</button>'
            '<span></span><button class="next" type="button">next \u203a</button></div>')


def render(facts: Mapping, *, run_time: str | None = None) -> tuple[str, dict[str, str]]:
    """The HTML page for ``facts`` (see :func:`build`)."""
    per, subjects = facts["per"], facts["subjects"]
    run = facts["run"]
    settings = run.get("settings", {})
    restricted_copy = facts["restricted_copy"]
    leaky = [s for s in subjects if (per[s]["verify"] or {}).get("status") == "leak"]
    unscanned = [s for s in subjects if not per[s]["verify"]]
    ds = facts["dataset_verify"]
    overall = ("LEAK" if leaky or (ds and ds["hits"]) else "not complete" if unscanned or ds is None else "clean")
    status_of = {s: (per[s]["verify"] or {}).get("status", "not scanned") for s in subjects}
    parts = [_signoff(facts), _run_record(facts, restricted_copy)]
    cards = [(len(subjects), "subjects"), (facts["studies"], "studies"), (facts["series"], "series"),
             (facts["files_in"], "input files"), (sum(facts["formats_out"].values()), "files released"),
             (len(facts["quarantine"]), "quarantined"), (overall, "leak scan")]
    parts.append('<section id="summary"><h2>Dataset summary</h2><div class="cards">' + "".join(
        f'<div class="card"><b class="{"bad" if v == "LEAK" else ""}">{e(v)}</b><span>{e(k)}</span></div>'
        for v, k in cards) + "</div>")
    if facts["before_in_release"] and not restricted_copy:
        parts.append(f'<p class="bad">{facts["before_in_release"]} rendering(s) of data before de-identification '
                     "(kind \u201cbefore\u201d) lie in the release under derivatives/deidflow/qc: they show what was "
                     "removed; move them out of the release before sharing. This page shows them only in its "
                     "restricted copy.</p>")
    if run_time:
        parts.append(f'<p class="muted">Run time: {e(run_time)} (restricted copy only)</p>')
    fmt_names = sorted(set(facts["formats_in"]) | set(facts["formats_out"]))
    parts.append('<h3>Files in and out per format</h3>' + _table(
        ["format", "input files", "released files"],
        [(e(f), facts["formats_in"].get(f, ""), facts["formats_out"].get(f, "")) for f in fmt_names], numeric=(1, 2)))
    parts.append("</section>")
    parts.append(_leak_section(facts, status_of))
    parts.append(_faces_section(facts))
    parts.append(_pixels_section(facts))
    parts.append(_attributes_section(facts))
    # subject table (paged: usable at 10,000 subjects)
    table_rows, row_attrs = [], []
    for s in subjects:
        p = per[s]
        table_rows.append((f'<a href="#{e(s)}">{e(s)}</a>', p["sessions"], p["series"], p["files_in"], p["released"],
                           p["quarantined"], len({a for a, _ in p["actions"]}), len(p["images"]), _status(status_of[s])))
        row_attrs.append(f'data-status="{e(status_of[s])}"')
    parts.append(
        '<section id="subject-table"><h2>Subjects</h2><div class="filters">'
        '<label>Filter <input id="subject-filter" data-filter="subjects" type="search" placeholder="subject, count, status"></label>'
        '<label>Leak scan <select id="status-filter" data-table="subjects" data-attr="data-status"><option value="">all</option>'
        '<option value="clean">clean</option><option value="leak">leak</option><option value="not scanned">not scanned'
        '</option></select></label><span id="subjects-count" class="muted"></span></div>'
        + _table(["subject", "studies", "series", "input files", "released files", "quarantined",
                  "attributes changed", "QC images", "leak scan"], table_rows, numeric=(1, 2, 3, 4, 5, 6, 7),
                 attrs='id="subjects" class="filterable" data-page="100"', row_attrs=row_attrs)
        + _pager("subjects") + "</section>")
    # quarantine
    q = facts["quarantine"]
    parts.append('<section id="quarantine"><h2>Quarantined files</h2>' + (
        "<p>None: every input file was released.</p>" if not q else
        f"<p>{len(q)} input file(s) were not released; original paths are in the restricted quarantine.tsv.</p>"
        + _table(["source ID", "subject", "format", "reason"],
                 [(f"<code>{e(x['src_id'])}</code>", e(x["subject"]), e(x["format"]), e(x["reason"])) for x in q],
                 attrs='id="quarantine-table" class="filterable" data-page="200"') + _pager("quarantine-table"))
        + (f'<p class="warn">Withheld by the release gate (leak-scan hits; their files are listed above with the '
           f'subject\'s keyed ID): {e(", ".join((facts.get("gate") or {}).get("withheld") or []))}.</p>'
           if (facts.get("gate") or {}).get("withheld") else "")
        + "</section>")
    # settings and versions
    opts = settings.get("options") or []
    overrides = settings.get("overrides") or []
    srows = [("PS3.15 options", e(", ".join(opts) or "none (Basic Profile)")),
             ("private attributes", e(settings.get("private", ""))),
             ("user overrides", e("; ".join(f"{o.get('attribute')}: {o.get('action')}" for o in overrides) or "none")),
             ("pseudonym length", e(settings.get("pseudonym_length", ""))),
             ("date offset range (days)", e(settings.get("date_offset_days", ""))),
             ("trust-centre mapping", "yes" if settings.get("mapping_csv") else "no"),
             ("key fingerprint", f"<code>{e(run.get('key_fingerprint', ''))}</code>")]
    parts.append('<section id="settings"><h2>Profile, options and versions</h2><div class="charts">'
                 + _table(["setting", "value"], srows)
                 + _table(["software", "version"], [(e(k), e(v)) for k, v in facts["versions"].items()])
                 + "</div></section>")
    # charts
    totals: Counter = Counter()
    for s in subjects:
        totals.update(per[s]["actions"])
    by_attr: dict[str, Counter] = defaultdict(Counter)
    for (attr, code), n in totals.items():
        by_attr[attr][code] += n
    top = sorted(by_attr.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:25]
    charts = {
        "modalities": bar_chart([(m, {"files": n}) for m, n in facts["modalities"].items()],
                                "Released DICOM files per modality"),
        "actions": bar_chart([(a, dict(c)) for a, c in top], "Actions per attribute (25 most frequent)",
                             ACTION_COLORS, width=640),
    }
    inline = {k: v.replace(' xmlns="http://www.w3.org/2000/svg"', "") for k, v in charts.items()}
    parts.append('<section id="charts"><h2>Charts</h2><div class="charts">' + inline["modalities"]
                 + inline["actions"] + "</div></section>")
    # per subject: every subject up to DETAIL_LIMIT, beyond only those with findings
    many = len(subjects) > DETAIL_LIMIT
    secs = []
    for s in subjects:
        p = per[s]
        vh = (p["verify"] or {}).get("hits") or []
        if many and not (vh or p["quarantined"] or status_of[s] != "clean"):
            continue
        codes = sorted({c for _, c in p["actions"]})
        attrs: dict[str, Counter] = defaultdict(Counter)
        for (a, c), n in p["actions"].items():
            attrs[a][c] += n
        body = [f"<p>{p['released']} released file(s) ({e(', '.join(f'{k}: {n}' for k, n in p['formats'].items()) or 'none')}); "
                f"{p['quarantined']} quarantined; leak scan {_status(status_of[s])}"
                + (f", {p['verify']['files']} files, {p['verify']['identifiers']} original values searched" if p["verify"] else "")
                + ".</p>"]
        if attrs and not many:
            body.append("<h3>Actions by attribute (occurrences)</h3>" + _table(
                ["attribute", *[f"{c} {ACTION_NAMES.get(c, '')}" for c in codes]],
                [(e(a), *[attrs[a].get(c, "") for c in codes]) for a in sorted(attrs)], numeric=range(1, len(codes) + 1)))
        if vh:
            body.append("<h3>Leak-scan hits</h3>" + _table(
                ["file", "location", "kind", "field", "value hash"],
                [(f"<code>{e(h['file'])}</code>", e(h["location"]), e(h["kind"]), e(h["field"]),
                  f"<code>{e(h['value_hash'])}</code>") for h in vh[:500]]))
        secs.append(f'<details class="subject" id="{e(s)}"><summary>{e(s)} \u2014 {_status(status_of[s])}'
                    f"</summary>{''.join(body)}</details>")
    note = (f'<p class="muted">{len(subjects)} subjects: only those with a finding (leak, quarantine, not scanned) '
            "have a section here; the table above and subjects.tsv list every subject.</p>" if many else "")
    parts.append('<section id="subject-details"><h2>Subjects in detail</h2>' + note + "".join(secs) + "</section>")
    template = string.Template(resources.files("deidflow").joinpath("data", "qc_report.html").read_text(encoding="utf-8"))
    title = "deidflow QC report" + (" (restricted copy)" if restricted_copy else "")
    subtitle = (f"deidflow {facts['versions'].get('deidflow', '')} \u00b7 {len(subjects)} subjects \u00b7 "
                f"leak scan: {overall} \u00b7 key fingerprint {run.get('key_fingerprint', '')}")
    return template.substitute(title=e(title), subtitle=e(subtitle), body="\n".join(parts)), charts


def subjects_tsv(facts: Mapping) -> str:
    lines = ["subject\tstudies\tseries\tinput_files\treleased_files\tquarantined\tattributes_changed\tqc_images\tleak_scan\n"]
    for s in facts["subjects"]:
        p = facts["per"][s]
        lines.append(f"{s}\t{p['sessions']}\t{p['series']}\t{p['files_in']}\t{p['released']}\t{p['quarantined']}\t"
                     f"{len({a for a, _ in p['actions']})}\t{len(p['images'])}\t"
                     f"{(p['verify'] or {}).get('status', 'not scanned')}\n")
    return "".join(lines)


def _own_words() -> frozenset[bytes]:
    """Every word of an empty report page (template, headings, legends): a patient called "Value"
    is not leaked by the heading "dummy value"."""
    empty = {"run": {}, "subjects": [], "per": {}, "quarantine": [], "verify": {"subjects": {}, "excluded": {},
             "searched": 0, "pixel_data": False}, "dataset_verify": None, "formats_in": {}, "formats_out": {},
             "files_in": 0, "modalities": {}, "studies": 0, "series": 0, "before_in_release": 1, "versions": {},
             "restricted_copy": False}
    page = " ".join((render(empty)[0], *ACTION_NAMES.values(), *FORMAT_NAMES.values(), REASON_WITHHELD, CREATOR_WITHHELD, SETTING_WITHHELD,
                     *_reason_texts()))
    return frozenset(re.findall(rb"[a-z]+", html.unescape(page).encode("utf-8").lower()))


# Modules whose fixed texts (decisions and reasons) the report shows: their words are the report's own
# ("fMRI time series: not defaced" is no leak of a phantom whose PatientID is "fMRI").
_REASON_MODULES = ("face/select.py", "face/stage.py", "qc/captions.py", "pixels/subject.py", "pixels/policy.py",
                   "publish.py", "bids/heuristic.py", "formats/stage.py", "pixels/volumes.py")


def _reason_texts() -> list[str]:
    """Every string constant of :data:`_REASON_MODULES` (read from their source, not run)."""
    import ast
    base = Path(__file__).resolve().parents[1]
    texts = []
    for rel in _REASON_MODULES:
        try:
            tree = ast.parse((base / rel).read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            continue
        texts += [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return texts


def _check_public(restricted: Path, facts: dict, texts: Mapping[str, str], matcher: Matcher) -> bool:
    """One search for every subject's original values (``matcher``) and the quarantined input
    paths over the quarantine reasons, the private creators (both read from input files), the
    settings that differ from the defaults (a ``bids.name`` that names a patient also reaches the
    dataset-level files, which the gate then withholds) and ``texts`` (the pages).  Reasons,
    creators and settings that hold one are withheld in ``facts`` and True is returned: render
    again and check again.  Otherwise a text that holds one stops the report (it is never written)."""
    originals = sorted({part for q in facts["quarantine"] for part in q["_path"].split("/") if part})
    rows = (facts.get("attributes") or {}).get("rows", ())
    creators = sorted({c for r in rows for c in r["creator"].split(" | ") if c})
    diff = (facts.get("record") or {}).get("diff") or []
    search = {**{f"reason {i}": q["reason"] for i, q in enumerate(facts["quarantine"])},
              **{f"creator {i}": c for i, c in enumerate(creators)},
              **{f"setting {i}": json.dumps(v, ensure_ascii=False, default=str) for i, (_, v, _) in enumerate(diff)
                 if v != SETTING_WITHHELD},
              **{f"text {k}": _DATA_URI.sub("data:", t) for k, t in texts.items()}}  # images were scanned as files
    if not search:
        return False
    matchers = [matcher] + ([leakscan.originals_matcher(restricted, originals)] if originals else [])
    found = leakscan.text_hits(matchers, search, _own_words())
    withheld = False
    for i, q in enumerate(facts["quarantine"]):
        if found[f"reason {i}"]:
            q["reason"] = REASON_WITHHELD
            withheld = True
    bad_creators = {c for i, c in enumerate(creators) if found[f"creator {i}"]}
    for r in rows if bad_creators else ():
        r["creator"] = " | ".join(CREATOR_WITHHELD if c in bad_creators else c for c in r["creator"].split(" | "))
    bad_settings = {i for i in range(len(diff)) if found.get(f"setting {i}")}
    if bad_settings:
        facts["record"]["diff"] = [(k, SETTING_WITHHELD if i in bad_settings else v, d)
                                   for i, (k, v, d) in enumerate(diff)]
    if withheld or bad_creators or bad_settings:
        return True
    bad = {k[5:]: n for k, n in found.items() if k.startswith("text ") and n}
    if bad:
        raise PublicError(f"QC report not written: {sum(bad.values())} identifying value(s) would appear in "
                          f"{', '.join(sorted(bad))}")
    return False


def write_report(release: Path, restricted: Path, output: Path, charts: str, table: Path, full: Path, *,
                 staged: Path | None = None, matcher: Matcher | None = None,
                 dataset_verify: Mapping | None = None, on_leak: str = "withhold", mode: int = 0o644) -> Path:
    """Write the public report, its charts and subject table (``output``, ``charts``, ``table``:
    the ``verify_dataset`` job puts them in the staging area) and the restricted copy ``full``.
    ``matcher`` (default: built here) holds every subject's values; ``staged`` and
    ``dataset_verify`` are the staged dataset-level files and their scan, ``on_leak`` what
    ``publish_dataset`` does after a hit (see :func:`build`);
    ``mode`` is the public files' (restricted while they are staged)."""
    release, restricted = Path(release), Path(restricted)
    facts = build(release, restricted, staged, dataset_verify, on_leak)
    matcher = leakscan.dataset_matcher(restricted) if matcher is None else matcher
    for attempt in range(2):  # a second time only when a quarantine reason or creator was withheld
        page, svgs = render(facts)
        tsv = subjects_tsv(facts)
        if not _check_public(restricted, facts, {"report.html": page, "subjects.tsv": tsv, **svgs}, matcher):
            break
    else:
        raise PublicError("QC report not written: withholding identifying quarantine reasons and private "
                          "creators did not make it clean")
    chart_paths = [Path(p) for p in charts.split(",")] if charts else []
    for path, svg in zip(chart_paths, (svgs["modalities"], svgs["actions"])):
        atomic_write_text(path, svg + "\n", mode)
    atomic_write_text(table, tsv, mode)
    atomic_write_text(output, page, mode)
    # the restricted copy: the same facts (quarantine reasons as checked above) plus the before-images
    images = _images_of(release, restricted, facts["per"], restricted_copy=True)
    full_facts = {**facts, "restricted_copy": True, "per": {s: {**p, "images": images[s]} for s, p in facts["per"].items()}}
    make_restricted_dir(Path(full).parent)
    atomic_write_text(full, render(full_facts, run_time=_run_time(restricted))[0], RESTRICTED_FILE_MODE)
    return Path(output)


def _run_time(restricted: Path) -> str:
    """From the run's configuration being written (``deidflow run``) or the first job log to now."""
    cfg = Path(restricted) / "run-config.yaml"
    logs = [p.stat().st_mtime for p in (Path(restricted) / "logs").rglob("*.log")] if (Path(restricted) / "logs").is_dir() else []
    start = cfg.stat().st_mtime if cfg.exists() else min(logs or [time.time()])
    secs = max(0.0, time.time() - start)
    return f"{int(secs // 60)} min {secs % 60:.0f} s (until the report was written)"


# ------------------------------------------------------------------------------------------------
# One line per stage at the end of a run
# ------------------------------------------------------------------------------------------------
def stage_summaries(restricted: Path) -> list[str]:
    """One summary line per stage from its done markers (counts and pseudonyms only)."""
    done = Path(restricted) / "done"
    lines = []
    for stage_dir in sorted(p for p in done.iterdir() if p.is_dir()) if done.is_dir() else ():
        markers = sorted(stage_dir.glob("*.json"))
        docs = []
        for m in markers:
            try:
                docs.append(json.loads(m.read_text()))
            except ValueError:
                continue
        stage = stage_dir.name
        if stage == "verify":
            subs = {s: r for d in docs for s, r in d.get("subjects", {}).items()}
            leaky = sorted(s for s, r in subs.items() if r.get("hits"))
            text = (f"{len(subs)} subjects scanned, {sum(r.get('files', 0) for r in subs.values())} files: "
                    + (f"LEAK in {', '.join(leaky)}" if leaky else "no identifying value found"))
        else:
            subs = [s for d in docs for s in d.get("subjects", []) if isinstance(s, dict)]
            files = sum(int(s.get("files", 0) or 0) for s in subs)
            bad = sum(int(s.get("quarantined", 0) or 0) for s in subs)
            text = f"{len(markers)} job units" + (f", {len(subs)} subjects, {files} files" if subs else "") + (
                f", {bad} quarantined" if bad else "")
        lines.append(f"deidflow: {stage}: {text}")
    ds = done / "verify_dataset.json"
    if ds.exists():
        r = json.loads(ds.read_text())
        lines.append(f"deidflow: verify_dataset: {r['files']} dataset-level files: "
                     + ("LEAK" if r["hits"] else "no identifying value found"))
    return lines
