"""Read a DICOM file, de-identify it, write it: headers parsed, pixel data streamed untouched.

The fast path memory-maps the source, walks the top-level elements with ``struct`` and copies
every element the profile keeps (and the pixel data) as raw bytes; only elements whose value
changes, and sequences, are decoded with pydicom and re-encoded.  Files the fast path cannot
stream (no preamble or file meta, deflated transfer syntax) go through pydicom as a whole.
Native pixel data keep every stored pixel value; bits outside BitsStored, where a retired embedded
overlay can hold text, are cleared (:func:`clear_unused_pixel_bits`); comment and application
segments of JPEG frames (a converter's note, EXIF) are removed (:func:`strip_jpeg_metadata`), and
so are bytes no decoder reads (after a frame's codestream, after the last native frame:
:mod:`deidflow.codestreams`).
Any problem raises :class:`DicomError` with a one-line reason for the quarantine list.
"""
from __future__ import annotations

import copy
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)

from . import __version__
from .codestreams import CodestreamError, Geometry, image_extent, trim_pixel_data
from .dicom import BLOB_CACHE_MIN, SWEEP_VRS, Scrubber, _dict_info, looks_like_items

IMPLEMENTATION_CLASS_UID = "2.25.173526497432135315340637374432658215186"  # fixed, deidflow's own
IMPLEMENTATION_VERSION = ("DEIDFLOW_" + __version__.split("+")[0].replace(".", ""))[:16]
PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
# pixel data whose frames cannot be measured: no decoder, screen or trim can tell image from other bytes
INCOMPLETE_PIXEL_MODULE = ("pixel data without a complete image pixel module (Rows, Columns, Bits Allocated): "
                           "it cannot be screened or checked for hidden bytes")
