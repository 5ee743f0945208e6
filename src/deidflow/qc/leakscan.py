"""Leak scan: search every file of a release for the original identifying values of its subjects.

What is searched for (per subject, from :mod:`deidflow.qc.identifiers` and the unit's manifest):
names and their parts, IDs, UIDs, dates in common textual forms, times, original file and folder
names.  Forms that identify nobody are excluded by the rules in ``data/leakscan.yaml`` and counted.

Where: every release file of the subject's folders (``sub-X/``, ``sourcedata/*/sub-X/``,
``derivatives/**/sub-X/``, files named ``sub-X_*``) — its path, its raw bytes, the content of
gzip files, DICOM headers at any depth (a DICOM header's bytes *are* its elements, nested and private
ones included; files in character sets other than ASCII/Latin-1/UTF-8 and deflated files are parsed
and searched element by element), NIfTI headers and extensions, JSON strings after unescaping, PNG
chunks (text chunks decompressed; the compressed image samples only with ``pixel_data``), TIFF
headers and tag values (strips and tiles only with ``pixel_data``).
Dataset-level files (``participants.tsv``, the report, …) are searched for every subject's values.

Matching: case-insensitive, as whole tokens (a value that starts or ends with a letter must not
touch another letter there, one with a digit not another digit or a decimal point between digits),
so ``MARY`` is not found in ``PRIMARY`` and a date is not found inside a UID; UIDs match whole
UIDs; values with non-ASCII characters match anywhere (CJK text has no word breaks).  A hit names
the file and the place (DICOM element path, NIfTI field or extension, JSON key, line, byte offset)
and a keyed hash of the value, never the value.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import stat
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..fsutil import QC_SUBDIR, RESTRICTED_FILE_MODE, atomic_write_bytes, display_path, layout_parents, make_restricted_dir
from ..sniff import TIFF_MAGICS
from . import captions
from . import identifiers as idmod
from .identifiers import Matcher, Needle, needles_for, rules

SALT_FILE = "qc/leakscan.salt"
_CHARSET_TERMS = re.compile(rb"ISO[ _]2022[ _]IR[ _]\d+|ISO_IR[ _]\d+|GB18030|GBK")
_SAFE_CHARSETS = {b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 6", b"ISO 2022 IR 100"}
_DEFLATED = b"1.2.840.10008.1.2.1.99"
_SUBJECT_DIR = re.compile(r"^sub-[A-Za-z0-9]+$")
_SUBJECT_FILE = re.compile(r"^(sub-[A-Za-z0-9]+)_")
_NIFTI1_FIELDS = ((4, 14, "data_type"), (14, 32, "db_name"), (148, 228, "descrip"), (228, 252, "aux_file"),
                  (328, 344, "intent_name"))
_NIFTI2_FIELDS = ((240, 320, "descrip"), (320, 344, "aux_file"), (508, 524, "intent_name"))
CHUNK = 1 << 24


def _nifti_numbers() -> dict[int, dict[str, tuple[int, str]]]:
    """The numeric NIfTI-1 and NIfTI-2 header fields a value could be stored in as a number."""
    from ..formats.nifti import NIFTI1_NUMBERS, NIFTI2_NUMBERS
    return {1: NIFTI1_NUMBERS, 2: NIFTI2_NUMBERS}


@dataclass
class Hit:
    """One found value: where (file, location) and what (kind, the attribute or field the value
    was taken from, keyed hash, owner subject) — never the value itself."""

    file: str
    location: str
    kind: str
    field: str
    value_hash: str
    owner: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def load_salt(restricted: Path) -> bytes:
    """The restricted folder's random key for value hashes (created on first use): hashes in the
    report identify a value only to someone who holds the restricted folder."""
    path = Path(restricted) / SALT_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        make_restricted_dir(path.parent)
        atomic_write_bytes(path, secrets.token_bytes(16), RESTRICTED_FILE_MODE)
        return path.read_bytes()


def manifest_paths(subject_entry: Mapping) -> list[tuple[str, str, str]]:
    """Original folder and file names of a subject's input files (from its manifest entry)."""
    parts: set[str] = set()
    for f in subject_entry.get("files", ()):
        rel = display_path(f["relpath"]) if isinstance(f["relpath"], str) else str(f["relpath"])
        parts.update(p for p in rel.split("/") if p)
    return [("path", "file or folder name", p) for p in sorted(parts)]


