"""The closing summary of a run: what was released, withheld and quarantined, and why.

Every count is read here, in one place, from what the stages left behind: the inventory, the
release tree, ``quarantine.tsv``, the done markers of the face and leak-scan stages and the audit
(pixel redactions).  Only pseudonyms, counts and reasons are shown, never an original value.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .publish import MARKER, QC_SUBDIR, current_subjects
from .settings import Paths

_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_|$)")


@dataclass
class Counts:
    subjects_in: int = 0           # subjects the inventory found (status ok)
    files_in: int = 0              # input files to release
    released_subjects: list[str] = field(default_factory=list)
    released_files: int = 0        # files of subjects in the release (QC products excluded)
    dataset_files: int = 0         # dataset-level files (dataset_description.json, participants.tsv, …)
    quarantined: Counter = field(default_factory=Counter)  # reason -> files
    faces: Counter = field(default_factory=Counter)         # deface, skullstrip, withheld, none -> images
    faces_ran: bool = False        # the face stage left decisions (not when face.method is none everywhere)
    pixel_images: int = 0          # images whose pixels were cleaned (text found and redacted, or blanked)
    pixel_boxes: int = 0           # text boxes redacted
    scanned_subjects: int = 0
    scanned_files: int = 0
    leaky: list[str] = field(default_factory=list)  # subjects (or "dataset") with a leak-scan hit
    report: Path | None = None

    @property
    def withheld_subjects(self) -> int:
        return max(0, self.subjects_in - len(self.released_subjects))


def _subject_of(parts: Iterable[str]) -> str | None:
    for part in parts:
        m = _SUBJECT.match(part)
        if m:
            return m.group(1)
    return None


def reason_kind(reason: str) -> str:
    """A quarantine reason without its details (the part before the first colon)."""
    return reason.split(":", 1)[0].strip() or "unknown"


def collect(paths: Paths) -> Counts:
    c = Counts()
    from . import inventory
    try:
        table = inventory.read(paths.restricted, columns=["subject", "status"])
        ok = [s for s, st in zip(table["subject"].to_pylist(), table["status"].to_pylist()) if st == "ok"]
        c.files_in, c.subjects_in = len(ok), len({s for s in ok if s})
    except (OSError, ValueError, KeyError, ImportError):
        pass
    subjects = set()
    root = str(paths.output)
    qc = os.path.join(root, QC_SUBDIR)
    for folder, dirs, files in os.walk(root):  # no Path object per file: 10,000 subjects in 0.1 s
        if folder == qc:
            dirs[:] = []
            continue
        rel = folder[len(root) + 1:]
        folder_sub = _subject_of(rel.split(os.sep)) if rel else None
        for name in files:
            sub = folder_sub or _subject_of((name,))
            if sub:
                subjects.add(sub)
                c.released_files += 1
            elif rel or name != MARKER:  # the marker of an unfinished run is not a file of the release
                c.dataset_files += 1
    c.released_subjects = sorted(subjects)
    q = paths.restricted / "quarantine.tsv"
    for line in q.read_text(encoding="utf-8", errors="replace").splitlines()[1:] if q.is_file() else ():
        if line:
            c.quarantined[reason_kind(line.partition("\t")[2])] += 1
    done = paths.restricted / "done"
    c.faces_ran = (done / "face").is_dir()
    for m in sorted((done / "face").glob("*.json")):
        for img in _json(m).get("images", ()):
            c.faces["withheld" if img.get("withheld") else (img.get("method") or "none")] += 1
    current = current_subjects(paths.restricted)
    for m in sorted((done / "verify").glob("*.json")):
        for s, r in _json(m).get("subjects", {}).items():
            if current is not None and s not in current:
                continue  # withdrawn: its unit's last leak-scan record stays in the restricted folder
            c.scanned_subjects += 1
            c.scanned_files += int(r.get("files", 0) or 0)
            if r.get("hits"):
                c.leaky.append(s)
    ds = _json(done / "verify_dataset.json")
    c.scanned_files += int(ds.get("files", 0) or 0)
    if ds.get("hits"):
        c.leaky.append("dataset")
    for audit in sorted((paths.restricted / "audit").glob("*.jsonl")):
        for line in audit.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"pixels"' not in line:
                continue
            pix = json.loads(line).get("pixels") or {}
            if pix.get("action") in ("redacted", "blanked"):
                c.pixel_images += 1
                c.pixel_boxes += len(pix.get("redactions") or ())
    report = paths.output / QC_SUBDIR / "report.html"
    c.report = report if report.is_file() else None
    return c


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('x') else 's')}"


def lines(c: Counts, paths: Paths, *, finished: bool) -> list[str]:
    """The summary as printed at the end of ``deidflow run`` (≤ 12 lines); ``finished``: every job
    of the run succeeded."""
    nq = sum(c.quarantined.values())
    complete = finished and not c.leaky and not c.withheld_subjects and not nq
    head = ("release complete" if complete else "release finished, with files withheld"
            if finished and not c.leaky else "RELEASE INCOMPLETE")
    out = [f"deidflow: {head}: "
           f"{_n(len(c.released_subjects), 'subject')}, {_n(c.released_files, 'file')} "
           f"(+{c.dataset_files} dataset files) in {paths.output}"]
    out.append(f"  withheld:    {_n(c.withheld_subjects, 'subject')} of {c.subjects_in}")
    reasons = "; ".join(f"{n} {k}" for k, n in c.quarantined.most_common(4))
    more = "; …" if len(c.quarantined) > 4 else ""
    out.append(f"  quarantined: {_n(nq, 'input file')}" + (f" ({reasons}{more})" if nq else ""))
    faces = c.faces
    out.append(f"  faces:       {faces['deface']} defaced, {faces['skullstrip']} skull-stripped, "
               f"{faces['withheld']} withheld"
               f" ({faces['none']} images not head MRI or not treated by configuration)" if c.faces_ran else
               "  faces:       not treated (the face stage did not run: face.method none)")
    out.append(f"  pixels:      {_n(c.pixel_images, 'image')} cleaned, {_n(c.pixel_boxes, 'text box')} redacted")
    leak = f"LEAK in {', '.join(c.leaky)}" if c.leaky else "no identifying value found"
    out.append(f"  leak scan:   {_n(c.scanned_subjects, 'subject')}, {_n(c.scanned_files, 'file')}: {leak}")
    if c.report:
        out.append(f"deidflow: QC report: {c.report}")
    out.append(f"  restricted (mappings, audit, quarantine list, logs; never share): {paths.restricted}")
    if complete or (finished and not c.leaky):
        out.append("  next: review the QC report and quarantine list, then share the release folder only.")
    else:
        out.append("  next: read the reasons above and in quarantine.tsv, fix them, and run the same command again.")
    return out