UNDEFINED = 0xFFFFFFFF
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_LONG_VRS = frozenset((b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV"))
_ITEM, _ITEM_END, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_CHARSET, _SOP_CLASS, _SOP_INSTANCE = 0x00080005, 0x00080016, 0x00080018
# Character sets whose values the sweep can search in the encoded bytes (ASCII, Latin-1, UTF-8).
_BYTE_SEARCHABLE = frozenset(("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6", "ISO 2022 IR 100"))


class DicomError(ValueError):
    """A file that cannot be de-identified safely; the message is a one-line quarantine reason."""


@dataclass
class FileResult:
    """What happened to one file: attribute path -> action code (changes only, never values)."""

    actions: dict[str, str]
    sop_instance_uid: str
    pixel_bytes: int
    # original values of the top-level elements asked for with ``capture`` (restricted: PHI), e.g.
    # what the pixel step selects on and the patient's identifiers; None when nothing was asked
    captured: Dataset | None = None
    # the written file's transfer syntax and pixel module, read while streaming (None: not known)
    pixel_format: PixelFormat | None = None


class PixelFormat(NamedTuple):
    """What :func:`clear_unused_pixel_bits` and :func:`strip_jpeg_metadata` need of a file."""

    transfer_syntax: str
    bits: tuple[int, int, int, int] | None  # BitsAllocated, BitsStored, HighBit, PixelRepresentation
    frames: int
    geometry: Geometry | None = None  # what the length of the frames depends on (None: not known)


class _Elem(NamedTuple):
    tag: int
    vr: bytes | None  # None in implicit VR
    start: int  # first byte of the element header
    vstart: int  # first byte of the value
    vend: int  # end of the value (before the delimiter for undefined length)
    end: int  # first byte after the element
    undefined: bool


class _Walker:
    """Element-by-element scanner over a memory-mapped file body."""

    def __init__(self, buf, size: int, implicit: bool, little: bool):
        self.buf, self.size, self.implicit, self.little = buf, size, implicit, little
        e = "<" if little else ">"
        self.hh, self.l4, self.h2, self.hhl = (struct.Struct(e + f) for f in ("HH", "L", "H", "HHL"))

    def element(self, pos: int) -> _Elem:
        buf, size = self.buf, self.size
        if pos + 8 > size:
            raise DicomError("file ends inside an element header (truncated)")
        group, el = self.hh.unpack_from(buf, pos)
        if self.implicit:
            vr = None
            (length,) = self.l4.unpack_from(buf, pos + 4)
            vstart = pos + 8
        else:
            vr = buf[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    raise DicomError("file ends inside an element header (truncated)")
                (length,) = self.l4.unpack_from(buf, pos + 8)
                vstart = pos + 12
            elif vr in _SHORT_VRS:
                (length,) = self.h2.unpack_from(buf, pos + 6)
                vstart = pos + 8
            else:
                raise DicomError(f"invalid VR at ({group:04X},{el:04X})")
        tag = group << 16 | el
        if length == UNDEFINED:
            # UN of undefined length holds implicit VR little endian items (PS3.5 6.2.2)
            walker = self if vr != b"UN" or self.implicit else self.implicit_twin()
            vend, end = walker.skip_items(vstart)
            return _Elem(tag, vr, pos, vstart, vend, end, True)
        end = vstart + length
        if end > size:
            raise DicomError(f"element ({group:04X},{el:04X}) truncated: needs {length} bytes, "
                             f"file has {size - vstart}")
        return _Elem(tag, vr, pos, vstart, end, end, False)

    def implicit_twin(self) -> "_Walker":
        return _Walker(self.buf, self.size, True, True)

    def skip_items(self, pos: int) -> tuple[int, int]:
        """Skip the items of an undefined-length value; return (delimiter position, end)."""
        while True:
            if pos + 8 > self.size:
                raise DicomError("sequence or encapsulated pixel data truncated (no delimiter)")
            group, el, length = self.hhl.unpack_from(self.buf, pos)
            if (group, el) == _SEQ_END:
                return pos, pos + 8
            if (group, el) != _ITEM:
                raise DicomError(f"malformed sequence: ({group:04X},{el:04X}) where an item was expected")
            if length == UNDEFINED:
                pos = self.skip_item_elements(pos + 8)
            else:
                pos += 8 + length
                if pos > self.size:
                    raise DicomError("sequence item truncated")

    def skip_item_elements(self, pos: int) -> int:
        while True:
            if pos + 8 > self.size:
                raise DicomError("sequence item truncated (no item delimiter)")
            if self.hh.unpack_from(self.buf, pos) == _ITEM_END:
                return pos + 8
            pos = self.element(pos).end


def _dict_sq(tag: int) -> bool:
    info = None if (tag >> 16) & 1 else _dict_info(tag)
    return info is not None and info[0] == "SQ"


def _str_value(buf, el: _Elem) -> str:
    return bytes(buf[el.vstart:el.vend]).decode("latin-1").strip("\x00 ")


def _transfer_syntax(fp: BinaryIO) -> tuple[FileMetaDataset | None, str | None]:
    """Read preamble and file meta; (None, None) when the file has no Part-10 header.
    Raises DicomError when the preamble is there but the meta group is damaged."""
    try:
        if read_preamble(fp, force=True) is None:
            return None, None
    except Exception:
        return None, None
    try:
        meta = _read_file_meta_info(fp)
    except Exception as exc:
        raise DicomError(f"file meta information unreadable (truncated or damaged): {type(exc).__name__}") from None
    if fp.tell() >= os.fstat(fp.fileno()).st_size:
        raise DicomError("file ends in or right after the file meta information (truncated, no data set)")
    try:
        ts = meta.get("TransferSyntaxUID")
    except Exception as exc:  # a damaged meta element fails only when decoded
        raise DicomError(f"file meta information unreadable: {type(exc).__name__}") from None
    if ts and not _is_transfer_syntax(str(ts)):  # pydicom cannot read it (and raised deep inside a job)
        raise DicomError("the transfer syntax is private or not a DICOM transfer syntax: the data set cannot be read")
    return meta, (str(ts) if ts else None)


def _is_transfer_syntax(ts: str) -> bool:
    """Whether ``ts`` is a transfer syntax of the DICOM standard (pydicom's UID dictionary)."""
    uid = UID(ts)
    return not uid.is_private and uid.is_transfer_syntax


def deidentify_file(src: Path, out: BinaryIO, scrubber: Scrubber, capture: frozenset[int] = frozenset()) -> FileResult:
    """Write the de-identified version of the DICOM file ``src`` to ``out``; the original values
    of the top-level tags in ``capture`` come back in ``FileResult.captured``."""
    src = Path(src)
    size = src.stat().st_size
    if size == 0:
        raise DicomError("zero-byte file")
    with open(src, "rb") as fp:
        meta, ts = _transfer_syntax(fp)
        encoding = stream_encoding(ts)
        if encoding is None:
            return _deidentify_dataset(src, out, scrubber, capture)
        body = fp.tell()
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _stream(mm, size, body, meta, ts, encoding, out, scrubber, capture)


def stream_encoding(ts: str | None) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax whose data set can be walked byte by
    byte; None for files that go through pydicom (no file meta, deflated)."""
    if ts is None or ts == DeflatedExplicitVRLittleEndian:
        return None
    if ts == ImplicitVRLittleEndian:
        return True, True
    if ts == ExplicitVRBigEndian:
        return False, False
    if ts == ExplicitVRLittleEndian or ts.startswith("1.2.840.10008.1.2."):  # native or encapsulated
        return False, True
    return None


def _stream(mm, size: int, body: int, meta: FileMetaDataset, ts: str, encoding: tuple[bool, bool],
            out: BinaryIO, scrubber: Scrubber, capture: frozenset[int] = frozenset()) -> FileResult:
    implicit, little = encoding
    walker = _Walker(mm, size, implicit, little)
    elems = []
    pos = body
    while pos < size:
        el = walker.element(pos)
        elems.append(el)
        pos = el.end
    charset = None
    by_tag = {el.tag: el for el in elems}
    if _CHARSET in by_tag:
        charset = [c.strip() for c in _str_value(mm, by_tag[_CHARSET]).split("\\")]
    encodings = convert_encodings(charset)
    # the file's identifying values feed the subject's model; a subject's files mostly repeat
    # them, so they are decoded only when their bytes are new
    sources = (tuple(charset or ()),) + tuple((el.tag, mm[el.vstart:el.vend]) for el in elems
                    if el.tag in scrubber.source_tags and not el.undefined)
    if sources in scrubber.seen_sources:
        scrubber.begin(None)
    else:
        scrubber.begin(_identifier_source(mm, elems, charset, implicit, little, scrubber.source_tags))
        scrubber.seen_sources.add(sources)
    dirty = _sweep_candidates(mm, elems, scrubber, charset)
    captured = _identifier_source(mm, elems, charset, implicit, little, capture) if capture else None

    def encode(elem) -> bytes:
        enc = DicomBytesIO()
        enc.is_little_endian, enc.is_implicit_VR = little, implicit
        write_data_element(enc, elem, encodings)
        return enc.getvalue()

    def tmp_dataset(el: _Elem, vr: str | None) -> Dataset:
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        value = bytes(mm[el.vstart:el.vend])
        enc_implicit, enc_little = implicit, little
        if el.vr == b"UN" and (vr == "SQ" or _dict_sq(el.tag)):
            # a sequence stored as UN holds implicit VR little endian items, whatever the file's
            # encoding (PS3.5 6.2.2): parse it so, also in big endian files
            vr, enc_implicit, enc_little = "SQ", True, True
        ds[el.tag] = RawDataElement(BaseTag(el.tag), vr, len(value), value, el.vstart,
                                    enc_implicit, enc_little, True)
        return ds

    markers = [(m.tag, encode(m)) for m in scrubber.marker_dataset()]
    chunks: list = []
    creators: dict[int, int] = {}  # block -> chunk index of the creator element
    creator_names: dict[int, str] = {}
    kept_blocks: set[int] = set()
    policy = scrubber.plan.private_policy
    collect = scrubber.collect  # original identifying values for the leak scan, or None
    if collect is not None:
        # the meta group is rebuilt: its AE titles and UIDs go
        collect.file_meta(meta, ae_titles="retain_device_identity" not in scrubber.plan.options)
    sop_class = sop_instance = None
    pixel_bytes = 0
    fmt = _stream_pixel_format(mm, by_tag, ts, little)
    for el in elems:
        tag = el.tag
        while markers and markers[0][0] < tag:
            chunks.append(markers.pop(0)[1])
        if markers and markers[0][0] == tag:
            chunks.append(markers.pop(0)[1])
            continue
        group, num = tag >> 16, tag & 0xFFFF
        if tag in PIXEL_TAGS:
            cleared = cleared_bits(mm[el.vstart:el.vend], fmt) if tag == _PIXEL_DATA and fmt and not el.undefined \
                else None
            if cleared is None:
                chunks.append((el.start, el.end))
            else:
                chunks.append(mm[el.start:el.vstart] + cleared)
                scrubber.record_change(tag, "C")
            pixel_bytes += el.vend - el.vstart
            continue
        if group == 0x0002 or num == 0 or group == 0xFFFE:
            continue
        vr = el.vr.decode("ascii") if el.vr else None
        if group & 1:  # private
            if policy == "remove" or num < 0x10 or 0x100 <= num < 0x1000:
                scrubber.record_drop(tag)
                if collect is not None:
                    collect.raw(tag, vr, mm, el.vstart, el.vend, encodings)
                continue
            if num <= 0xFF:
                block = group << 8 | num
                creators[block] = len(chunks)
                creator_names[block] = _str_value(mm, el)
                chunks.append((el.start, el.end))
                continue
            block = group << 8 | num >> 8
            creator = creator_names.get(block)
            if creator is None or (policy == "safe" and not scrubber.plan.is_safe_private(creator, group, num)):
                scrubber.record_drop(tag)
                if collect is not None:
                    collect.raw(tag, vr, mm, el.vstart, el.vend, encodings)
                continue
            kept_blocks.add(block)
            if vr in (None, "UN"):
                vr = "SQ" if el.undefined else (scrubber.plan.private_vr(creator, tag) or (
                    "SQ" if looks_like_items(mm[el.vstart:el.vstart + 4]) else vr))
            if vr == "SQ":
                try:
                    ds = tmp_dataset(el, "SQ")
                    scrubber.recurse_private(ds, tag)
                    chunks.append(encode(ds[tag]))
                except Exception as exc:
                    raise DicomError(f"cannot de-identify private sequence ({group:04X},{num:04X}): "
                                     f"{type(exc).__name__}") from None
            else:
                value = mm[el.vstart:el.vend]
                new = scrubber.clean_private(creator, tag, value, swept=tag in dirty)
                if new is value:
                    chunks.append((el.start, el.end))
                else:
                    head = mm[el.start:el.vstart] if len(new) == len(value) else _header(
                        tag, el.vr.decode("ascii") if el.vr else "OB", len(new), implicit, little)
                    chunks.append(head + new)
                    scrubber.record_change(tag, "C")
            continue
        fast = scrubber.fast_action(tag, vr)
        if fast == "K" and tag in dirty and _sweepable(tag, vr):  # a kept value holding an identifier
            try:
                ds = tmp_dataset(el, vr)
                scrubber.sweep_element(ds, tag)
                chunks.append(encode(ds[tag]))
            except Exception as exc:
                raise DicomError(f"cannot de-identify ({group:04X},{num:04X}): {type(exc).__name__}") from None
            continue
        if fast == "K":
            chunks.append((el.start, el.end))
            if tag == _SOP_CLASS:
                sop_class = _str_value(mm, el)
            elif tag == _SOP_INSTANCE:
                sop_instance = _str_value(mm, el)
            continue
        if fast == "X":
            scrubber.record_drop(tag)
            if collect is not None:
                if vr == "SQ" or el.undefined or (vr is None and _dict_sq(tag)):
                    try:
                        scrubber._collect(tmp_dataset(el, "SQ"), tag)
                    except Exception:
                        pass  # a damaged sequence that is dropped anyway
                else:
                    collect.raw(tag, vr, mm, el.vstart, el.vend, encodings)
            continue
        simple = _simple_replacement(scrubber, mm, el, vr, implicit, little)
        if simple is not None:
            if collect is not None and (vr or "") != "UI":
                collect.raw(tag, vr, mm, el.vstart, el.vend, encodings)
            chunks.append(simple)
            if tag == _SOP_INSTANCE:
                sop_instance = simple[8:].decode("ascii").strip("\x00 ")  # UI: 8-byte header
            continue
        try:
            ds = tmp_dataset(el, "SQ" if vr is None and el.undefined else vr)
            scrubber.apply_to(ds, tag)
            if tag in ds:
                chunks.append(encode(ds[tag]))
                if tag == _SOP_INSTANCE:
                    sop_instance = str(ds[tag].value)
                elif tag == _SOP_CLASS:
                    sop_class = str(ds[tag].value)
        except Exception as exc:  # pydicom raises many types on values it cannot decode or encode
            raise DicomError(f"cannot de-identify ({group:04X},{num:04X}): {type(exc).__name__}") from None
    chunks.extend(m[1] for m in markers)
    for block, idx in creators.items():
        if block not in kept_blocks:
            chunks[idx] = b""
    if not sop_instance:
        raise DicomError("no SOPInstanceUID in the data set")
    sop_class = sop_class or (str(meta.get("MediaStorageSOPClassUID", "")) or None)
    if not sop_class:
        raise DicomError("no SOPClassUID in the data set or file meta")
    out.write(b"\x00" * 128 + b"DICM")
    out.write(_meta_bytes(sop_class, sop_instance, ts))
    view = memoryview(mm)
    try:
        for c in chunks:
            if isinstance(c, tuple):
                out.write(view[c[0]:c[1]])
            elif c:
                out.write(c)
    finally:
        view.release()
    return FileResult(dict(scrubber.actions), sop_instance, pixel_bytes, captured, fmt)


_BITS = (0x00280100, 0x00280101, 0x00280102, 0x00280103)
_SHAPE = (0x00280010, 0x00280011, 0x00280002)  # Rows, Columns, SamplesPerPixel
_PHOTOMETRIC = 0x00280004
_FRAMES, _PIXEL_DATA = 0x00280008, 0x7FE00010


def _stream_pixel_format(mm, by_tag: dict[int, _Elem], ts: str, little: bool) -> PixelFormat | None:
    """The :class:`PixelFormat` of a streamed file (its pixel module is copied as it is); None
    when a value is not what the standard says (the file is then read with pydicom)."""
    us = struct.Struct("<H" if little else ">H")
    values = []
    for tag in _BITS:
        el = by_tag.get(tag)
        if el is None:
            values.append(None)
        elif el.vend - el.vstart != 2:
            return None
        else:
            values.append(us.unpack_from(mm, el.vstart)[0])
    bits = None if None in values[:3] else (values[0], values[1], values[2], values[3] or 0)
    try:
        frames = int(_str_value(mm, by_tag[_FRAMES]).split("\\")[0] or 1) if _FRAMES in by_tag else 1
    except ValueError:
        return None
    shape = []
    for tag in _SHAPE:
        el = by_tag.get(tag)
        shape.append(us.unpack_from(mm, el.vstart)[0] if el is not None and el.vend - el.vstart == 2 else None)
    photometric = _str_value(mm, by_tag[_PHOTOMETRIC]) if _PHOTOMETRIC in by_tag else ""
    return PixelFormat(ts, bits, frames, _geometry(shape, values[0], frames, photometric))


def _geometry(shape: list, bits_allocated: int | None, frames: int, photometric: str) -> Geometry | None:
    """The frames' :class:`Geometry` from Rows, Columns, SamplesPerPixel and BitsAllocated; None
    when one is missing."""
    if None in shape or not bits_allocated or min(shape) < 1 or frames < 1:
        return None
    return Geometry(shape[0], shape[1], shape[2], bits_allocated, frames, photometric.strip().endswith("_422"))


_SIMPLE_TEXT_VRS = frozenset(("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT", "UI"))


def _simple_replacement(scrubber: Scrubber, mm, el: _Elem, vr: str | None, implicit: bool,
                        little: bool) -> bytes | None:
    """Encoded element for the common cases that need no decoding (Z, P, R, D with an ASCII
    value, U on a UI element); None when the element must go through pydicom."""
    rule = scrubber.plan.rule_for(el.tag)
    if rule is None or el.undefined:
        return None
    if vr is None:
        info = _dict_info(el.tag)
        vr = info[0] if info else None
    if vr not in _SIMPLE_TEXT_VRS:
        return None
    code = rule.action
    if code == "D" and vr == "UI":
        code = "U"
    if code == "U":
        if vr != "UI":
            return None
        old = bytes(mm[el.vstart:el.vend]).decode("ascii", "replace")
        if not old.strip("\x00 "):
            return bytes(mm[el.start:el.end])
        text = "\\".join(scrubber.map_uid(v) for v in old.split("\\"))
    elif code in ("Z", "P", "R", "D"):
        if code == "D" and el.vend == el.vstart:
            return bytes(mm[el.start:el.end])  # empty stays empty
        text = scrubber.new_value(code, vr, rule)
        if code != "Z" and text is None:
            return None
        text = text or ""
    else:
        return None
    try:
        value = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    scrubber._record("", scrubber._name(el.tag, rule), code)
    return _header(el.tag, vr, len(value), implicit, little) + value


def _header(tag: int, vr: str, length: int, implicit: bool, little: bool) -> bytes:
    e = "<" if little else ">"
    if implicit:
        return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, length)
    if vr.encode() in _LONG_VRS:
        return struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _sweep_candidates(mm, elems, scrubber: Scrubber, charset) -> frozenset[int] | _All:
    """The top-level elements whose values hold one of the subject's identifiers: all values that
    can carry text, searched in one pass (each value on a line of its own, so that a match is a
    match in that value alone).  Everything, when the character set is one whose bytes cannot be
    searched directly."""
    if not scrubber.model.entries:
        return frozenset()
    if any(c not in _BYTE_SEARCHABLE for c in (charset or ())):
        return _All()
    plan = scrubber.plan
    cands = []
    blobs = []  # large kept private values: always swept, by Scrubber.clean_private (once per repeated blob)
    creators: dict[int, str] = {}
    for el in elems:
        if el.undefined or el.vend == el.vstart:
            continue
        if (el.tag >> 16) & 1:  # a private value: only when it is kept
            group, num = el.tag >> 16, el.tag & 0xFFFF
            if 0x10 <= num <= 0xFF:
                creators[group << 8 | num] = _str_value(mm, el)
            elif num >= 0x1000 and plan.private_policy != "remove":
                creator = creators.get(group << 8 | num >> 8)
                if creator is not None and (plan.private_policy == "keep"
                                            or plan.is_safe_private(creator, group, num)):
                    if el.vend - el.vstart >= BLOB_CACHE_MIN:
                        blobs.append(el.tag)
                    else:
                        cands.append(el)
            continue
        rule = plan.rule_for(el.tag)
        if rule is not None and rule.action != "K":
            continue  # removed or replaced anyway
        if el.vr is not None:
            if el.vr.decode() in SWEEP_VRS:
                cands.append(el)
        else:
            info = _dict_info(el.tag)
            if info is not None and info[0].split(" or ")[0] in SWEEP_VRS:
                cands.append(el)
    if not cands:
        return frozenset(blobs)
    starts, parts, pos = [], [], 0
    for el in cands:
        starts.append(pos)
        parts.append(mm[el.vstart:el.vend])
        pos += el.vend - el.vstart + 1
    import bisect
    hits = scrubber.model.matcher.spans(b"\n".join(parts))
    return frozenset(blobs).union(cands[bisect.bisect_right(starts, s) - 1].tag for s, _, _ in hits)


def _sweepable(tag: int, vr: str | None) -> bool:
    """Whether a public element's value holds characters the residual sweep searches."""
    if vr is None:
        info = _dict_info(tag)
        vr = info[0].split(" or ")[0] if info else None
    return vr in SWEEP_VRS


class _All:
    """Every element (``tag in _All()`` is always true)."""

    def __contains__(self, tag) -> bool:
        return True


def _identifier_source(mm, elems, charset, implicit, little, wanted: frozenset[int]) -> Dataset:
    """A data set with the original identifying elements (for cleaning free text)."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    for el in elems:
        if el.tag in wanted and not el.undefined:
            value = bytes(mm[el.vstart:el.vend])
            vr = el.vr.decode("ascii") if el.vr else None
            ds[el.tag] = RawDataElement(BaseTag(el.tag), vr, len(value), value, el.vstart, implicit, little, True)
    return ds


def _meta_bytes(sop_class: str, sop_instance: str, ts: str) -> bytes:
    """The file meta group of :func:`_new_meta` as pydicom's ``write_file_meta_info`` writes it
    (explicit VR little endian, group length first), encoded directly: through pydicom it cost
    about a tenth of the engine's time per file.  Values that are not plain ASCII of a valid
    length take pydicom's path."""
    try:
        values = [v.encode("ascii") for v in (sop_class, sop_instance, ts, IMPLEMENTATION_CLASS_UID,
                                              IMPLEMENTATION_VERSION)]
    except UnicodeEncodeError:
        values = []
    if len(values) != 5 or max(map(len, values)) > 0xFFFC:
        buf = DicomBytesIO()
        write_file_meta_info(buf, _new_meta(sop_class, sop_instance, ts))
        return buf.getvalue()
    body = [_META_VERSION]
    for element, value in zip((0x0002, 0x0003, 0x0010, 0x0012), values):  # UI: padded with NUL
        value += b"\x00" * (len(value) & 1)
        body.append(_META_SHORT.pack(2, element, b"UI", len(value)) + value)
    name = values[4] + b" " * (len(values[4]) & 1)  # SH: padded with a space
    body.append(_META_SHORT.pack(2, 0x0013, b"SH", len(name)) + name)
    rest = b"".join(body)
    return _META_SHORT.pack(2, 0x0000, b"UL", 4) + struct.pack("<I", len(rest)) + rest


_META_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_META_VERSION = struct.pack("<HH2sHI", 2, 0x0001, b"OB", 0, 2) + b"\x00\x01"  # FileMetaInformationVersion


def _new_meta(sop_class: str, sop_instance: str, ts: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _deidentify_dataset(src: Path, out: BinaryIO, scrubber: Scrubber, capture: frozenset[int] = frozenset()) -> FileResult:
    """Slow path for files without a Part-10 header or with a deflated data set."""
    try:
        ds = pydicom.dcmread(src, force=True)
        if not len(ds):
            raise DicomError("no data elements (not a DICOM data set)")
        implicit, little = ds.original_encoding
    except DicomError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged input
        raise DicomError(f"not readable as DICOM: {type(exc).__name__}") from None
    if implicit is None:
        raise DicomError("no data elements (not a DICOM data set)")
    if not little:
        try:
            un = any(getattr(ds.get_item(t), "VR", None) == "UN" for t in ds.keys())
        except Exception:  # pydicom raises for a VR it does not know
            raise DicomError("element with an unknown VR in a big-endian data set") from None
        if un:  # pydicom would parse UN sequences of a big endian data set in the wrong byte order
            raise DicomError("UN element in a big-endian data set without file meta (ambiguous encoding)")
    old_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if scrubber.collect is not None:
        scrubber.collect.file_meta(old_meta, ae_titles="retain_device_identity" not in scrubber.plan.options)
    if str(old_meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
        _check_complete(src, implicit, little)
    ts = str(old_meta.get("TransferSyntaxUID", "")) or {
        (True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian}[(implicit, little)]
    try:
        captured = _copy_tags(ds, capture) if capture else None
        actions = scrubber.scrub(ds)
        sop_instance = ds.get("SOPInstanceUID")
        sop_class = ds.get("SOPClassUID") or old_meta.get("MediaStorageSOPClassUID")
    except Exception as exc:  # pydicom raises many types on values it cannot decode
        raise DicomError(f"cannot de-identify: {type(exc).__name__}") from None
    if not sop_instance:
        raise DicomError("no SOPInstanceUID in the data set")
    if not sop_class:
        raise DicomError("no SOPClassUID in the data set or file meta")
    if _trim_to_image(ds, ts):  # a deflated file is not rewritten after writing (see deidentify_path)
        actions["PixelData"] = "C"
    ds.file_meta = _new_meta(str(sop_class), str(ds.SOPInstanceUID), ts)
    ds.preamble = b"\x00" * 128
    try:
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
    except Exception as exc:
        raise DicomError(f"cannot write de-identified file: {type(exc).__name__}") from None
    pixel_bytes = sum(len(ds[t].value or b"") for t in PIXEL_TAGS if t in ds)
    return FileResult(actions, str(ds.SOPInstanceUID), pixel_bytes, captured)


def _trim_to_image(ds: Dataset, ts: str) -> bool:
    """Reduce the Pixel Data of ``ds`` to its image (:func:`codestreams.image_extent`); True when
    anything was removed."""
    if "PixelData" not in ds:
        return False
    try:
        g = _dataset_pixel_format(ds, ts).geometry
        value = ds.PixelData
    except Exception:  # an incomplete pixel module: nothing to measure the frames by
        return False
    try:
        new = value if g is None or not isinstance(value, bytes) else image_extent(value, ts, g)
    except CodestreamError as exc:
        raise DicomError(str(exc)) from None
    if new is value:
        return False
    if "ExtendedOffsetTable" in ds:
        raise DicomError("encapsulated pixel data with bytes outside its frames and an Extended Offset Table")
    ds.PixelData = new
    return True


def _copy_tags(ds: Dataset, tags: frozenset[int]) -> Dataset:
    """A data set with copies of the top-level elements ``tags`` of ``ds`` (before scrubbing)."""
    out = Dataset()
    for tag in tags:
        if tag in ds:
            out[tag] = copy.deepcopy(ds[tag])
    if "SpecificCharacterSet" in ds:
        out.SpecificCharacterSet = ds.SpecificCharacterSet
    return out


def _check_complete(src: Path, implicit: bool, little: bool) -> None:
    """pydicom reads a truncated file without complaint; walk every element to be sure it is whole."""
    size = src.stat().st_size
    with open(src, "rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 132 if size >= 132 and mm[128:132] == b"DICM" else 0
        meta = _Walker(mm, size, False, True)
        while pos + 4 <= size and mm[pos:pos + 2] == b"\x02\x00":
            pos = meta.element(pos).end
        body = _Walker(mm, size, implicit, little)
        while pos < size:
            pos = body.element(pos).end


def deidentify_path(src: Path, dst: Path, scrubber: Scrubber, capture: frozenset[int] = frozenset()) -> FileResult:
    """De-identify ``src`` into ``dst`` atomically (temporary file in the same folder, rename)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            result = deidentify_file(src, fh, scrubber, capture)
        fmt = result.pixel_format  # known: the stream engine cleared the unused bits while writing
        changed = fmt is None and clear_unused_pixel_bits(tmp)
        fmt = fmt or _read_pixel_format(tmp)
        if result.pixel_bytes and (fmt is None or fmt.geometry is None):
            raise DicomError(INCOMPLETE_PIXEL_MODULE)
        try:  # bytes no decoder reads first: the frames are then told apart by their codestreams
            changed |= fmt is not None and trim_pixel_data(tmp, fmt.transfer_syntax, fmt.geometry)
        except CodestreamError as exc:
            raise DicomError(str(exc)) from None
        if changed | strip_jpeg_metadata(tmp, fmt):
            result.actions["PixelData"] = "C"
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return result


def pixel_format(buf) -> PixelFormat | None:
    """The :class:`PixelFormat` of a Part-10 file's bytes ``buf`` (the leak scan holds them
    already), read by walking the file meta and the top-level elements up to the pixel data (no
    value is decoded, no file opened again); None when the file cannot be walked so."""
    size = len(buf)
    if size < 132 or buf[128:132] != b"DICM":
        return None
    try:
        walker, pos, ts = _Walker(buf, size, False, True), 132, None  # file meta: explicit VR little endian
        while pos + 2 <= size and buf[pos:pos + 2] == b"\x02\x00":  # group 0002, little endian
            el = walker.element(pos)
            if el.tag == 0x00020010:
                ts = bytes(buf[el.vstart:el.vend]).rstrip(b"\0 ").decode("ascii")
            pos = el.end
        encoding = stream_encoding(ts)
        if encoding is None:
            return None
        walker, by_tag = _Walker(buf, size, *encoding), {}
        while pos < size:
            el = walker.element(pos)
            if el.tag > 0x0028FFFF:
                break  # the pixel module is group 0028: the rest is not walked
            if el.tag >> 16 == 0x0028:
                by_tag[el.tag] = el
            pos = el.end
        return _stream_pixel_format(buf, by_tag, ts, encoding[1])
    except (DicomError, ValueError, struct.error):
        return None


def _read_pixel_format(path: Path) -> PixelFormat | None:
    """The :class:`PixelFormat` of a written file, read with pydicom; None when it has none."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*_BITS, _FRAMES, *_SHAPE, _PHOTOMETRIC])
        return _dataset_pixel_format(ds, str(ds.file_meta.TransferSyntaxUID))
    except Exception:  # no file meta, or values pydicom cannot read: nothing to clear or strip here
        return None


def _dataset_pixel_format(ds: Dataset, ts: str) -> PixelFormat:
    """The :class:`PixelFormat` of a data set pydicom read (an empty value counts as absent, as
    in :func:`_stream_pixel_format`); raises on values it cannot read."""
    values = [int(ds[t].value) if t in ds and ds[t].value is not None else None for t in _BITS]
    bits = None if None in values[:3] else (values[0], values[1], values[2], values[3] or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    shape = [int(ds[t].value) if t in ds and ds[t].value is not None else None for t in _SHAPE]
    return PixelFormat(ts, bits, frames, _geometry(shape, values[0], frames, str(ds.get("PhotometricInterpretation") or "")))


def clear_unused_pixel_bits(path: Path, fmt: PixelFormat | None = None) -> bool:
    """Clear the bits of native Pixel Data outside BitsStored in the file ``path`` (in place);
    True when any was set (see :func:`cleared_bits`; the stream engine does it while writing)."""
    from .qc.leakscan import pixel_region
    fmt = fmt or _read_pixel_format(path)
    if fmt is None:
        return False
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        region = pixel_region(mm)
        new = None if region is None else cleared_bits(mm[region[0]:region[1]], fmt)
        if new is None:
            return False
        mm[region[0]:region[0] + len(new)] = new
        mm.flush()
    return True


def cleared_bits(value: bytes, fmt: PixelFormat) -> bytes | None:
    """Native Pixel Data ``value`` with the bits outside BitsStored cleared, or None when none is
    set (or the data are not native).

    Those bits are no part of any pixel value, but a retired embedded overlay (OverlayBitPosition
    12 of a 12-bit MR) or a vendor keeps text or graphics there, which survives the removal of
    the overlay group.  Bits above HighBit become the sign bit's copy for signed data (the usual
    sign extension), else zero; bits below the stored range zero.  Every stored value stays the
    same.  Encapsulated (compressed) pixel data holds only the stored bits' codestream."""
    if fmt.bits is None:
        return None
    ts = UID(fmt.transfer_syntax)
    alloc, stored, high, signed = fmt.bits[0], fmt.bits[1], fmt.bits[2], fmt.bits[3] == 1
    if ts.is_compressed or alloc not in (8, 16, 32) or not 0 < stored <= high + 1 <= alloc or stored == alloc:
        return None
    dtype = np.dtype(f"{'<' if ts.is_little_endian else '>'}u{alloc // 8}")
    n = len(value) // dtype.itemsize
    if n == 0:
        return None
    raw = np.frombuffer(value, dtype, count=n)
    full = (1 << alloc) - 1
    low = high + 1 - stored
    new = raw & dtype.type(((1 << stored) - 1) << low)
    if signed:
        above = full & ~((1 << (high + 1)) - 1)
        new |= np.where(raw & dtype.type(1 << high), dtype.type(above), dtype.type(0)).astype(dtype)
    if np.array_equal(new, raw):
        return None
    return new.tobytes() + bytes(value[n * dtype.itemsize:])


# JPEG-family transfer syntaxes (JPEG baseline, extended, lossless, JPEG-LS): their frames are
# marker segments up to the first scan.
JPEG_SYNTAXES = frozenset(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"))
# Segments a decoder reads: frame headers (SOFn), tables (DHT, DAC, DQT), DNL, DRI, DHP, EXP, the
# JPEG-LS frame header and parameters (SOF55, LSE), APP0 JFIF (without a thumbnail), APP2 ICC
# profile, APP14 Adobe (colour transform).  Every other segment before a scan goes: COM, APP1
# (EXIF, XMP: camera owner, dates, GPS), APP13 (IPTC), the other application segments, and the
# reserved markers (JPG, JPGn, RES), which no decoder reads and which can carry any bytes.
_DECODER_MARKERS = frozenset([m for m in range(0xC0, 0xD0) if m != 0xC8] + [0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xF7, 0xF8,
                                                                           0xE0, 0xE2, 0xEE])
# a marker of a segment to remove, found anywhere in a frame (coded data never hold one: 0xFF is
# followed by 0x00 or a restart marker, in JPEG-LS by a byte below 0x80)
_REMOVABLE = re.compile(rb"\xff[\xc8\xe0-\xf6\xf9-\xfe]")
_RESERVED = re.compile(rb"\xff[\x02-\xbf]")  # RES markers: in JPEG-LS coded data too
JPEG_LS_SYNTAXES = frozenset(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"))


def jpeg_frame_without_metadata(frame: bytes) -> bytes:
    """``frame`` without COM and application segments (JFIF kept when it has no thumbnail);
    ``frame`` itself when it has none.  Raises :class:`DicomError` when one sits between scans."""
    if frame[:2] != b"\xff\xd8":
        raise DicomError("JPEG frame without a start-of-image marker")
    out, pos, changed = [frame[:2]], 2, False
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            raise DicomError("JPEG frame with a damaged marker segment")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        n = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        segment = frame[pos:pos + 2 + n]
        if marker == 0xDA:  # start of scan: the rest is coded data (and any further scans)
            rest = frame[pos:]
            if _REMOVABLE.search(rest):  # never in coded data: a segment between scans
                raise DicomError("JPEG frame holds a comment or application segment between its scans")
            out.append(rest)
            break
        jfif_plain = marker == 0xE0 and segment[4:9] == b"JFIF\x00" and n == 16
        if marker not in _DECODER_MARKERS or (marker == 0xE0 and not jfif_plain):
            changed = True
        else:
            out.append(segment)
        pos += 2 + n
    return b"".join(out) if changed else frame


J2K_SYNTAXES = frozenset(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                          "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"))
_J2K_TEXT_BOXES = (b"xml ", b"uuid", b"jp2i")


def j2k_frame_without_comments(frame: bytes) -> bytes:
    """A JPEG 2000 codestream without the comment (COM) segments of its main header; ``frame``
    itself when it has none.  Raises :class:`DicomError` for a comment in a tile-part header or
    text in a JP2 wrapper (which this does not rewrite)."""
    if frame[4:8] == b"jP  ":  # a JP2 file, not the bare codestream DICOM asks for
        pos = 0
        while pos + 8 <= len(frame):
            size, kind = struct.unpack(">I", frame[pos:pos + 4])[0], frame[pos + 4:pos + 8]
            if kind in _J2K_TEXT_BOXES:
                raise DicomError("JPEG 2000 frame in a JP2 wrapper with a text box")
            if kind == b"jp2c" and j2k_frame_without_comments(frame[pos + 8:pos + size if size else None]) \
                    is not frame[pos + 8:pos + size if size else None]:
                raise DicomError("JPEG 2000 frame in a JP2 wrapper with a comment segment")
            if size < 8:
                break
            pos += size
        return frame
    if frame[:2] != b"\xff\x4f":
        raise DicomError("JPEG 2000 frame without a start-of-codestream marker")
    out, pos, changed = [frame[:2]], 2, False
    while pos + 4 <= len(frame) and frame[pos:pos + 2] != b"\xff\x90":  # main header, up to the first tile
        n = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        if frame[pos] != 0xFF or n < 2:
            raise DicomError("JPEG 2000 frame with a damaged main header")
        if frame[pos + 1] == 0x64:
            changed = True
        else:
            out.append(frame[pos:pos + 2 + n])
        pos += 2 + n
    tiles = pos
    while pos + 12 <= len(frame) and frame[pos:pos + 2] == b"\xff\x90":  # each tile-part header
        psot = struct.unpack(">I", frame[pos + 6:pos + 10])[0]
        q = pos + 12
        while q + 4 <= len(frame) and frame[q:q + 2] not in (b"\xff\x93", b""):
            if frame[q:q + 2] == b"\xff\x64":
                raise DicomError("JPEG 2000 frame with a comment in a tile-part header")
            q += 2 + struct.unpack(">H", frame[q + 2:q + 4])[0]
        if not psot:
            break
        pos += psot
    return b"".join(out) + frame[tiles:] if changed else frame


def strip_jpeg_metadata(path: Path, fmt: PixelFormat | None = None) -> bool:
    """Remove comment and application segments from every JPEG frame of encapsulated Pixel Data,
    and comment segments from JPEG 2000 frames (in place; the pixels decode the same); True when
    any was removed.  A file whose frames cannot be told apart, or with an Extended Offset Table,
    raises :class:`DicomError` when it has such segments (it is quarantined rather than released
    with them)."""
    from pydicom.encaps import encapsulate, generate_frames
    from .qc.leakscan import pixel_region
    fmt = fmt or _read_pixel_format(path)
    ts = fmt.transfer_syntax if fmt else ""
    if ts not in JPEG_SYNTAXES and ts not in J2K_SYNTAXES:
        return False
    data = Path(path).read_bytes()
    region = pixel_region(data)
    if region is None:
        return False
    value = data[region[0]:region[1]]
    if ts in JPEG_SYNTAXES and ts not in JPEG_LS_SYNTAXES and not _REMOVABLE.search(value) \
            and not _RESERVED.search(value):
        return False  # no such marker anywhere: nothing to remove (the usual case; JPEG-LS is parsed)
    if ts in J2K_SYNTAXES and b"\xff\x64" not in value and not any(b in value for b in _J2K_TEXT_BOXES):
        return False
    try:
        frames = list(generate_frames(value, number_of_frames=fmt.frames))
    except Exception:
        raise DicomError("JPEG pixel data whose frames cannot be told apart holds comment or application "
                         "segments") from None
    strip = jpeg_frame_without_metadata if ts in JPEG_SYNTAXES else j2k_frame_without_comments
    new = [strip(f) for f in frames]
    if all(a is b for a, b in zip(new, frames)):
        return False
    if b"\xe0\x7f\x01\x00" in data[:region[0]]:  # (7FE0,0001) Extended Offset Table
        raise DicomError("JPEG frames with comment or application segments and an Extended Offset Table")
    has_bot = value[4:8] != b"\x00\x00\x00\x00"
    body = encapsulate(new, has_bot=has_bot)  # odd frames padded to even length
    with open(path, "wb") as fh:
        fh.write(data[:region[0]] + body + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" + data[region[1]:])
    return True