# ------------------------------------------------------------------------------------------------
# Files of a subject
# ------------------------------------------------------------------------------------------------
def subject_files(release: Path, subjects: Iterable[str]) -> dict[str, list[Path]]:
    """The release files of each of ``subjects`` (their folders anywhere in the usual layouts, and
    files named ``<subject>_*``): each folder of the layouts is listed once for all of them."""
    release = Path(release)
    wanted = set(subjects)
    parents = layout_parents(release)
    out: dict[str, list[Path]] = {s: [] for s in sorted(wanted)}
    for parent in parents:  # per folder: a subject's own folder (sorts first), then its named files
        try:
            entries = sorted(os.scandir(parent), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for e in entries:
            if e.name in wanted and e.is_dir(follow_symlinks=False):
                out[e.name] += _walk_files(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                for i in (i for i, c in enumerate(e.name) if c == "_"):
                    if e.name[:i] in wanted:
                        out[e.name[:i]].append(Path(e.path))
    return out


def dataset_files(release: Path) -> list[Path]:
    """Release files that belong to no subject (dataset description, participants table, …).  The
    report's own files (``derivatives/deidflow/qc/report.html`` …) are left out: the dataset gate
    checks them with the report's own words as exceptions; anything else in that folder is not."""
    from ..publish import REPORT_FILES
    out = []
    own = Path(release) / QC_SUBDIR
    for root, dirs, files in os.walk(release):
        dirs[:] = sorted(d for d in dirs if not _SUBJECT_DIR.match(d))
        mine = REPORT_FILES if Path(root) == own else ()
        out += [Path(root) / f for f in sorted(files)
                if not _SUBJECT_FILE.match(f) and f not in mine and _plain_file(Path(root) / f)]
    return out


def _walk_files(d: Path) -> list[Path]:
    """The plain files under ``d``: a link or a FIFO is not read (a FIFO blocked ``deidflow verify``
    for ever, a link to ``/dev/zero`` would never end); :func:`not_plain_entries` reports them."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs.sort()
        out += [Path(root) / f for f in sorted(files) if _plain_file(Path(root) / f)]
    return out


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Scanning one file
# ------------------------------------------------------------------------------------------------
@dataclass
class FileScan:
    hits: list[Hit] = field(default_factory=list)
    scanned: int = 0  # bytes searched
    skipped: int = 0  # image bytes not searched (pixel data, NIfTI image block)
    notes: list[str] = field(default_factory=list)


def scan_file(path: Path, rel: str, matcher: Matcher, *, pixel_data: bool = False) -> FileScan:
    """Search one release file (its path and its content) for the matcher's values."""
    res = FileScan()
    if matcher.empty():
        return res
    name_bytes = rel.encode("utf-8", "surrogateescape")
    name_hits = matcher.find(name_bytes)
    if name_hits:  # the path itself would show the value: name the file with that part withheld
        parts = rel.split("/")
        starts = [len("/".join(parts[:i]).encode("utf-8", "surrogateescape")) + (1 if i else 0) for i in range(len(parts))]
        for off, n in name_hits:
            i = max(j for j, st in enumerate(starts) if st <= off)
            parts[i] = f"[name withheld, hash {n.digest}]"
        shown = "/".join(parts)
        for off, n in name_hits:
            where = "file name" if off >= name_bytes.rfind(b"/") + 1 else "folder name"
            res.hits.append(_hit(shown, where, n))
        rel = shown
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(540)
            low = path.name.lower()
            if head[128:132] == b"DICM":
                _scan_dicom(path, rel, head, size, matcher, res, pixel_data)
            elif head[:8] == _PNG_MAGIC:
                fh.seek(0)
                _scan_png(fh.read(), rel, matcher, res, pixel_data)
            elif head[:4] in TIFF_MAGICS:
                _scan_tiff(fh, path, rel, matcher, res, pixel_data, size)
            elif head[:2] == b"\x1f\x8b":
                _scan_gzip(path, rel, matcher, res, pixel_data, nifti=low.endswith((".nii.gz", ".hdr.gz")))
            elif low.endswith((".nii", ".hdr")) and _nifti_kind(head):
                fh.seek(0)
                _scan_nifti(fh.read(), rel, "", matcher, res, pixel_data, size)
            elif low.endswith(".img") and not pixel_data and (path.with_suffix(".hdr").exists()):
                res.skipped += size  # Analyze / NIfTI-pair image block: samples only
            elif low.endswith(".json"):
                fh.seek(0)
                _scan_json(fh.read(), rel, "", matcher, res)
            else:
                fh.seek(0)
                _scan_stream(fh, rel, "", matcher, res, text=low.endswith((".tsv", ".csv", ".txt", ".html",
                                                                          ".md", ".bval", ".bvec")))
    except OSError as exc:
        _unscanned(res, rel, f"not readable ({exc.strerror})")
    return res


def _unscanned(res: FileScan, rel: str, why: str) -> None:
    """A release file whose content could not be searched, whole or in part: a hit of kind
    ``unscanned``, so the subject is withheld like one with a found value (fail closed: what was
    not read was not verified), and a note."""
    res.notes.append(f"{rel}: {why}")
    res.hits.append(Hit(rel, f"not scanned: {why}", "unscanned", "content", "", ""))


def _hit(rel: str, location: str, n: Needle) -> Hit:
    return Hit(rel, location, n.kind, n.field, n.digest, n.owner)


def _scan_stream(fh, rel: str, prefix: str, matcher: Matcher, res: FileScan, *, text: bool, base: int = 0) -> None:
    """Raw bytes, in chunks that overlap by more than the longest value (``base``: the file offset
    of the stream's first byte)."""
    overlap = 4096
    carry = b""
    start = base  # file offset of buf[0]
    lines = 0  # newlines before buf[0]
    while True:
        chunk = fh.read(CHUNK)
        if not chunk:
            break
        buf = carry + chunk
        for off, end, n in matcher.spans(buf):
            if carry and end <= len(carry):
                continue  # found in the previous chunk already
            line = lines + buf.count(b"\n", 0, off) + 1
            where = f"line {line}" if text else f"byte offset {start + off}"
            res.hits.append(_hit(rel, prefix + where, n))
        res.scanned += len(chunk)
        carry = buf[-overlap:]
        lines += buf.count(b"\n", 0, len(buf) - len(carry))
        start += len(buf) - len(carry)
    _dedupe(res)


def _dedupe(res: FileScan) -> None:
    seen, out = set(), []
    for h in res.hits:
        key = (h.file, h.location, h.value_hash, h.owner, h.kind)
        if key not in seen:
            seen.add(key)
            out.append(h)
    res.hits = out


def _scan_json(data: bytes, rel: str, prefix: str, matcher: Matcher, res: FileScan) -> None:
    res.scanned += len(data)
    try:
        doc = json.loads(data)
    except ValueError:
        for off, n in matcher.find(data):
            res.hits.append(_hit(rel, prefix + f"byte offset {off}", n))
        return
    # values, and keys below the top level (top-level keys are the format's own words: a released
    # sidecar's are allow-listed; an object inside a field may be keyed by anything); a key holding
    # a value is named by its position in the locations, which the terminal and restricted lists show
    shown = lambda k: not matcher.find(k.encode("utf-8"))  # noqa: E731
    qc_index = not prefix and rel.startswith(QC_SUBDIR + "/") and rel.endswith("/index.json")
    for where, text in _json_strings(doc, "", shown):
        # a QC caption's own wording is not searched, its values are (captions.values_of)
        values = captions.values_of(text) if qc_index and _CAPTION.fullmatch(where) else None
        for part in [text] if values is None else values:
            for _, n in matcher.find(part.encode("utf-8")):
                res.hits.append(_hit(rel, prefix + f"JSON {where or '(top level)'}", n))
    _dedupe(res)


_CAPTION = re.compile(r"\[\d+\]\.caption")


def _json_strings(doc, path: str, shown=lambda k: True) -> Iterator[tuple[str, str]]:
    """(where, text) of every value and of every object key below the top level of a JSON
    document; a location names a key only when ``shown(key)``, else by its position (``key 2``)."""
    if isinstance(doc, dict):
        for i, (k, v) in enumerate(doc.items()):
            k = str(k)
            if path:
                yield f"{path} key {i}", k
            name = k if shown(k) else f"key {i}"
            yield from _json_strings(v, f"{path}.{name}" if path else name, shown)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _json_strings(v, f"{path}[{i}]", shown)
    elif doc is not None:
        yield path, str(doc)


def _nifti_kind(head: bytes) -> int:
    """1 or 2 for a NIfTI-1/Analyze or NIfTI-2 header (either byte order), else 0."""
    if len(head) < 348:
        return 0
    for e in "<>":
        (n,) = struct.unpack(e + "i", head[:4])
        if n == 348:
            return 1
        if n == 540:
            return 2
    return 0


def _scan_nifti(data: bytes, rel: str, prefix: str, matcher: Matcher, res: FileScan, pixel_data: bool,
                total: int) -> None:
    """Header fields and extensions; the image block only with ``pixel_data``."""
    kind = _nifti_kind(data)
    little = struct.unpack("<i", data[:4])[0] in (348, 540)
    e = "<" if little else ">"
    if kind == 2:
        vox = int(struct.unpack(e + "q", data[168:176])[0])
        ext_start, fields = 544, _NIFTI2_FIELDS
    else:
        vox = int(struct.unpack(e + "f", data[108:112])[0])
        ext_start, fields = 352, _NIFTI1_FIELDS
    header_end = min(len(data), vox) if vox > 0 else len(data)
    header_end = max(header_end, min(len(data), ext_start))
    if rel.lower().endswith((".hdr", ".hdr.gz")):
        header_end = len(data)  # header of a pair: everything in it is header
    head = data[:header_end]
    res.scanned += len(head)
    exts = _nifti_extensions(head, ext_start, e)
    for off, n in matcher.find(head):
        res.hits.append(_hit(rel, prefix + _nifti_location(off, fields, exts, ext_start), n))
    # an MRN or a birth date stored as a number (intent_p1 …); Analyze has other fields there
    numbers = _nifti_numbers()[kind] if kind == 2 or head[344:347] in (b"n+1", b"ni1") else {}
    values = [struct.unpack_from(e + code, head, off)[0] for off, code in numbers.values()]
    for i, n in matcher.numbers(values):
        res.hits.append(_hit(rel, prefix + f"NIfTI header field {list(numbers)[i]} (a number)", n))
    body = total - header_end
    if pixel_data and len(data) > header_end:
        for off, n in matcher.find(data[header_end:]):
            res.hits.append(_hit(rel, prefix + f"image data, byte offset {header_end + off}", n))
        res.scanned += len(data) - header_end
    elif body > 0:
        res.skipped += body
    _dedupe(res)


def _nifti_extensions(head: bytes, start: int, e: str) -> list[tuple[int, int, int]]:
    """(start, end, ecode) of each extension."""
    out = []
    if len(head) < start or head[start - 4] == 0:
        return out
    pos = start
    while pos + 8 <= len(head):
        esize, ecode = struct.unpack(e + "ii", head[pos:pos + 8])
        if esize < 8 or pos + esize > len(head):
            break
        out.append((pos, pos + esize, ecode))
        pos += esize
    return out


def _nifti_location(off: int, fields, exts, ext_start: int) -> str:
    for a, b, name in fields:
        if a <= off < b:
            return f"NIfTI header field {name}"
    for i, (a, b, code) in enumerate(exts):
        if a <= off < b:
            return f"NIfTI extension {i} (ecode {code})"
    if off >= ext_start:
        return f"NIfTI extension area, byte offset {off}"
    return f"NIfTI header, byte offset {off}"


def _scan_gzip(path: Path, rel: str, matcher: Matcher, res: FileScan, pixel_data: bool, nifti: bool) -> None:
    limit = rules()["max_gunzip_bytes"]
    prefix = "gunzipped content, "
    try:
        with gzip.open(path, "rb") as gz:
            if nifti:
                head = gz.read(544)
                if _nifti_kind(head):
                    e = "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"
                    vox = (int(struct.unpack(e + "q", head[168:176])[0]) if _nifti_kind(head) == 2
                           else int(struct.unpack(e + "f", head[108:112])[0]))
                    want = len(head) if rel.lower().endswith(".hdr.gz") else max(vox, 544)
                    if pixel_data or rel.lower().endswith(".hdr.gz"):
                        data = head + gz.read(limit)
                    else:
                        data = head + gz.read(max(0, min(want, limit) - len(head)))
                    total = len(data)
                    if not pixel_data:
                        rest = _count_rest(gz)
                        total += rest
                    _scan_nifti(data, rel, prefix, matcher, res, pixel_data, total)
                    return
                rest = io.BytesIO(head + gz.read(limit))
            else:
                rest = io.BytesIO(gz.read(limit))
            if gz.read(1):
                _unscanned(res, rel, f"gunzipped content larger than {limit} bytes, scanned in part")
        data = rest.getvalue()
        if rel.lower().endswith(".json.gz"):
            _scan_json(data, rel, prefix, matcher, res)
        else:
            _scan_stream(io.BytesIO(data), rel, prefix, matcher, res,
                         text=rel.lower().endswith((".tsv.gz", ".txt.gz", ".csv.gz")))
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        _unscanned(res, rel, f"gzip content unreadable ({type(exc).__name__}); raw bytes scanned")
        with open(path, "rb") as fh:
            _scan_stream(fh, rel, "", matcher, res, text=False)


def _count_rest(gz) -> int:
    n = 0
    while True:
        b = gz.read(CHUNK)
        if not b:
            return n
        n += len(b)


# ------------------------------------------------------------------------------------------------
# PNG (QC renderings)
# ------------------------------------------------------------------------------------------------
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_chunks(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(type, body) of every chunk up to IEND, and the bytes after it; ValueError when damaged."""
    pos, chunks = 8, []
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated chunk")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if pos + 12 + length > len(data):
            raise ValueError("truncated chunk")
        chunks.append((ctype, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
        if ctype == b"IEND":
            break
    return chunks, data[pos:]


def _png_text(ctype: bytes, body: bytes) -> bytes | None:
    """The text of a compressed text chunk (zTXt, iTXt with its compression flag set), else None."""
    key, _, rest = body.partition(b"\0")
    if ctype == b"zTXt":
        return key + b"\n" + zlib.decompress(rest[1:])
    if ctype == b"iTXt" and rest[:1] == b"\x01":
        lang, _, rest = rest[2:].partition(b"\0")
        tkey, _, text = rest.partition(b"\0")
        return b"\n".join((key, lang, tkey, zlib.decompress(text)))
    return None


def _scan_png(data: bytes, rel: str, matcher: Matcher, res: FileScan, pixel_data: bool) -> None:
    """A PNG chunk by chunk: text chunks decompressed (zTXt, compressed iTXt), every other chunk's
    bytes, and anything after IEND. The image samples (IDAT, a zlib stream) are pixels: counted as
    not scanned, or decompressed and searched with ``pixel_data`` (their compressed bytes are noise
    in which a short value turns up by chance). A damaged PNG is searched as raw bytes."""
    try:
        chunks, trailer = _png_chunks(data)
    except (ValueError, struct.error) as exc:
        res.notes.append(f"{rel}: damaged PNG ({exc}); raw bytes scanned")
        _scan_stream(io.BytesIO(data), rel, "", matcher, res, text=False)
        return
    idat = b"".join(body for ctype, body in chunks if ctype == b"IDAT")
    for ctype, body in chunks:
        if ctype == b"IDAT":
            continue
        where = f"PNG {ctype.decode('latin-1')} chunk, "
        try:
            text = _png_text(ctype, body)
        except zlib.error:
            res.notes.append(f"{rel}: {where}not decompressible; raw bytes scanned")
            text = None
        _scan_stream(io.BytesIO(body if text is None else text), rel, where, matcher, res,
                     text=text is not None or ctype in (b"tEXt", b"iTXt"))
    if idat and pixel_data:
        try:
            _scan_stream(io.BytesIO(zlib.decompress(idat)), rel, "PNG image data, ", matcher, res, text=False)
        except zlib.error:
            res.notes.append(f"{rel}: PNG image data not decompressible; raw bytes scanned")
            _scan_stream(io.BytesIO(idat), rel, "PNG IDAT chunks, ", matcher, res, text=False)
    else:
        res.skipped += len(idat)
    if trailer:
        _scan_stream(io.BytesIO(trailer), rel, "after the PNG end, ", matcher, res, text=False)


# ------------------------------------------------------------------------------------------------
# TIFF (slides, pyramidal and plain TIFF)
# ------------------------------------------------------------------------------------------------
class _Window:
    """``fh`` from ``start`` up to ``end``, as a stream."""

    def __init__(self, fh, start: int, end: int):
        fh.seek(start)
        self.fh, self.left = fh, end - start

    def read(self, n: int) -> bytes:
        data = self.fh.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def _scan_tiff(fh, path: Path, rel: str, matcher: Matcher, res: FileScan, pixel_data: bool, size: int) -> None:
    """A TIFF (plain, pyramidal, Aperio SVS): every byte except its strips' and tiles' image data —
    headers, IFDs, every tag value (descriptions, XMP, JPEG tables, private tags) and any bytes no
    IFD points at. Compressed samples are noise in which a short value turns up by chance, and a
    slide's gigabytes of tiles would dominate the scan; with ``pixel_data`` every byte is searched.
    A TIFF whose structure cannot be read is searched whole, and said so."""
    from ..formats.base import FormatError
    from ..formats.tiff import read_structure
    blocks: list[tuple[int, int]] = []
    if not pixel_data:
        try:
            blocks = [(o, o + n) for page in read_structure(path).all_pages() for o, n in page.blocks if n > 0]
        except FormatError as exc:
            res.notes.append(f"{rel}: TIFF structure not readable ({exc}); raw bytes scanned")
    merged: list[list[int]] = []
    for a, b in sorted(blocks):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    pos = 0
    for a, b in [*merged, [size, size]]:
        if a > pos:
            _scan_stream(_Window(fh, pos, a), rel, "", matcher, res, text=False, base=pos)
        pos = max(pos, b)
    res.skipped += sum(b - a for a, b in merged)


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------
_PIXEL_TAGS = ((b"\xe0\x7f\x10\x00", "<"), (b"\xe0\x7f\x08\x00", "<"), (b"\xe0\x7f\x09\x00", "<"),
               (b"\x7f\xe0\x00\x10", ">"), (b"\x7f\xe0\x00\x08", ">"), (b"\x7f\xe0\x00\x09", ">"))


def pixel_region(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the top-level pixel data element's value, found from the end of the file and
    accepted only when its length field makes it end at the end of the file or before another
    element of group 7FE0 or higher; None when there is none (the whole file is then scanned)."""
    size = len(data)
    best = None
    for tag, e in _PIXEL_TAGS:
        i = data.rfind(tag)
        if i < 132:
            continue
        vr = data[i + 4:i + 6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"UN"):
            vstart, length = i + 12, struct.unpack(e + "I", data[i + 8:i + 12])[0] if i + 12 <= size else None
        else:  # implicit VR
            vstart, length = i + 8, struct.unpack(e + "I", data[i + 4:i + 8])[0] if i + 8 <= size else None
        if length is None:
            continue
        if length == 0xFFFFFFFF:  # encapsulated: up to the sequence delimiter
            d = data.rfind(b"\xfe\xff\xdd\xe0" if e == "<" else b"\xff\xfe\xe0\xdd")
            if d < vstart:
                continue
            vend = d + 8
        else:
            vend = vstart + length
        if vend > size:
            continue
        if vend < size:
            (g,) = struct.unpack(e + "H", data[vend:vend + 2]) if vend + 2 <= size else (0,)
            if g < 0x7FE0:
                continue
        if best is None or vstart < best[0]:
            best = (vstart, vend)
        if e == "<" and tag[2] == 0x10:
            break  # (7FE0,0010) little endian: the usual case, no need to look for the others
    return best


def _scan_dicom(path: Path, rel: str, head: bytes, size: int, matcher: Matcher, res: FileScan,
                pixel_data: bool) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    deflated = _DEFLATED in data[:4096]
    region = None if pixel_data or deflated else pixel_region(data)  # deflated: no element is found in the bytes
    segments = [(0, data)] if region is None else [(0, data[:region[0]]), (region[1], data[region[1]:])]
    if region is not None:
        res.skipped += region[1] - region[0]
        if why := _not_image(data, region):
            _unscanned(res, rel, why)
    header = segments[0][1]
    found: list[tuple[int, Needle]] = []
    for base, seg in segments:
        res.scanned += len(seg)
        found += [(base + off, n) for off, n in matcher.find(seg)]
    parse = deflated or any(t not in _SAFE_CHARSETS for t in _CHARSET_TERMS.findall(header))
    if found:
        for off, n in found:
            where = _dicom_location(path, n, off)
            if not _label_in_defined_term(n, where):
                res.hits.append(_hit(rel, where, n))
    if parse:
        for where, text in _dicom_strings(path, deflated=deflated):
            for _, n in matcher.find(text.encode("utf-8")):
                if not _label_in_defined_term(n, f"DICOM {where}"):
                    res.hits.append(_hit(rel, f"DICOM {where}", n))
    _dedupe(res)


def _not_image(data: bytes, region: tuple[int, int]) -> str | None:
    """Why the Pixel Data at ``region`` of ``data`` may hold more than what a decoder reads (the
    DICOM engine removes the rest, :mod:`deidflow.codestreams`): bytes after a frame, in the offset
    table or after the last native frame are not image, and the pixel data are not searched; None
    when it holds only its frames, or when the codestream is not one that is parsed (video).  A
    pixel module that cannot be read leaves nothing to measure the frames by (the engine withholds
    such files): not image either."""
    from ..codestreams import NATIVE, CodestreamError, image_extent, native_length
    from ..dicomio import pixel_format
    fmt = pixel_format(data)
    if fmt is None or fmt.geometry is None:
        return "Pixel Data without a readable image pixel module (its frames cannot be measured)"
    start, end = region
    if fmt.transfer_syntax in NATIVE and end - start <= native_length(fmt.geometry) + 1:
        return None  # the usual case, judged by the length alone
    value = data[start:end]
    try:
        if image_extent(value, fmt.transfer_syntax, fmt.geometry) is value:
            return None
    except CodestreamError:
        pass
    return "Pixel Data holds bytes outside its frames' codestreams"


def _label_in_defined_term(n: Needle, location: str) -> bool:
    """An original file or folder name found as a coded value (VR CS: SpecificCharacterSet GB18030,
    ImageType, Modality …) is a label that happens to name a defined term, not an identity; a
    person's name or an ID planted in a CS value is still a hit (other kinds)."""
    if n.kind != "path" or not location.startswith("DICOM "):
        return False
    keyword = location[6:].rsplit(".", 1)[-1].split("[", 1)[0]
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    tag = tag_for_keyword(keyword)
    try:
        return tag is not None and dictionary_VR(tag) == "CS"
    except KeyError:
        return False


def _dicom_strings(path: Path, deflated: bool) -> Iterator[tuple[str, str]]:
    """(element path, decoded text) of every element (any depth, private ones included)."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=not deflated)
    except Exception:
        return
    yield from _walk_strings(ds.file_meta, "") if getattr(ds, "file_meta", None) else iter(())
    yield from _walk_strings(ds, "")


def _walk_strings(ds, prefix: str) -> Iterator[tuple[str, str]]:
    for elem in _elements(ds):
        name = _elem_name(elem)
        try:
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or ()):
                    yield from _walk_strings(item, f"{prefix}{name}[{i}].")
                continue
            value = elem.value
        except Exception:
            continue
        if isinstance(value, (bytes, bytearray)):
            yield prefix + name, bytes(value).decode("latin-1")
        elif value is not None:
            vals = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            yield prefix + name, "\\".join(str(v) for v in vals)


def _elements(ds):
    try:
        for tag in list(ds.keys()):
            try:
                yield ds[tag]
            except Exception:
                continue
    except Exception:
        return


def _elem_name(elem) -> str:
    label = f"({elem.tag >> 16:04X},{elem.tag & 0xFFFF:04X})"
    kw = getattr(elem, "keyword", "") if not elem.tag.is_private else ""
    return kw or label


def _dicom_location(path: Path, n: Needle, off: int) -> str:
    """Element path of a hit (the file is parsed only when there is a hit)."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return f"DICOM byte offset {off}"
    where = _locate(ds.file_meta, "", n.text) if getattr(ds, "file_meta", None) else None
    where = where or _locate(ds, "", n.text)
    return f"DICOM {where}" if where else f"DICOM byte offset {off}"


def _locate(ds, prefix: str, needle: bytes) -> str | None:
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        try:
            elem = ds[tag]
        except Exception:
            continue
        name = _elem_name(elem)
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or ()):
                found = _locate(item, f"{prefix}{name}[{i}].", needle)
                if found:
                    return found
            continue
        raw_value = getattr(raw, "value", None)
        blobs = []
        if isinstance(raw_value, (bytes, bytearray)):
            blobs.append(bytes(raw_value))
        try:
            v = elem.value
            blobs.append(bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode("utf-8"))
        except Exception:
            pass
        if any(needle in b.lower() for b in blobs):
            return prefix + name
    return None


# ------------------------------------------------------------------------------------------------
# A job unit, the dataset, the whole release
# ------------------------------------------------------------------------------------------------
def unit_needles(restricted: Path, manifest: Mapping, salt: bytes, excluded: Counter | None = None,
                 counts: dict | None = None) -> list[Needle]:
    """The needles of every subject of a job unit (its identifier files and original paths);
    exclusions counted per rule in ``excluded``, values per subject in ``counts``."""
    values = idmod.read_unit(restricted, manifest["unit"])
    needles: list[Needle] = []
    for subj in manifest["subjects"]:
        s = subj["subject"]
        entries = values.get(s, []) + manifest_paths(subj)
        if counts is not None:
            counts[s] = len(entries)
        needles += needles_for(s, entries, salt, excluded)
    return needles


def other_units_values(restricted: Path, manifest: Mapping, salt: bytes, only: Iterable[str] | None = None
                       ) -> tuple[list[Needle], dict[str, str], list[str]]:
    """The patient IDs, accession numbers and birth dates (as needles) and the patient names of
    every subject outside the job unit (from the inventory, read before any job ran), or of those
    in ``only``: one patient's MRN, birth date or name in another unit's file (a mis-filed
    comparison study, a note naming another patient) is found by that unit's scan, before it is
    published (:class:`UnitMatcher`), as ``deidflow verify`` finds it afterwards.  Values one of
    the unit's own subjects also carries are its own, not another's.  Last, every subject of the
    inventory: whose values the scan searched (:func:`late_subject_scan`)."""
    from .. import inventory
    own = {subj["subject"] for subj in manifest["subjects"]}
    columns = ["subject", "patient_id", "accession", "patient_name", "birth_date"]
    try:
        import pyarrow.parquet as pq
        have = set(pq.ParquetFile(Path(restricted) / "inventory.parquet").schema_arrow.names)
        table = inventory.read(restricted, columns=[c for c in columns if c in have])
    except FileNotFoundError:  # a library caller's hand-made restricted folder: its own values only
        return [], {}, sorted(own)  # (a damaged inventory fails the job: in a run every job reads it at start anyway)
    rows = list(zip(*(table[c].to_pylist() if c in have else [None] * table.num_rows for c in columns)))
    mine = {v for s, *values in rows if s in own for v in values if v}
    wanted = None if only is None else set(only)
    ids: dict[str, set[tuple[str, str, str]]] = {}
    names: dict[str, str] = {}
    wide: set[str] = set()  # subjects whose CJK name is in names: their IDs also in full width
    for s, pid, acc, name, birth in rows:
        if s and s not in own and (wanted is None or s in wanted):
            for fld, v in (("PatientID", pid), ("AccessionNumber", acc)):
                if v and v not in mine:
                    ids.setdefault(s, set()).add(("id", fld, v))
            if birth and birth not in mine and len(d := birth.replace("-", "")[:8]) == 8 and d.isdigit():
                ids.setdefault(s, set()).add(("date_year4", "PatientBirthDate", d))
            if name and name not in mine:
                if idmod.east_asian(name) and idmod.script_name_anchors(name) is None:
                    # with its IDs (also full width), made now: its CJK forms have no word (kana,
                    # Hangul, a Latin representation beside them)
                    ids.setdefault(s, set()).add(("whole_name", "PatientName", name))
                else:  # a name only in Han characters: its forms as written made now, its pinyin later
                    names[s] = name
                    if idmod.east_asian(name):
                        wide.add(s)
    roster = sorted({s for s, *_ in rows if s} | own)
    # a birth date is searched in every written form with its four-digit year and, after a birth
    # word, in any form (DOB 23.04.61); not as a bare two-digit-year form (23.04.61): at thousands of
    # subjects a third of such dates in a text would be somebody's birth date (kind date_year4)
    return ([n for s, e in sorted(ids.items()) for n in needles_for(s, sorted(e), salt, wide=s in wide or None)],
            names, roster)


class UnitMatcher(Matcher):
    """The matcher of one job unit's scan: ``needles`` (its subjects' values, every other subject's
    IDs and birth date) and the other subjects' ``names`` searched as written whole (DOE^JOHN, John
    Doe, Doe, John; a family name or an initial alone is shared by many of thousands of subjects).
    A name's needles are made only when a scanned text holds the word one of its forms is anchored
    on (making 10,000 names into needles cost each unit job about 1 s; a text names few people):
    it finds what one :class:`Matcher` of all of them finds.  ``len`` counts ``needles`` only."""

    def __init__(self, needles: list[Needle], names: Mapping[str, str], salt: bytes):
        super().__init__(needles)
        self.names, self.salt = dict(names), salt
        self.others: Matcher | None = None
        self.made: list[Needle] = []
        self.waiting: dict[bytes, set[str]] = {}
        eager, script = [], []
        for s, name in self.names.items():
            anchors = idmod.whole_name_anchors(name)  # a plain ASCII name's, without making its forms
            if anchors is None and (anchors := idmod.script_name_anchors(name)) is not None:
                script.append(s)  # its forms as written now (no ASCII word), its Latin spellings later
            if anchors is None:
                anchors = {found[1] if (found := idmod.anchor(text)) else None
                           for text in idmod.needle_texts("whole_name", name)}
            if None in anchors or not anchors:  # a form without an ASCII word (CJK): made now
                eager.append(s)
            for word in anchors - {None}:
                self.waiting.setdefault(word, set()).add(s)
        self.made += [n for s in script for n in needles_for(s, [("whole_name_script", "PatientName", self.names[s])],
                                                              self.salt)]
        self._make(eager)
        if self.made and self.others is None:
            self.others = Matcher(self.made)

    def _make(self, subjects: Iterable[str]) -> None:
        new = [s for s in dict.fromkeys(subjects) if s in self.names]
        for s in new:
            self.made += needles_for(s, [("whole_name", "PatientName", self.names.pop(s))], self.salt)
        if new:
            self.others = Matcher(self.made)

    def script_chars_all(self) -> frozenset[str]:
        return self.script_chars | self.others.script_chars if self.others is not None else self.script_chars

    def empty(self) -> bool:  # a unit without values of its own still searches the other subjects' names
        return not self.count and not self.names and self.others is None

    def spans(self, text: bytes, folded: bool = False) -> list[tuple[int, int, Needle]]:
        if self.waiting and self.names:
            words = self.waiting.keys() & idmod.words(text.lower())
            self._make(s for w in sorted(words) for s in sorted(self.waiting.pop(w)))
        hits = super().spans(text, folded)  # its text with accents folded comes back here (folded=True)
        return hits + self.others.spans(text, folded=True) if self.others is not None else hits


def scan_unit(release: Path, restricted: Path, manifest: Path, *, pixel_data: bool = False,
              matcher: Matcher | None = None) -> dict:
    """Leak-scan the release files of every subject of one job unit against the identifiers of
    all of them (a subject's value in another subject's file is found too), or against
    ``matcher`` when given (``deidflow verify``: every subject's values, :func:`dataset_matcher`)."""
    release, restricted = Path(release), Path(restricted)
    m = json.loads(Path(manifest).read_text())
    salt = load_salt(restricted)
    excluded: Counter = Counter()
    counts: dict = {}
    own = unit_needles(restricted, m, salt, excluded, counts)
    roster = None
    if matcher is None:  # the unit's subjects' values and every other subject's IDs and names
        others, names, roster = other_units_values(restricted, m, salt)
        matcher = UnitMatcher(own + others, names, salt)
        # the record counts the unit's own forms: the other subjects' IDs depend on which subjects
        # the run had, and a release made in two runs must equal one made at once
        forms = len({Matcher.key(n) for n in own})
    else:
        forms = len(matcher)
    subjects = {}
    files_of = subject_files(release, [subj["subject"] for subj in m["subjects"]])
    for subj in m["subjects"]:
        s = subj["subject"]
        files = files_of[s]
        hits: list[dict] = []
        scanned = skipped = 0
        notes: list[str] = []
        for f in files:
            rel = f.relative_to(release).as_posix()
            fs = scan_file(f, rel, matcher, pixel_data=pixel_data)
            hits += [h.as_dict() for h in fs.hits]
            scanned += fs.scanned
            skipped += fs.skipped
            notes += fs.notes
        pixel_hits, pixel_frames = _pixel_check(release, restricted, s, matcher)  # burned-in text, read again
        hits += pixel_hits
        subjects[s] = {"files": len(files), "identifiers": counts[s], "bytes_scanned": scanned,
                       "bytes_not_scanned": skipped, "hits": sorted(hits, key=_hit_key), "notes": notes,
                       "pixel_frames_read": pixel_frames, "status": "leak" if hits else "clean"}
    out = {"unit": m["unit"], "searched_forms": forms, "excluded_forms": dict(sorted(excluded.items())),
           "pixel_data_scanned": pixel_data, "subjects": subjects}
    if roster is not None:
        out["searched_subjects"] = roster  # whose IDs and names this scan knew (late_subject_scan)
    return out


def late_subject_scan(release: Path, restricted: Path, units: Iterable[str], *, pixel_data: bool = False
                      ) -> dict[str, list[dict]]:
    """Subjects an earlier run published, scanned again for the IDs and names of the subjects that
    run did not have: a unit's scan searches every other subject's values (:func:`scan_unit`), but
    a unit published before a later delivery added a patient is not run again, and its note
    naming the new patient stayed released.  ``units``: the job units of the run (their verify
    records say whose values their scan searched).  Returns the hits of each subject with any;
    nothing is read when no unit was scanned before the inventory grew.  A unit found clean
    records the subjects it was scanned for (:data:`SEARCHED_LATER`), so a later run does not
    read it again for them; its next verify job removes the record."""
    from .. import inventory
    from ..fsutil import atomic_write_text
    from ..publish import release_subjects
    release, restricted = Path(release), Path(restricted)
    now = set(inventory.read(restricted, columns=["subject"])["subject"].to_pylist())
    published = release_subjects(release) if release.is_dir() else set()
    salt = None
    out: dict[str, list[dict]] = {}
    for unit in units:
        record = json.loads((restricted / "done" / "verify" / f"{unit}.json").read_text())
        m = json.loads((restricted / "manifests" / f"{unit}.json").read_text())
        own = {subj["subject"] for subj in m["subjects"]}
        late = now - own - set(record.get("searched_subjects", ()))  # a record without the list: every subject
        later = restricted / "work" / unit / SEARCHED_LATER
        covered = set(later.read_text().split()) if late and later.is_file() else set()
        late -= covered
        mine = sorted(own & published)
        if not late or not mine:
            continue
        salt = load_salt(restricted) if salt is None else salt
        needles, names, _ = other_units_values(restricted, m, salt, only=late)
        matcher = UnitMatcher(needles, names, salt)
        clean = True
        for s, files in subject_files(release, mine).items():
            hits = [h.as_dict() for f in files
                    for h in scan_file(f, f.relative_to(release).as_posix(), matcher, pixel_data=pixel_data).hits]
            if hits:
                out[s] = sorted(hits, key=_hit_key)
                clean = False
        if clean:
            make_restricted_dir(later.parent)
            atomic_write_text(later, "".join(f"{s}\n" for s in sorted(covered | late)), RESTRICTED_FILE_MODE)
    return out


SEARCHED_LATER = "searched-later.txt"  # restricted/work/<unit>/: subjects a clean late_subject_scan covered


def _pixel_check(release: Path, restricted: Path, subject: str, matcher: Matcher) -> tuple[list[dict], int]:
    """The pixel leak check (:mod:`deidflow.pixels.leakcheck`) of the images the pixel step
    touched; nothing to do (and nothing imported) when it left no facts for the subject."""
    from ..pixels.leakcheck import facts_path
    if not facts_path(restricted, subject).is_file():
        return [], 0
    from ..pixels.leakcheck import identifier_finder, pixel_hits
    return pixel_hits(release, restricted, subject, identifier_finder(matcher))


def _hit_key(h: Mapping) -> tuple:
    return (h["file"], h["location"], h["kind"], h["field"], h["value_hash"], h["owner"])


def manifests(restricted: Path) -> list[Path]:
    return sorted((Path(restricted) / "manifests").glob("*.json"))


def dataset_matcher(restricted: Path) -> Matcher:
    """ONE matcher for the values of every subject of every job unit: the dataset-level files and
    the QC report are searched with it in one pass each, whatever the number of subjects (a hit
    names its owner).  The ``verify_dataset`` job builds it once for both."""
    salt = load_salt(restricted)
    needles: list[Needle] = []
    for mf in manifests(restricted):
        needles += unit_needles(restricted, json.loads(mf.read_text()), salt)
    return Matcher(needles)


def originals_matcher(restricted: Path, originals: Iterable[str]) -> Matcher:
    """A matcher for original strings that belong to no subject's identifier files (the parts of
    quarantined input paths the report names)."""
    return Matcher(needles_for("", [("path", "original name", e) for e in originals], load_salt(restricted)))


def scan_dataset(release: Path, restricted: Path, *, pixel_data: bool = False,
                 files: list[Path] | None = None, matcher: Matcher | None = None) -> dict:
    """Leak-scan the dataset-level release files against every subject's values (one pass)."""
    release = Path(release)
    files = dataset_files(release) if files is None else files
    hits: list[dict] = []
    scanned = skipped = 0
    matcher = dataset_matcher(restricted) if matcher is None else matcher
    for f in files:
        fs = scan_file(f, f.relative_to(release).as_posix(), matcher, pixel_data=pixel_data)
        hits += [h.as_dict() for h in fs.hits]
        scanned += fs.scanned
        skipped += fs.skipped
    return {"files": len(files), "bytes_scanned": scanned, "bytes_not_scanned": skipped,
            "hits": sorted(hits, key=_hit_key), "status": "leak" if hits else "clean"}


def text_hits(matchers: Iterable[Matcher], texts: Mapping[str, str],
              ignore: frozenset[bytes] = frozenset()) -> dict[str, int]:
    """How many identifying values each text holds, by ``matchers`` (one pass per text and
    matcher): the QC report's check of its pages.  Forms in ``ignore`` (the report's own words,
    lower case) are not counted."""
    matchers = list(matchers)
    return {k: sum(1 for m in matchers for _, n in m.find(t.encode("utf-8")) if n.text not in ignore)
            for k, t in texts.items()}


def verify(release: Path, restricted: Path, *, pixel_data: bool = False) -> dict:
    """The whole release (``deidflow verify``): every job unit, then the dataset-level files, all
    against every subject's values (a run's unit scan knows its own unit's values only: a value
    of a subject in another unit is found here)."""
    matcher = dataset_matcher(restricted)
    units = [scan_unit(release, restricted, mf, pixel_data=pixel_data, matcher=matcher) for mf in manifests(restricted)]
    known = [s["subject"] for mf in manifests(restricted) for s in json.loads(mf.read_text())["subjects"]]
    files = dataset_files(release) + unowned_files(release, known)
    return {"units": units, "dataset": scan_dataset(release, restricted, pixel_data=pixel_data, matcher=matcher,
                                                    files=files), "not_files": not_plain_entries(release)}


def not_plain_entries(release: Path) -> list[str]:
    """The release's entries that are neither plain files nor folders (symbolic links, FIFOs,
    sockets, devices), relative paths.  No stage writes one, no scan reads through one, and a copy
    or archive that follows links (``zip -r``, ``cp -L``, ``rsync -L``, a web server) would ship
    what a link points to: a link to the restricted mappings passed ``deidflow verify`` (exit 0)."""
    out = []
    for root, dirs, files in os.walk(release):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                out.append(os.path.relpath(path, release))
    return sorted(out)


def unowned_files(release: Path, subjects: Iterable[str]) -> list[Path]:
    """Release files that neither a unit scan (the folders and files of ``subjects``) nor the
    dataset scan (:func:`dataset_files`) reads: those in ``sub-X`` folders of no known subject
    (another release's, a withdrawn one copied back). ``deidflow verify`` searches them too."""
    from ..fsutil import QC_SUBDIR
    from ..publish import REPORT_FILES
    release = Path(release)
    owned = {p for files in subject_files(release, subjects).values() for p in files}
    owned.update(dataset_files(release))
    owned.update(release / QC_SUBDIR / name for name in REPORT_FILES)
    return [p for p in _walk_files(release) if p not in owned]


def hit_lines(result: Mapping) -> list[str]:
    """One line per hit: subject, file, location, field and the value's hash (no value)."""
    lines = []
    units = result["units"] if "units" in result else ([result] if "subjects" in result else [])
    for u in units:
        for s, r in sorted(u.get("subjects", {}).items()):
            for h in r["hits"]:
                lines.append(_line(s, h))
    ds = result.get("dataset")
    for h in (ds or {}).get("hits", ()):
        lines.append(_line("dataset", h))
    return lines


def _line(scope: str, h: Mapping) -> str:
    whose = "" if h["owner"] == scope else f" (value of {h['owner']})"
    return (f"LEAK {scope}: {h['file']} at {h['location']}: {h['kind']} from {h['field']}{whose}, "
            f"value hash {h['value_hash']}")


# ------------------------------------------------------------------------------------------------
# Workflow jobs
# ------------------------------------------------------------------------------------------------
def verify_unit(manifest: Path, release: Path, restricted: Path, done: Path, *, strict: bool = False,
                pixel_data: bool = False) -> dict:
    """The ``verify`` job of one unit: the result goes to ``restricted/work/<unit>/verify.json`` and,
    unless ``strict`` and something was found, to the done marker.  Returns counts."""
    from ..errors import PublicError
    from ..fsutil import atomic_write_text
    result = scan_unit(release, restricted, manifest, pixel_data=pixel_data)
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    work = make_restricted_dir(Path(restricted) / "work" / result["unit"])
    atomic_write_text(work / "verify.json", text, RESTRICTED_FILE_MODE)
    (work / SEARCHED_LATER).unlink(missing_ok=True)  # this scan searched every subject's values
    lines = hit_lines(result)
    leaky = sorted(s for s, r in result["subjects"].items() if r["hits"])
    if lines and strict:
        raise PublicError(f"leak scan: {len(lines)} identifying value(s) found in the release files of "
                          f"{', '.join(leaky)}:\n" + "\n".join(lines[:20]))
    make_restricted_dir(Path(done).parent)
    atomic_write_text(done, text, RESTRICTED_FILE_MODE)
    return {"subjects": len(result["subjects"]), "leaky": len(leaky), "hits": len(lines),
            "files": sum(r["files"] for r in result["subjects"].values()), "lines": lines}


def verify_dataset(release: Path, restricted: Path, *, strict: bool = False, pixel_data: bool = False,
                   matcher: Matcher | None = None, published: Path | None = None, units: Iterable[str] = ()) -> dict:
    """The dataset-level scan of the ``verify_dataset`` job: the staged dataset-level files
    against every subject's values, and the subjects of ``published`` (the release) that an
    earlier run published against the values of subjects added since (``late``,
    :func:`late_subject_scan` of ``units``); with ``strict`` a hit stops the job (nothing more is
    published)."""
    from ..errors import PublicError
    # every staged file, whatever its name: publish_dataset moves every one of them
    result = scan_dataset(release, restricted, pixel_data=pixel_data, matcher=matcher, files=_walk_files(Path(release)))
    lines = hit_lines({"dataset": result})
    late = late_subject_scan(published, restricted, units, pixel_data=pixel_data) if published is not None else {}
    lines += [_line(f"{s} (published earlier; a subject added since)", h) for s, hits in late.items() for h in hits]
    if lines and strict:
        raise PublicError(f"leak scan: {len(lines)} identifying value(s) found in dataset-level release "
                          "files or in subjects published earlier:\n" + "\n".join(lines[:20]))
    return {**result, "late": late, "lines": lines}


def write_dataset_record(output: Path, result: Mapping) -> None:
    """``done/verify_dataset.json`` (restricted): the dataset-level scan's result."""
    from ..fsutil import atomic_write_text
    make_restricted_dir(Path(output).parent)
    record = {k: v for k, v in result.items() if k != "lines"}
    atomic_write_text(output, json.dumps(record, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
