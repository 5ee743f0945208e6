"""Vendor private blobs that the safe list keeps (dcm2niix reads them), opened and cleaned.

Each kept blob holds, besides the acquisition facts it is kept for, values the profile removes
elsewhere: the GE Protocol Data Block (0025,xx1B) is a gzip member whose header names the exam
(``Ex27018Ser4Rx``) and carries the scan moment, and whose text repeats the series description;
GE (0043,xx2A) holds the scan date and time as ASCII (``09/18/118``, ``00:14``); the Siemens CSA
headers (0029,xx10/xx20) hold the typed protocol name in the Phoenix text (``tProtocolName``) and
the patient's weight.  :func:`clean` returns the blob without them (binary blobs keep their length
and offsets; the Protocol Data Block is recompressed with an empty gzip header), or ``b""`` when
a blob cannot be opened (then nothing of it is kept).
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from typing import Callable

GE_PDB = ("GEMS_SERS_01", 0x0025, 0x1B)
GE_USER_DATA = ("GEMS_PARM_01", 0x0043, 0x2A)
SIEMENS_CSA = {("SIEMENS CSA HEADER", 0x0029, 0x10), ("SIEMENS CSA HEADER", 0x0029, 0x20),
               ("SIEMENS MEDCOM HEADER2", 0x0029, 0x60)}
# Protocol Data Block keys whose values are free text (the series description typed by the operator).
_PDB_TEXT_KEYS = (b"SEDESC", b"PROTNAME", b"PROTOCOLNAME", b"PATNAME", b"PATID", b"EXAMDESC", b"REFPHY")
_PDB_LINE = re.compile(rb'^(?P<key>[A-Z0-9_]+) "(?P<value>[^"\n]*)"', re.MULTILINE)
_GE_DATE = re.compile(rb"(?<![0-9])[01][0-9]/[0-3][0-9]/[0-9]{3}(?![0-9])")
_GE_TIME = re.compile(rb"(?<![0-9:])[0-2][0-9]:[0-5][0-9](?![0-9:])")
# Phoenix protocol (ASCCONV) string fields typed by the operator.
_PHOENIX_TEXT = re.compile(rb'(?P<key>\btProtocolName|\.tDescription|\btPatientName|\btPatientID)'
                           rb'(?P<eq>\s*=\s*)""(?P<value>[^"\n]*)""')
# CSA elements that repeat patient characteristics the profile removes.
_CSA_PATIENT = (b"UsedPatientWeight", b"PatientWeight", b"PatientAge", b"PatientSex", b"PatientHeight")


def clean(key: tuple[str, int, int], value: bytes, sweep: Callable[[bytes], bytes],
          *, keep_characteristics: bool = False) -> bytes:
    """``value`` of the kept private element ``key`` = (creator, group, element low byte) without the
    identifying content of its vendor format; ``sweep`` is the subject's same-length residual sweep."""
    if key == GE_PDB:
        return _ge_pdb(value, sweep)
    if key == GE_USER_DATA:
        value = _GE_DATE.sub(lambda m: b"00/00/000", value)
        return _GE_TIME.sub(b"00:00", value)
    if key in SIEMENS_CSA:
        value = _PHOENIX_TEXT.sub(lambda m: m["key"] + m["eq"] + b'""' + b"x" * len(m["value"]) + b'""', value)
        if not keep_characteristics:
            value = _csa_blank(value, _CSA_PATIENT)
    return value


def _ge_pdb(value: bytes, sweep: Callable[[bytes], bytes]) -> bytes:
    """The Protocol Data Block: a 4-byte little-endian length, then a gzip member."""
    try:
        start = value.index(b"\x1f\x8b")
        text = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(value[start:])
    except (ValueError, zlib.error):
        return b""

    def line(m: re.Match) -> bytes:
        if m["key"] in _PDB_TEXT_KEYS:
            return m["key"] + b' ""'
        return m.group()
    text = sweep(_PDB_LINE.sub(line, text))
    member = gzip.compress(text, compresslevel=9, mtime=0)  # no file name, no time stamp
    out = struct.pack("<I", len(member)) + member
    return out + b"\x00" * (len(out) % 2)


def _csa_blank(value: bytes, names: tuple[bytes, ...]) -> bytes:
    """A Siemens CSA2 header (``SV10``) with the item values of the elements ``names`` replaced by
    spaces of the same length (binary layout unchanged); other layouts are returned as they are."""
    if value[:4] != b"SV10" or len(value) < 16:
        return value
    buf = bytearray(value)
    try:
        (ntags,) = struct.unpack_from("<I", buf, 8)
        pos = 16
        for _ in range(min(ntags, 1024)):
            name = bytes(buf[pos:pos + 64]).split(b"\x00", 1)[0]
            (nitems,) = struct.unpack_from("<i", buf, pos + 76)
            pos += 84
            for _ in range(min(max(nitems, 0), 4096)):
                length = struct.unpack_from("<4i", buf, pos)[1]
                pos += 16
                if length < 0 or pos + length > len(buf):
                    return value
                if name in names and length:
                    buf[pos:pos + length] = b" " * length
                pos += (length + 3) // 4 * 4
    except struct.error:
        return value
    return bytes(buf)
