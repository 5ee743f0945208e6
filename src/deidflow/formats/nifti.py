"""NIfTI-1, NIfTI-2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs) and Analyze 7.5 (``.hdr``/``.img``).

The header is edited in place: every text field is overwritten with NUL bytes of the same length
(or, with ``clean_descriptors``, cleaned of identifiers character for character), so
``vox_offset`` and every image byte stay where they were.  Header extensions are removed by
default; ``formats.nifti_extensions.keep`` keeps extensions by ecode byte for byte and
``formats.nifti_extensions.scrub`` keeps the text ones (4 AFNI XML, 6 comment, 8 XCEDE XML)
cleaned of identifiers at their original size.  In a single ``.nii`` the extension area up to
``vox_offset`` is rewritten as the kept extensions followed by one all-zero ``ecode 0`` filler
(or, with nothing kept, the extension flag is cleared and the area zeroed), so the image data do
not move.  Bytes after the image data (not part of any image) are dropped.

NIfTI-1's unused Analyze fields ``extents``, ``session_error``, ``regular`` (unless they hold
only the conventional ``r``), ``glmax`` and ``glmin`` are emptied too.

Analyze 7.5 ``data_history``: ``descrip``, ``aux_file``, ``generated``, ``scannum``,
``patient_id``, ``exp_date``, ``exp_time``, ``hist_un0``, and the ``data_type``/``db_name``
fields of ``header_key`` (``db_name`` usually holds the original file name) are emptied.
``originator`` is kept only when it holds SPM's voxel origin (five 16-bit integers, the first
three within the image grid and the last two zero — the SPM99/SPM2 convention nibabel's
``Spm99AnalyzeHeader`` reads); anything else in it is emptied.  ``vox_units``/``cal_units`` are
kept when they are a unit name, else emptied.  nibabel validates the header (dimensions,
data type) and reads the images back in the tests; the edits themselves are byte edits.
"""
from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

from .base import (GZIP_ERRORS, Format, FormatError, Outputs, ScrubContext, ScrubResult, copy_exact, scrub_stream,
                   is_gzip, open_input)
from ..fsutil import output_stream

# name: (offset, length) of the text fields of each header flavour.
NIFTI1_TEXT = {"data_type": (4, 10), "db_name": (14, 18), "descrip": (148, 80), "aux_file": (228, 24),
               "intent_name": (328, 16)}
NIFTI2_TEXT = {"descrip": (240, 80), "aux_file": (320, 24), "intent_name": (508, 16), "unused_str": (525, 15)}
ANALYZE_TEXT = {"data_type": (4, 10), "db_name": (14, 18), "descrip": (148, 80), "aux_file": (228, 24),
                "generated": (263, 10), "scannum": (273, 10), "patient_id": (283, 10), "exp_date": (293, 10),
                "exp_time": (303, 10), "hist_un0": (313, 3)}
ANALYZE_UNITS = {"vox_units": (56, 4), "cal_units": (60, 8)}
# Analyze fields NIfTI-1 keeps only as unused room: any bytes in them are emptied (``regular`` may
# keep the conventional ``r``), so text there travels nowhere.
NIFTI1_UNUSED = {"extents": (32, 7), "glmax": (140, 8)}  # extents+session_error+regular; glmax+glmin
# Numeric fields a value could be stored in as a number (an MRN as intent_p1): emptied when one
# writes an identifier of the subject (``ScrubContext.identifying_numbers``; the leak scan reads
# them too).  name: (offset, struct code)
NIFTI1_NUMBERS = {"intent_p1": (56, "f"), "intent_p2": (60, "f"), "intent_p3": (64, "f"), "cal_max": (124, "f"),
                  "cal_min": (128, "f"), "slice_duration": (132, "f"), "toffset": (136, "f")}
NIFTI2_NUMBERS = {"intent_p1": (80, "d"), "intent_p2": (88, "d"), "intent_p3": (96, "d"), "cal_max": (192, "d"),
                  "cal_min": (200, "d"), "slice_duration": (208, "d"), "toffset": (216, "d")}
