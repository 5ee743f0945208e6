"""Pixel leak check: the released images the screen or the cleaner touched, read again.

The ``dicom`` job records, per series, which released files had burned-in text (cleaned, or
left because cleaning was switched off for the series) and which of their frames
(``check`` in ``<restricted>/pixels/<subject>.json``, see :mod:`.subject`).  The verify job
reads those frames of the files as they are about to be released with the same detector and
recognizer the cleaner uses (both tone curves, full resolution, every box read) and matches
every text read against the subject's identifiers with the leak scan's matcher
(:func:`identifier_finder`, the one place that knows the matcher's interface).  A name the
redaction missed is a leak like any other: the hit names the file and frame and a keyed hash
of the value, never the value.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

FACTS_DIR = "pixels"
Finder = Callable[[str], Iterable]  # OCR text -> needles found (kind, field, digest, owner)


def facts_path(restricted: Path, subject: str) -> Path:
    """Where the pixel facts of ``subject`` are kept (restricted, 0600; written by :mod:`.subject`)."""
    return Path(restricted) / FACTS_DIR / f"{subject}.json"


def identifier_finder(matcher) -> Finder:
    """The leak scan's identifier matcher as a function of OCR text.  OCR reads O for 0, I or l
    for 1 next to digits: the text is also tried with those folded to digits."""
    from .identify import _DIGIT_CONTEXT, _DIGITISH

    def find(text: str) -> list:
        out, seen = [], set()
        for variant in {text, _DIGIT_CONTEXT.sub(lambda m: m.group().translate(_DIGITISH), text)}:
            for _, n in matcher.find(variant.encode("utf-8")):
                if id(n) not in seen:
                    seen.add(id(n))
                    out.append(n)
        return out
    return find


def files_to_check(restricted: Path, subject: str) -> list[tuple[str, list[int]]]:
    """(release name, frames) of every file the pixel step found text in, from the facts file
    (none when the subject has no facts: pixels were not screened or cleaned)."""
    p = facts_path(restricted, subject)
    if not p.is_file():
        return []
    doc = json.loads(p.read_text(encoding="utf-8"))
    return [(c["file"], list(c["frames"])) for s in doc.get("series", ()) for c in s.get("check", ())]


def pixel_hits(root: Path, restricted: Path, subject: str, find: Finder) -> tuple[list[dict], int]:
    """Leak-scan hits in the burned-in text of ``subject``'s released images under ``root``
    (the release root the facts' names start from), and the number of frames read."""
    todo = files_to_check(restricted, subject)
    if not todo:
        return [], 0
    import pydicom

    from .clean import PixelCleaner
    from .pixeldata import Frames
    reader = PixelCleaner({"clean": "always"}, thumbnails=False)
    hits: list[dict] = []
    read = 0
    for name, frames in todo:
        path = Path(root) / name
        if not path.is_file():  # withheld or dropped after the facts were written: nothing released
            continue
        try:
            f = Frames(pydicom.dcmread(path))
        except Exception as exc:  # a released image that cannot be read cannot be shown clean
            hits.append({"file": name, "location": f"pixel data (unreadable: {type(exc).__name__})",
                         "kind": "pixels", "field": "burned-in text", "value_hash": "", "owner": subject})
            continue
        for k in frames:
            if not 0 <= k < f.n:
                continue
            frame = f.frame(k)
            read += 1
            found = {}
            for _, texts, _ in reader._read(frame, f.invert, frame.shape[:2], text=True):
                for t in texts:
                    for n in find(t):
                        found[(n.digest, n.field)] = n
            for n in found.values():
                hits.append({"file": name, "location": f"pixel data frame {k} (burned-in text)", "kind": n.kind,
                             "field": n.field, "value_hash": n.digest, "owner": n.owner})
    return hits, read
