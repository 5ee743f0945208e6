"""FreeSurfer MGH / MGZ (gzipped MGH).

Layout: a 284-byte big-endian header (90 bytes of fields, then unused space), the voxel data,
then an optional trailer: five floats of scan parameters (TR, flip angle, TE, TI, FoV) and
free-form tags (the command lines that made the file, the path of the talairach transform —
paths and user names that often name the subject).  The header fields and voxel bytes are
copied unchanged, the unused header space is zeroed, the five scan parameters are kept and
every tag is dropped.  ``.mgz`` stays gzipped (deterministic: no name, no time stamp).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from .base import Format, FormatError, Outputs, ScrubContext, ScrubResult, copy_exact

HEADER = 284
USED = 90
_TYPES = {0: 1, 1: 4, 3: 4, 4: 2, 10: 2}  # MRI_UCHAR, MRI_INT, MRI_FLOAT, MRI_SHORT, MRI_USHRT
GZIP_LEVEL = 6


def _is_gz(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open(path: Path):
    return gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")


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
        with _open(Path(path)) as fh:
            _parse(fh.read(HEADER))
    except (OSError, EOFError, zlib.error) as exc:
        raise FormatError(f"MGH header unreadable ({type(exc).__name__})") from None
    return {}


def companions(path: Path) -> list[Path]:
    return []


def extension(path: Path) -> str:
    return ".mgz" if _is_gz(Path(path)) else ".mgh"


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    gz = _is_gz(src)
    try:
        with _open(src) as fh, Outputs() as out:
            head = fh.read(HEADER)
            nbytes = _parse(head)
            new_head = head[:USED] + bytes(HEADER - USED)
            if head[USED:].strip(b"\x00"):
                res.act("unused header bytes", "zeroed")
            raw = open(out.path(dst), "wb")
            try:
                sink = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL,
                                     mtime=0) if gz else raw
                sink.write(new_head)
                got = copy_exact(fh, sink, nbytes)
                if got < nbytes:
                    raise FormatError(f"truncated: {got} of {nbytes} voxel bytes present")
                params = fh.read(20)
                if len(params) == 20:
                    sink.write(params)
                    res.act("scan parameters (TR, flip angle, TE, TI, FoV)", "kept")
                rest = fh.read(1 << 20)
                if rest:
                    res.found("tags", rest[:2000].replace(b"\x00", b" "))
                    res.act("tags", "removed")
                if gz:
                    sink.close()
            finally:
                raw.close()
            res.outputs = out.finals
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FormatError(f"compressed stream damaged ({type(exc).__name__})") from None
    return res


FORMAT = Format(name="mgh", release_dir="mgh", identity=identity, companions=companions, scrub=scrub,
                extension=extension)
