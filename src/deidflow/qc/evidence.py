"""Facts for the QC report's sign-off, read from what the stages wrote (never recomputed).

Each reader returns None (or an empty result) when its stage left nothing behind: the report
then says "not available" instead of failing.

* face decisions: ``restricted/done/face/*.json`` (every candidate image, its decision and reason);
* burned-in text: the pixel stage's per-series facts (``restricted/pixels/<subject>.json``) or, where
  it wrote none, the pixel records of the audit (``restricted/audit/*.jsonl``, key ``pixels``);
* the release gate: the ``RELEASE_INCOMPLETE`` marker at the release root and the restricted
  record of withheld subjects (``restricted/withheld.json``);
* the run record: ``restricted/run.json``, ``run-config.yaml`` and the job logs;
* optional validators: dciodvfy (new error kinds against the original) and the BIDS validator.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

INCOMPLETE_MARKER = "RELEASE_INCOMPLETE"
PATH_KEYS = ("input", "output", "restricted", "key_file")
_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")


def _json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# Faces
# ------------------------------------------------------------------------------------------------
def face_decisions(restricted: Path) -> list[dict] | None:
    """Every image the face stage considered: subject, image, series, decision, reason, backend,
    removed fraction, DICOM files rewritten; None when the stage did not run."""
    folder = Path(restricted) / "done" / "face"
    if not folder.is_dir():
        return None
    out = []
    for f in sorted(folder.glob("*.json")):
        doc = _json(f)
        for im in (doc or {}).get("images", ()) if isinstance(doc, dict) else ():
            if not isinstance(im, dict):
                continue
            rel = str(im.get("nifti", ""))
            m = _SUBJECT.search(rel)
            method = str(im.get("method", "none"))
            if im.get("withheld"):
                decision = "withheld"
            elif method == "none":
                decision = "not a face candidate"
            elif im.get("backend"):
                decision = "defaced" if method == "deface" else ("skull-stripped" if method == "skullstrip" else method)
            else:
                decision = f"{method}: no result recorded"
            out.append({"subject": m.group() if m else "", "image": rel, "series": str(im.get("series", "")),
                        "method": method, "decision": decision, "reason": str(im.get("reason", "")),
                        "withheld": str(im.get("withheld", "") or ""), "backend": str(im.get("backend", "")),
                        "removed_fraction": im.get("removed_fraction"), "mask_from": str(im.get("mask_from", "")),
                        "dicom_files": im.get("dicom_files")})
    return sorted(out, key=lambda r: (r["subject"], r["image"]))


# ------------------------------------------------------------------------------------------------
# Burned-in text
# ------------------------------------------------------------------------------------------------
def _series_row(subject: str, series: str) -> dict:
    return {"subject": subject, "series": series, "files": 0, "frames": 0, "frames_known": True, "text_found": None,
            "files_cleaned": 0, "boxes": 0, "withheld": 0, "dropped": 0, "decision": "", "why": ""}


def pixel_series(records: list[tuple[str, str, dict]], restricted: Path) -> list[dict]:
    """Per series: files and frames screened, whether text was found, files cleaned, boxes
    blanked, files withheld or dropped, the decision and its reason.  From the pixel stage's facts
    (``restricted/pixels/<subject>.json``) where it wrote them, else from the audit's pixel
    records (frames then unknown).  Series the pixel step neither screened nor cleaned are left out."""
    out: dict[str, dict] = {}
    folder = Path(restricted) / "pixels"
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        doc = _json(f)
        if not isinstance(doc, dict):
            continue
        subject = str(doc.get("subject") or f.stem)
        for it in doc.get("series") or ():
            if not isinstance(it, dict) or not it.get("series"):
                continue
            row = _series_row(subject, f"{subject}/{it['series']}")
            row.update(files=int(it.get("files") or 0), frames=int(it.get("screened_frames") or 0),
                       text_found=it.get("text_found"), files_cleaned=int(it.get("files_cleaned") or 0),
                       boxes=int(it.get("boxes") or 0), withheld=int(it.get("withheld") or 0),
                       decision=str(it.get("decision", "")), why=str(it.get("why", "")))
            if row["frames"] or row["files_cleaned"] or row["text_found"] is not None or row["decision"] == "cleaned":
                out[row["series"]] = row
    from_audit: dict[str, dict] = {}
    for subject, name, rec in records:
        key = name.rpartition("/")[0]
        action = str(rec.get("action", ""))
        if key in out or action == "skipped":
            continue
        row = from_audit.setdefault(key, _series_row(subject, key))
        row["frames_known"] = False
        row["files"] += 1
        boxes = len(rec.get("redactions") or ())
        row["boxes"] += boxes
        row["files_cleaned"] += action in ("redacted", "blanked", "dropped")
        row["dropped"] += action == "dropped"
        row["text_found"] = bool(row["text_found"] or boxes or action in ("blanked", "dropped", "kept"))
        row["decision"] = "cleaned" if row["files_cleaned"] else action
        row["why"] = row["why"] or str(rec.get("why", ""))
    out.update(from_audit)
    return [r for _, r in sorted(out.items())]


# ------------------------------------------------------------------------------------------------
# Release gate
# ------------------------------------------------------------------------------------------------
def gate(release: Path, restricted: Path) -> dict:
    """The release gate's state: whether ``RELEASE_INCOMPLETE`` lies at the release root (it does
    from a run's first job until the run succeeds, so always while the report is written inside a
    run) and the subjects ``restricted/withheld.json`` lists as withheld or published with leaks
    (``{"withheld": {subject: [hit, …]}, "published_with_leaks": {…}}``); None for a record that is
    not there."""
    doc = _json(Path(restricted) / "withheld.json")
    withheld = leaky = None
    if isinstance(doc, dict):
        withheld = sorted(doc.get("withheld") or {})
        leaky = sorted(doc.get("published_with_leaks") or {})
    return {"incomplete": (Path(release) / INCOMPLETE_MARKER).exists(), "withheld": withheld,
            "published_with_leaks": leaky}


# ------------------------------------------------------------------------------------------------
# Run record
# ------------------------------------------------------------------------------------------------
def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.endswith(("_file", "_csv", "_dir", "_folder"))


def run_record(restricted: Path, run: Mapping) -> dict:
    """Version, command line, configuration hash and differences from the defaults, key
    fingerprint; the date and per-stage wall times go to the restricted copy only."""
    import yaml
    restricted = Path(restricted)
    cfg_file = restricted / "run-config.yaml"
    config: dict = {}
    try:
        config = yaml.safe_load(cfg_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    try:
        from ..settings import load_defaults
        defaults = _flat(load_defaults())
    except Exception:  # the workflow files are not next to the package
        defaults = {}
    flat = _flat(config)
    public = {k: v for k, v in flat.items() if not is_path_key(k.rsplit(".", 1)[-1])}
    digest = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16] if config else ""
    diff = [(k, flat[k], defaults.get(k, "(not a default key)")) for k in sorted(flat)
            if k not in PATH_KEYS and flat[k] != defaults.get(k)]
    date = ""
    if cfg_file.exists():
        date = _dt.datetime.fromtimestamp(cfg_file.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = run.get("command")
    return {"version": str(run.get("deidflow", "")), "key_fingerprint": str(run.get("key_fingerprint", "")),
            "config_hash": digest, "diff": diff, "date": date,
            "command": [str(a) for a in command] if isinstance(command, list) else None,
            "paths": {k: str(config.get(k, "")) for k in PATH_KEYS if config.get(k)},
            "stages": stage_times(restricted)}


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")


def stage_times(restricted: Path) -> list[tuple[str, int, float, float]]:
    """(stage, jobs, wall span in s from the first job's start to the last job's end, summed job
    time in s) from the job logs (first time stamp, modification time)."""
    logs = Path(restricted) / "logs"
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for f in sorted(logs.rglob("*.log")) if logs.is_dir() else ():
        stage = f.parent.name if f.parent != logs else f.stem
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                m = _STAMP.match(fh.readline())
            end = f.stat().st_mtime
        except OSError:
            continue
        if not m:
            continue
        start = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
        spans[stage].append((start, max(start, end)))
    return [(s, len(v), max(b for _, b in v) - min(a for a, _ in v), sum(b - a for a, b in v))
            for s, v in sorted(spans.items())]


# ------------------------------------------------------------------------------------------------
# Optional validators
# ------------------------------------------------------------------------------------------------
def _error_kinds(text: str) -> set[str]:
    """dciodvfy's error lines without their values (numbers, quoted text, element positions)."""
    kinds = set()
    for line in text.splitlines():
        if line.startswith("Error"):
            kinds.add(re.sub(r"<[^>]*>|\"[^\"]*\"|'[^']*'|\d+", "#", line).strip())
    return kinds


