"""FreeSurfer MGH / MGZ (gzipped MGH).

Layout: a 284-byte big-endian header (90 bytes of fields, then unused space), the voxel data,
then an optional trailer: five floats of scan parameters (TR, flip angle, TE, TI, FoV) and
free-form tags (the command lines that made the file, the path of the talairach transform —
paths and user names that often name the subject).  The header fields and voxel bytes are
copied unchanged, the unused header space is zeroed, the five scan parameters are kept (one
that writes an identifier of the subject, an MRN stored as a number, is zeroed) and
every tag is dropped.  ``.mgz`` stays gzipped (deterministic: no name, no time stamp).
"""
from __future__ import annotations

import struct
from pathlib import Path

from .base import (GZIP_ERRORS, Format, FormatError, ScrubContext, ScrubResult, copy_exact, scrub_stream,
                   is_gzip, open_input)
from ..fsutil import output_stream

HEADER = 284
USED = 90
_TYPES = {0: 1, 1: 4, 3: 4, 4: 2, 10: 2}  # MRI_UCHAR, MRI_INT, MRI_FLOAT, MRI_SHORT, MRI_USHRT
_PARAMS = ("TR", "flip angle", "TE", "TI", "FoV")


def _parse(head: bytes) -> int:
    """Voxel bytes the header describes; FormatError for a damaged header."""
    if len(head) < HEADER:
        raise FormatError("truncated MGH header (shorter than 284 bytes)")
    version, w, h, d, frames, typ = struct.unpack(">6i", head[:24])
    if version != 1:
        raise FormatError("MGH version is not 1")
    if min(w, h, d, frames) < 1:
        raise FormatError("MGH dimension is zero or negative")
    if typ not in _TYPES:
        raise FormatError(f"MGH data type {typ} unknown")
    return w * h * d * frames * _TYPES[typ]


def identity(path: Path) -> dict:
    try:
        with open_input(Path(path)) as fh:
            _parse(fh.read(HEADER))
    except (OSError, *GZIP_ERRORS) as exc:
        raise FormatError(f"MGH header unreadable ({type(exc).__name__})") from None
    return {}


def companions(path: Path) -> list[Path]:
    return []


def extension(path: Path) -> str:
    return ".mgz" if is_gzip(Path(path)) else ".mgh"


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    res = ScrubResult()
    with scrub_stream(Path(src)) as (fh, out, gz):
        head = fh.read(HEADER)
        nbytes = _parse(head)
        new_head = head[:USED] + bytes(HEADER - USED)
        if head[USED:].strip(b"\x00"):
            res.act("unused header bytes", "zeroed")
        with output_stream(out.path(Path(dst)), gz) as sink:
            sink.write(new_head)
            got = copy_exact(fh, sink, nbytes)
            if got < nbytes:
                raise FormatError(f"truncated: {got} of {nbytes} voxel bytes present")
            params = fh.read(20)
            if len(params) == 20:
                values = list(struct.unpack(">5f", params))
                for i in ctx.identifying_numbers(values):  # an MRN or a birth date stored as a number
                    values[i] = 0.0
                    res.act(f"scan parameter {_PARAMS[i]}", "emptied (it wrote an identifier)")
                sink.write(struct.pack(">5f", *values) if values != list(struct.unpack(">5f", params)) else params)
                res.act("scan parameters (TR, flip angle, TE, TI, FoV)", "kept")
            rest = fh.read(1 << 20)
            if rest:
                res.found("tags", rest[:2000].replace(b"\x00", b" "))
                res.act("tags", "removed")
        res.outputs = out.finals
    return res


FORMAT = Format(name="mgh", release_dir="mgh", identity=identity, companions=companions, scrub=scrub,
                extension=extension)
