"""Recognise a file's format from its first bytes (content, not extension).

Formats: ``dicom`` (with or without the 128-byte preamble), ``nifti1``, ``nifti2``,
``analyze``, ``minc1`` (NetCDF), ``minc2`` (HDF5), ``parrec`` (Philips PAR text), ``rec``
and ``img`` (raw companions of PAR and Analyze/NIfTI-pair headers, recognised by their
header sibling), ``twix`` (Siemens raw data, VB and VD/VE), ``tiff``, ``mgh``, ``json``;
``empty`` for zero-byte files and ``unknown`` for everything else.  Gzip files are looked into:
gzip-compressed DICOM (``.dcm.gz``, any ``.gz`` with a DICOM data set inside) is ``dicom`` (see
:func:`is_gzip` and :func:`decompressed`), gzipped NIfTI/MGH/JSON their format.  Archives are
recognised so that their quarantine says what they are (:data:`ARCHIVES`): ``zip``, ``tar``
(also gzipped), ``7z``, ``rar``, ``bzip2``, ``xz`` and ``gzip`` (of anything else); deidflow does not
unpack archives.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HEAD = 512
_EXPLICIT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                 b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
                 b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_PAR_MARKERS = (b"# === DATA DESCRIPTION FILE", b". Patient name", b"Philips Medical Systems")
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
GZIP_MAGIC = b"\x1f\x8b"
_ARCHIVE_MAGICS = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"),
                   (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
ARCHIVES = ("zip", "tar", "7z", "rar", "bzip2", "xz", "gzip")


def sniff_bytes(head: bytes) -> str:
    """Format of a file whose first (up to 512) bytes are ``head``; see the module docstring."""
    if not head:
        return "empty"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, name in _ARCHIVE_MAGICS:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:4] in (b"CDF\x01", b"CDF\x02"):
        return "minc1"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "minc2"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    if len(head) >= 348:
        for e in "<>":
            size = struct.unpack(e + "i", head[:4])[0]
            if size == 348:
                return "nifti1" if head[344:347] in (b"n+1", b"ni1") else "analyze"
            if size == 540 and head[4:7] in (b"n+2", b"ni2"):
                return "nifti2"
    if any(m in head for m in _PAR_MARKERS):
        return "parrec"
    if _looks_like_twix(head):
        return "twix"
    if _looks_like_raw_dicom(head):
        return "dicom"
    if len(head) >= 284 and struct.unpack(">i", head[:4])[0] == 1 and 0 < struct.unpack(">i", head[4:8])[0] < 1 << 16:
        return "mgh"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") and b'"' in stripped[:64]:
        return "json"
    return "unknown"


def _looks_like_twix(head: bytes) -> bool:
    if len(head) < 32:
        return False
    a, b = struct.unpack("<II", head[:8])
    if a == 0 and 1 <= b <= 64:  # VD/VE multi-raid: MrParcRaidFileHeader, then entries
        offset = struct.unpack("<Q", head[16:24])[0]
        return offset % 512 == 0 and offset >= 512
    return head[8:15] == b"Config\x00" and a > 8  # VB: header length, buffer count, "Config"


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A data set without preamble: starts with a group 0002 or 0008 element (explicit or implicit VR)."""
    if len(head) < 8:
        return False
    group, elem = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or elem > 0x0100:
        return False
    if head[4:6] in _EXPLICIT_VRS:
        return True
    length = struct.unpack("<I", head[4:8])[0]
    return length < 1024


def sniff(path: str | Path) -> str:
    """Format of the file at ``path``; raises OSError when it cannot be read."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(HEAD)
    if head[:2] == GZIP_MAGIC:
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(HEAD)
        except (OSError, EOFError, zlib.error):
            return "unknown"
        fmt = sniff_bytes(inner)
        if fmt in ("nifti1", "nifti2", "mgh", "dicom", "json", "tar"):
            return fmt
        return "gzip" if inner else "unknown"
    fmt = sniff_bytes(head)
    if fmt == "unknown":
        suffix = path.suffix.lower()
        if suffix == ".rec" and any(path.with_suffix(s).exists() for s in (".PAR", ".par")):
            return "rec"
        if suffix == ".img" and any(path.with_suffix(s).exists() for s in (".hdr", ".HDR")):
            return "img"
    return fmt


def is_gzip(path: str | Path) -> bool:
    """True when the file at ``path`` is gzip-compressed (by its magic number)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


@contextmanager
def decompressed(path: str | Path, tmp_dir: str | Path) -> Iterator[Path]:
    """``path`` itself when it is not gzip-compressed, else a private (0600) decompressed copy in
    ``tmp_dir`` (a restricted folder: the copy holds the original's identifiers), removed on exit.
    Raises OSError (a damaged gzip stream included) when it cannot be decompressed."""
    path = Path(path)
    if not is_gzip(path):
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=".gunzip-", suffix=".dcm", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as gz:
            try:
                shutil.copyfileobj(gz, out, 1 << 20)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise OSError(f"damaged gzip stream ({type(exc).__name__})") from None
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