def dciodvfy(pairs: list[tuple[Path, Path]], limit: int = 10) -> dict | None:
    """New dciodvfy error kinds in released files compared with their originals (one file per
    kind of object, at most ``limit``); None when dciodvfy is not installed."""
    exe = shutil.which("dciodvfy")
    if not exe:
        return None
    import tempfile

    from ..sniff import decompressed
    new: Counter = Counter()
    checked = 0
    for src, out in pairs[:limit]:
        try:
            with tempfile.TemporaryDirectory() as tmp, decompressed(src, tmp) as plain:  # .dcm.gz inputs
                a = subprocess.run([exe, str(plain)], capture_output=True, text=True, timeout=60, errors="replace")
            b = subprocess.run([exe, str(out)], capture_output=True, text=True, timeout=60, errors="replace")
        except (OSError, subprocess.TimeoutExpired):
            continue
        checked += 1
        new.update(_error_kinds(b.stdout + b.stderr) - _error_kinds(a.stdout + a.stderr))
    return {"checked": checked, "new_kinds": sorted(new)}


def bids_validator(release: Path, staged: Path | None = None, restricted: Path | None = None,
                   subjects: Iterable[str] | None = None, withheld: Path | None = None) -> dict | None:
    """The BIDS validator's verdict on the release as ``publish_dataset`` will leave it (its
    dataset-level files staged in ``staged``, without the run's RELEASE_INCOMPLETE marker, foreign
    entries, the folders of subjects not in ``subjects``, the current input's, and the files
    withheld in ``withheld`` — their earlier copies leave too; seen through links in a scratch
    folder of ``restricted``); None when not installed or not a BIDS tree."""
    from ..publish import own_root_entries
    exe = shutil.which("bids-validator")
    if not exe:
        return None
    staged_files = [p for p in Path(staged).iterdir() if p.is_file()] if staged and Path(staged).is_dir() else []
    current = None if subjects is None else set(subjects)
    own_root = own_root_entries(restricted)
    import tempfile
    with tempfile.TemporaryDirectory(dir=restricted) as view:
        for entry in Path(release).iterdir():
            subject = entry.name.startswith("sub-") and entry.is_dir()
            if (entry.name == INCOMPLETE_MARKER or (subject and current is not None and entry.name not in current)
                    or not (subject or entry.name in own_root)):
                continue  # publish_dataset takes these out
            if not any(d and (Path(d) / entry.name).exists() for d in (staged, withheld)):
                os.symlink(entry.resolve(), Path(view) / entry.name)
        for f in staged_files:
            os.symlink(f.resolve(), Path(view) / f.name)
        return _validate(exe, Path(view))


def _validate(exe: str, root: Path) -> dict | None:
    if not (root / "dataset_description.json").exists():
        return None
    try:
        r = subprocess.run([exe, str(root)], capture_output=True, text=True, timeout=300, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "summary": f"did not finish ({type(exc).__name__})"}
    errors = sum(1 for ln in (r.stdout + r.stderr).splitlines() if "ERR" in ln.upper())
    return {"ok": r.returncode == 0,  # its messages name paths: only a count goes into the report
            "summary": f"exit status {r.returncode}, {errors} error line(s)" if r.returncode else "no error"}
