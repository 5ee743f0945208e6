"""Captions of the QC pictures a release holds (``derivatives/deidflow/qc/<subject>/<stage>/index.json``).

A caption is fixed text around a few values (the image's release path, counts, the backend). The
fixed text is the release's own wording, not data: a family name ``RED`` was found in "removed
region outlined in red" and withheld every subject so called (red-team 7). The leak scan searches
the values of a caption that has one of these forms (:func:`values_of`), and the whole caption
otherwise, so that a value is still searched wherever it stands.
"""
from __future__ import annotations

import re

FACE_FRONT = "{image}: skin surface seen from the front, {when} ({what} by {backend})"
FACE_SLICES = "{image}: sagittal, coronal and axial slices after ({what} by {backend}); removed region outlined in red"
PIXELS = "{image}: {boxes} box(es) blanked in {frames} of {total} frame(s) ({action})"
FORMS = (FACE_FRONT, FACE_SLICES, PIXELS)
# fields that take one of the release's own words only; every other field is a value and is searched
_FIXED = {"when": "before|after", "what": "defaced|skull-stripped", "boxes": r"\d+", "frames": r"\d+",
          "total": r"\d+"}


def _pattern(form: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", form)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?:{_FIXED[part]})" if part in _FIXED else f"(?P<{part}>.*?)")
    return re.compile("".join(out), re.DOTALL)


_PATTERNS = [_pattern(f) for f in FORMS]


def values_of(caption: str) -> list[str] | None:
    """The values of a caption written in one of :data:`FORMS` (what the leak scan searches), or
    None when it has none of them (the whole caption is searched)."""
    for pat in _PATTERNS:
        m = pat.fullmatch(caption)
        if m:
            return list(m.groupdict().values())
    return None