NUMBERS = {"nifti1": NIFTI1_NUMBERS, "nifti2": NIFTI2_NUMBERS}
_PRINTABLE = re.compile(rb"^[\x20-\x7e]{4,}$")
ORIGINATOR = (253, 10)
# Fields cleaned instead of emptied with clean_descriptors.
DESCRIPTORS = {"descrip", "aux_file", "intent_name"}
TEXT_ECODES = {4: "AFNI", 6: "comment", 8: "XCEDE"}
_UNIT_RE = re.compile(rb"^(?:[a-zA-Z%/ ]{0,8})$")
MAX_EXTENSION_BYTES = 64 << 20


class _Layout:
    """What the first bytes of a header say: flavour, byte order, sizes."""

    def __init__(self, head: bytes):
        if len(head) < 348:
            raise FormatError("truncated header (shorter than 348 bytes)")
        e = None
        for cand in "<>":
            n = struct.unpack(cand + "i", head[:4])[0]
            if n in (348, 540):
                e = cand
                break
        if e is None:
            raise FormatError("not a NIfTI/Analyze header (sizeof_hdr is neither 348 nor 540)")
        self.endian = e
        self.hsize = struct.unpack(e + "i", head[:4])[0]
        if self.hsize == 540:
            if len(head) < 540:
                raise FormatError("truncated NIfTI-2 header (shorter than 540 bytes)")
            magic = head[4:8]
            self.flavour = "nifti2"
            self.single = magic[:3] == b"n+2"
            if magic[:3] not in (b"n+2", b"ni2"):
                raise FormatError("NIfTI-2 header without a valid magic string")
            ndim = struct.unpack(e + "q", head[16:24])[0]
            dims = struct.unpack(e + "7q", head[24:80])
            self.datatype, self.bitpix = struct.unpack(e + "hh", head[12:16])
            self.vox_offset = struct.unpack(e + "q", head[168:176])[0]
            self.text = NIFTI2_TEXT
        else:
            magic = head[344:348]
            if magic[:3] in (b"n+1", b"ni1"):
                self.flavour = "nifti1"
                self.single = magic[:3] == b"n+1"
                self.text = NIFTI1_TEXT
            else:
                self.flavour = "analyze"
                self.single = False
                self.text = ANALYZE_TEXT
            ndim = struct.unpack(e + "h", head[40:42])[0]
            dims = struct.unpack(e + "7h", head[42:56])
            self.datatype, self.bitpix = struct.unpack(e + "hh", head[70:74])
            vox = struct.unpack(e + "f", head[108:112])[0]
            if vox != vox or vox < 0 or vox > 1 << 40:
                raise FormatError("vox_offset is not a valid offset")
            self.vox_offset = int(vox)
        if not 1 <= ndim <= 7:
            raise FormatError(f"dim[0] = {ndim} (must be 1..7)")
        self.shape = tuple(int(d) for d in dims[:ndim])
        if any(d < 1 for d in self.shape):
            raise FormatError("a dimension is zero or negative")
        if self.bitpix <= 0 or self.bitpix % 8 or self.bitpix > 256:
            raise FormatError(f"bitpix {self.bitpix} is not a whole number of bytes")
        n = 1
        for d in self.shape:
            n *= d
        self.nbytes = n * (self.bitpix // 8)
        if self.single:
            minimum = self.hsize + 4
            if self.vox_offset < minimum:
                raise FormatError(f"vox_offset {self.vox_offset} lies inside the header")
            if self.vox_offset - minimum > MAX_EXTENSION_BYTES:
                raise FormatError("more than 64 MiB of header extensions")


def _validate_with_nibabel(head: bytes, layout: _Layout) -> None:
    """nibabel's own header checks (data type code, dimensions): FormatError when it refuses."""
    import nibabel as nib
    cls = {"nifti1": nib.Nifti1Header, "nifti2": nib.Nifti2Header, "analyze": nib.AnalyzeHeader}[layout.flavour]
    try:
        hdr = cls.from_fileobj(io.BytesIO(head[:layout.hsize]), check=False)
        dtype = hdr.get_data_dtype()
        hdr.get_data_shape()
    except Exception as exc:  # nibabel raises many types for bad headers
        raise FormatError(f"{layout.flavour} header rejected by nibabel ({type(exc).__name__})") from None
    if dtype.itemsize * 8 != layout.bitpix and dtype.kind != "V":
        raise FormatError(f"bitpix {layout.bitpix} does not match the data type")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _read_head(path: Path) -> bytes:
    try:
        with open_input(path) as fh:
            return fh.read(544)
    except (OSError, *GZIP_ERRORS) as exc:
        raise FormatError(f"header unreadable ({type(exc).__name__})") from None


def _text(head: bytes, off: int, n: int) -> str:
    return head[off:off + n].split(b"\x00", 1)[0].decode("latin-1").strip()


def identity(path: Path) -> dict:
    """NIfTI and Analyze carry no patient identity fields that deidflow trusts for grouping
    (Analyze ``patient_id`` is free text in practice); the header is validated."""
    head = _read_head(Path(path))
    layout = _Layout(head)
    _validate_with_nibabel(head, layout)
    return {}


def _img_of(path: Path) -> Path | None:
    for ext in (".img", ".IMG", ".Img"):
        p = path.with_suffix(ext)
        if p.exists():
            return p
    return None


def companions(path: Path) -> list[Path]:
    """The ``.img`` of a ``.hdr`` (NIfTI pair or Analyze); none for a single ``.nii``."""
    path = Path(path)
    layout = _Layout(_read_head(path))
    if layout.single:
        return []
    img = _img_of(path)
    if img is None:
        raise FormatError(f"{layout.flavour} .hdr without its .img image file")
    return [img]


def extension(path: Path) -> str:
    path = Path(path)
    layout = _Layout(_read_head(path))
    if not layout.single:
        return ".hdr"
    return ".nii.gz" if is_gzip(path) else ".nii"


# ------------------------------------------------------------------------------------------------
# Scrubbing
# ------------------------------------------------------------------------------------------------
def _originator_is_spm_origin(head: bytes, layout: _Layout) -> bool:
    off, n = ORIGINATOR
    raw = head[off:off + n]
    if not raw.strip(b"\x00"):
        return True
    vals = struct.unpack(layout.endian + "5h", raw)
    if vals[3] or vals[4]:
        return False
    dims = list(layout.shape) + [1, 1, 1]
    return all(-2 * dims[i] <= vals[i] <= 2 * dims[i] + 1 for i in range(3))


def _scrub_fields(head: bytearray, layout: _Layout, ctx: ScrubContext, res: ScrubResult) -> None:
    clean = ctx.option("clean_descriptors")
    for name, (off, n) in layout.text.items():
        raw = bytes(head[off:off + n])
        if not raw.strip(b"\x00 "):
            continue
        res.found(name, raw.split(b"\x00", 1)[0])
        if clean and name in DESCRIPTORS:
            head[off:off + n] = ctx.clean_fixed_bytes(raw)
            res.act(name, "cleaned")
        else:
            head[off:off + n] = bytes(n)
            res.act(name, "emptied")
    numbers = NUMBERS.get(layout.flavour, {})
    values = [struct.unpack_from(layout.endian + code, head, off)[0] for off, code in numbers.values()]
    for i in ctx.identifying_numbers(values):
        name, (off, code) = list(numbers.items())[i]
        head[off:off + struct.calcsize(code)] = bytes(struct.calcsize(code))
        res.act(name, "emptied (it wrote an identifier)")
    if layout.flavour == "nifti1":
        for name, (off, n) in NIFTI1_UNUSED.items():
            raw = bytes(head[off:off + n])
            conventional = bytes(n - 1) + b"r" if name == "extents" else bytes(n)
            if raw.strip(b"\x00") and raw != conventional:
                if _PRINTABLE.match(raw.strip(b"\x00 ")):
                    res.found(name, raw)
                head[off:off + n] = bytes(n)
                res.act(name, "emptied")
    if layout.flavour == "analyze":
        for name, (off, n) in ANALYZE_UNITS.items():
            raw = bytes(head[off:off + n]).split(b"\x00", 1)[0]
            if raw.strip() and not _UNIT_RE.match(raw):
                res.found(name, raw)
                head[off:off + n] = bytes(n)
                res.act(name, "emptied")
        off, n = ORIGINATOR
        if _originator_is_spm_origin(bytes(head), layout):
            if bytes(head[off:off + n]).strip(b"\x00"):
                res.act("originator", "kept (SPM origin)")
        else:
            res.found("originator", bytes(head[off:off + n]).split(b"\x00", 1)[0])
            head[off:off + n] = bytes(n)
            res.act("originator", "emptied")


def _parse_extensions(blob: bytes, endian: str) -> list[tuple[int, bytes]] | None:
    """(ecode, whole extension bytes) of a well-formed chain; None when malformed."""
    out, pos = [], 0
    while pos + 8 <= len(blob):
        esize, ecode = struct.unpack(endian + "ii", blob[pos:pos + 8])
        if esize == 0 and not blob[pos:].strip(b"\x00"):
            break  # zero padding after the last extension
        if esize < 16 or esize % 16 or pos + esize > len(blob):
            return None
        out.append((ecode, blob[pos:pos + esize]))
        pos += esize
    return out


def _scrub_extension(ecode: int, ext: bytes, ctx: ScrubContext, res: ScrubResult, i: int) -> bytes:
    res.found(f"extension[{i}]:ecode{ecode}", ext[8:208])
    return ext[:8] + ctx.clean_fixed_bytes(ext[8:])


def _extensions(blob: bytes, layout: _Layout, ctx: ScrubContext, res: ScrubResult, *, fill: bool) -> bytes:
    """The new extension area: kept/scrubbed extensions per config, then zero filler when
    ``fill`` (the area keeps its size, single files) or nothing (pairs)."""
    if not blob.strip(b"\x00"):
        return bytes(len(blob)) if fill else b""
    policy = ctx.formats.get("nifti_extensions") or {}
    keep = set(policy.get("keep") or ())
    scrub = set(policy.get("scrub") or ()) & set(TEXT_ECODES)
    chain = _parse_extensions(blob, layout.endian) if (keep or scrub) else None
    kept: list[bytes] = []
    if chain is None:
        res.act("extensions", "removed" if not (keep or scrub) else "removed (malformed extension chain)")
        res.found("extensions", blob[:200].strip(b"\x00"))
    else:
        for i, (ecode, ext) in enumerate(chain):
            if ecode in keep:
                kept.append(ext)
                res.act(f"extension[{i}]:ecode{ecode}", "kept")
            elif ecode in scrub:
                kept.append(_scrub_extension(ecode, ext, ctx, res, i))
                res.act(f"extension[{i}]:ecode{ecode}", "cleaned")
            else:
                res.found(f"extension[{i}]:ecode{ecode}", ext[8:208].strip(b"\x00"))
                res.act(f"extension[{i}]:ecode{ecode}", "removed")
    body = b"".join(kept)
    if not fill:
        return body
    rest = len(blob) - len(body)
    if kept and rest >= 16:
        body += struct.pack(layout.endian + "ii", rest, 0) + bytes(rest - 8)
    else:
        body += bytes(rest)
    return body


def _set_extender(head: bytearray, layout: _Layout, present: bool) -> None:
    off = layout.hsize
    if len(head) >= off + 4:
        head[off:off + 4] = (b"\x01" if present else b"\x00") + b"\x00\x00\x00"


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    with scrub_stream(src) as (fh, out, gz):
        head = fh.read(544)
        layout = _Layout(head)
        _validate_with_nibabel(head, layout)
        if layout.single:
            _scrub_single(fh, head, layout, out.path(dst), gz, ctx, res)
        else:
            _scrub_pair(fh, head, layout, src, dst, out, ctx, res)
        res.outputs = out.finals
    return res


def _scrub_single(fh, head: bytes, layout: _Layout, tmp: Path, gz: bool, ctx: ScrubContext,
                  res: ScrubResult) -> None:
    start = layout.hsize + 4
    need = layout.vox_offset - len(head)
    region = bytearray(head) + (fh.read(need) if need > 0 else b"")
    if len(region) < layout.vox_offset:
        raise FormatError("truncated: the file ends before vox_offset")
    region = region[:layout.vox_offset]
    _scrub_fields(region, layout, ctx, res)
    new_ext = _extensions(bytes(region[start:]), layout, ctx, res, fill=True)
    region[start:] = new_ext
    _set_extender(region, layout, bool(new_ext.strip(b"\x00")))
    if len(head) > layout.vox_offset:  # data began inside the first 544 bytes read
        fh = _Prefixed(head[layout.vox_offset:], fh)
    with output_stream(tmp, gz) as sink:
        sink.write(bytes(region))
        got = copy_exact(fh, sink, layout.nbytes)
        if got < layout.nbytes:
            raise FormatError(f"truncated: {got} of {layout.nbytes} image bytes present")
        if fh.read(1):
            res.act("trailing bytes", "removed")


class _Prefixed:
    """A read-only stream that first returns ``prefix`` then reads ``fh``."""

    def __init__(self, prefix: bytes, fh):
        self.prefix, self.fh = prefix, fh

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            if n < 0:
                out, self.prefix = self.prefix + self.fh.read(), b""
                return out
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            if len(out) < n:
                out += self.fh.read(n - len(out))
            return out
        return self.fh.read(n)


def _scrub_pair(fh, head: bytes, layout: _Layout, src: Path, dst: Path, out: Outputs, ctx: ScrubContext,
                res: ScrubResult) -> None:
    img = _img_of(src)
    if img is None:
        raise FormatError(f"{layout.flavour} .hdr without its .img image file")
    region = bytearray(head[:layout.hsize + 4]) if layout.flavour != "analyze" else bytearray(head[:348])
    rest = head[len(region):] + fh.read(MAX_EXTENSION_BYTES + 1)
    if len(rest) > MAX_EXTENSION_BYTES:
        raise FormatError("more than 64 MiB of header extensions")
    _scrub_fields(region, layout, ctx, res)
    if layout.flavour == "analyze":
        if rest.strip(b"\x00"):
            res.act("bytes after the header", "removed")
        new = bytes(region)
    else:
        ext = _extensions(rest, layout, ctx, res, fill=False)
        _set_extender(region, layout, bool(ext))
        new = bytes(region) + ext
    with open(out.path(dst), "wb") as fo:
        fo.write(new)
    with open(img, "rb") as fi, open(out.path(ctx.companion_path(dst, ".img")), "wb") as fo:
        skip = layout.vox_offset
        if skip:
            if skip > os.fstat(fi.fileno()).st_size:  # (checked before reading: a hostile offset is huge)
                raise FormatError("truncated .img: it ends before vox_offset")
            fi.seek(skip)
            fo.truncate(skip)  # not image data: zeroed, so offsets stay
            fo.seek(skip)
        got = copy_exact(fi, fo, layout.nbytes)
        if got < layout.nbytes:
            raise FormatError(f"truncated .img: {got} of {layout.nbytes} image bytes present")
        if fi.read(1):
            res.act(".img trailing bytes", "removed")


def _format(name: str) -> Format:
    return Format(name=name, release_dir="analyze" if name == "analyze" else "nifti", identity=identity,
                  companions=companions, scrub=scrub, extension=extension)


FORMATS = {n: _format(n) for n in ("nifti1", "nifti2", "analyze")}
