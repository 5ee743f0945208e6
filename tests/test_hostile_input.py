"""End-to-end: ``deidflow run`` on a hostile input corpus next to the demo patients.

The corpus holds every kind of bad input a raw PACS or research export has been seen to contain:
zero-byte files, DICOM truncated in the file meta, in a sequence and in the pixel data, data sets
without preamble, element lengths that point past the end or are off by one, undefined-length
sequences (valid and unterminated), duplicated SOPInstanceUIDs, two patients in one series, a
100 MB private blob, non-ASCII names in three character sets, unreadable paths, symbolic links
(inside, outside, broken, a cycle), NIfTI with a lying header, a gzip bomb, random bytes named
``.dcm``, a DICOMDIR and file names with a newline or a tab.

The run must complete; every input entry (``os.walk(followlinks=False)``, symbolic links
counted as entries) must end in exactly one place: released (``inventory.parquet`` row with
status ok whose file exists under ``OUT/sourcedata/dicom/<subject>/<out_relpath>``) or listed in
``quarantine.tsv`` with a one-line reason.

Root: the tests usually run as root, and root bypasses file permission checks (CAP_DAC_OVERRIDE),
so a file or folder with mode 000 is *readable* and is expected to be released like any other
valid file.  As root, unreadability is simulated with a FIFO (not a regular file: never opened)
and a broken symbolic link (cannot be opened at all); as another user the mode-000 file and
folder are expected in quarantine.

Names that are not valid UTF-8 (``os.fsencode``) and a damaged file whose name holds a newline
crash the whole run today; each has its own small corpus (see the tests at the end) so that the
main corpus still checks everything else.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, SecondaryCaptureImageStorage)

from deidflow.demo import make_demo_input

from .conftest import ROOT, TEST_KEY

pytestmark = [pytest.mark.slow, pytest.mark.workflow]

IS_ROOT = os.geteuid() == 0
MARKER = "OUTSIDEMARKER7F3A9C1E"  # only in the file outside the input (content and name)
BLOB_MARKER = b"PRIVATEBLOBMARKER"
BLOB_SIZE = 100 * 1024 * 1024
BOMB_CLAIMED = 1 << 30  # bytes the gzip bomb inflates to
RSS_LIMIT_KB = 1024 * 1024
UID_ROOT = "1.2.826.0.1.3680043.10.1337"  # fixed test UIDs, unique per hostile file


# ------------------------------------------------------------------------------------------------
# Running the CLI (as tests/test_workflow.py does, plus run time and peak RSS of all descendants)
# ------------------------------------------------------------------------------------------------
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_kb: int | None

    @property
    def tail(self) -> str:
        return (self.stdout + self.stderr)[-4000:]


def run_cli(*args: str, measure: bool = False) -> Run:
    """``python -m deidflow.cli ARGS`` with the test key in the environment.  ``measure`` runs it
    under a small wrapper whose RUSAGE_CHILDREN peak RSS covers the CLI and every job it starts
    (Linux folds a waited-for child's own children into its maximum)."""
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    env["DEIDFLOW_KEY"] = TEST_KEY
    cmd = [sys.executable, "-m", "deidflow.cli", *args]
    if measure:
        cmd = [sys.executable, "-c", _RSS_WRAPPER, *cmd]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=600)
    seconds = time.monotonic() - t0
    rss = None
    if measure:
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("PEAK_RSS_KB=")]
        rss = int(lines[-1].split("=", 1)[1]) if lines else None
    return Run(r.returncode, r.stdout, r.stderr, seconds, rss)


# ------------------------------------------------------------------------------------------------
# Building DICOM by hand (small, fully controlled byte layout)
# ------------------------------------------------------------------------------------------------
def _uid(*parts: object) -> str:
    return ".".join([UID_ROOT, *(str(p) for p in parts)])


def make_ds(n: int, *, patient_id: str | None = None, name: str = "HOSTILE^PATIENT", charset: str | None = None,
            series: str | None = None, study: str | None = None, sop: str | None = None,
            instance: int = 1, pixels: bool = True, seed: int = 0) -> Dataset:
    """A small valid secondary-capture image; every hostile file gets its own patient, study,
    series and SOP instance (``n``) unless told otherwise, so they cannot collide by accident."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop or _uid(n, 3, instance)
    ds.StudyDate = "20200102"
    ds.ContentDate = "20200102"
    ds.AccessionNumber = f"ACC{n:05d}"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = "REFERRER^HOSTILE"
    ds.PatientName = name
    ds.PatientID = patient_id or f"HOSTILE{n:04d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study or _uid(n, 1)
    ds.SeriesInstanceUID = series or _uid(n, 2)
    ds.StudyID = f"S{n}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    if pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = np.random.default_rng(seed or n).integers(0, 4096, (16, 16), dtype=np.uint16).tobytes()
    return ds


def encode(ds: Dataset, *, implicit: bool = False, preamble: bool = True, meta: bool = True,
           ts: str | None = None) -> bytes:
    """Bytes of ``ds``: Part-10 file (preamble + file meta), file meta without preamble, or a raw
    data set (neither)."""
    buf = io.BytesIO()
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ts or (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        return data if preamble else data[132:]
    assert not preamble
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def offset_of(data: bytes, group: int, elem: int, vr: bytes | None = b"") -> int:
    """Offset of the (only) element header (group,elem) in little-endian ``data``."""
    needle = struct.pack("<HH", group, elem) + (vr or b"")
    assert data.count(needle) == 1, f"({group:04X},{elem:04X}) not found exactly once"
    return data.index(needle)


def seq_item(**attrs) -> Dataset:
    item = Dataset()
    for k, v in attrs.items():
        setattr(item, k, v)
    item.is_undefined_length_sequence_item = True
    return item


def undefined_seq(ds: Dataset, keyword: str, items: list[Dataset]) -> None:
    setattr(ds, keyword, Sequence(items))
    ds[keyword].is_undefined_length = True


def with_sequences(n: int, **kw) -> Dataset:
    """A data set with undefined-length sequences: one in group 0008 (read by the inventory's
    header walk), one nested in its item, one after group 0020 (read by the release job only)."""
    ds = make_ds(n, **kw)
    purpose = seq_item(CodeValue="121311", CodingSchemeDesignator="DCM", CodeMeaning="Localizer")
    ref = seq_item(ReferencedSOPClassUID=SecondaryCaptureImageStorage, ReferencedSOPInstanceUID=_uid(n, 9, 1))
    undefined_seq(ref, "PurposeOfReferenceCodeSequence", [purpose])
    undefined_seq(ds, "ReferencedImageSequence", [ref])
    undefined_seq(ds, "PerformedProtocolCodeSequence",
                  [seq_item(CodeValue="HOSTILE1", CodingSchemeDesignator="99DEID", CodeMeaning="protocol")])
    return ds


SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------
@dataclass
class Expect:
    """What must happen to one input entry: ``release``, ``quarantine`` or ``either`` (then, if
    released, it must still parse); ``group`` names entries of which exactly one is released."""

    kind: str
    why: str
    absent: tuple[bytes, ...] = ()  # byte strings that must not be in the released file
    group: str = ""


@dataclass
class Corpus:
    input: Path
    outside: Path
    expect: dict[str, Expect] = field(default_factory=dict)

    def put(self, rel: str, data: bytes, kind: str, why: str, **kw) -> Path:
        p = self.input / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self.expect[rel] = Expect(kind, why, **kw)
        return p


def _gzip_bomb(path: Path, header: bytes, zeros: int) -> None:
    """A gzip member whose data is ``header`` + ``zeros`` zero bytes, built without compressing
    them: after a full flush deflate restarts from a clean state, so every 1 MiB block of zeros
    compresses to the same bytes, which are simply repeated."""
    chunk = bytes(1 << 20)
    assert zeros % len(chunk) == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) == block
    tail = c.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(zeros // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + head)
        for _ in range(zeros // len(chunk)):
            fh.write(block)
        fh.write(tail + struct.pack("<II", crc, (len(header) + zeros) & 0xFFFFFFFF))


def _nifti_header(dims: tuple[int, ...], datatype: int = 16, bitpix: int = 32) -> bytes:
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 0, 0, 0)
    struct.pack_into("<f", hdr, 108, 352)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr)


def build_corpus(base: Path) -> Corpus:
    inp, outside = base / "input", base / "outside"
    corpus = Corpus(inp, outside)
    demo_patients = make_demo_input(inp)
    assert demo_patients
    for root, _dirs, files in os.walk(inp):
        for f in files:
            rel = (Path(root) / f).relative_to(inp).as_posix()
            corpus.expect[rel] = Expect("release", "valid demo patient")
    put = corpus.put
    H = "hostile"

    # Zero-byte files.
    put(f"{H}/empty.dcm", b"", "quarantine", "zero-byte file")
    put(f"{H}/empty_no_extension", b"", "quarantine", "zero-byte file")

    # Truncated DICOM.
    full = encode(make_ds(1))
    put(f"{H}/trunc/in_file_meta.dcm", full[:150], "quarantine", "cut inside the file meta group")
    pn = offset_of(full, 0x0010, 0x0010, b"PN")
    put(f"{H}/trunc/in_header.dcm", full[:pn + 11], "quarantine", "cut inside PatientName")
    put(f"{H}/trunc/in_preamble.dcm", full[:100], "quarantine", "cut inside the preamble")
    seq = encode(with_sequences(2))
    ris = offset_of(seq, 0x0008, 0x1140, b"SQ")
    put(f"{H}/trunc/in_sequence.dcm", seq[:ris + 40], "quarantine", "cut inside an item of a sequence")
    full3 = encode(make_ds(3))
    px = offset_of(full3, 0x7FE0, 0x0010, b"OW")
    put(f"{H}/trunc/in_pixel_data.dcm", full3[:px + 12 + 100], "quarantine", "cut inside the pixel data")
    raw4 = encode(make_ds(4), implicit=True, preamble=False, meta=False)
    put(f"{H}/trunc/raw_in_pixel_data.dcm", raw4[:-200], "quarantine",
        "raw data set (no preamble, no meta) cut inside the pixel data")

    # DICOM without preamble.
    put(f"{H}/no_preamble/raw_implicit.dcm", encode(make_ds(5), implicit=True, preamble=False, meta=False),
        "either", "raw implicit VR data set, no preamble, no file meta")
    put(f"{H}/no_preamble/raw_explicit.dcm", encode(make_ds(6), implicit=False, preamble=False, meta=False),
        "either", "raw explicit VR data set, no preamble, no file meta")
    put(f"{H}/no_preamble/meta_no_preamble.dcm", encode(make_ds(7), preamble=False), "either",
        "file meta group without the 128-byte preamble and DICM")

    # Wrong element lengths.
    a = bytearray(encode(make_ds(8)))
    pn = offset_of(a, 0x0010, 0x0010, b"PN")
    struct.pack_into("<H", a, pn + 6, 0xFFF0)
    put(f"{H}/vr/length_past_end_in_header.dcm", bytes(a), "quarantine", "PatientName length points past the end")
    ds = make_ds(9)
    ds.PerformedProcedureStepDescription = "LATE ELEMENT"
    b = bytearray(encode(ds))
    late = offset_of(b, 0x0040, 0x0254, b"LO")
    struct.pack_into("<H", b, late + 6, 0xFFF0)
    put(f"{H}/vr/length_past_end_late.dcm", bytes(b), "quarantine",
        "(0040,0254) length points past the end (after group 0020: only the release job reads it)")
    c = bytearray(encode(make_ds(10, name="ODDLENGTH^WRONG")))
    pn = offset_of(c, 0x0010, 0x0010, b"PN")
    (length,) = struct.unpack_from("<H", c, pn + 6)
    struct.pack_into("<H", c, pn + 6, length - 1)
    put(f"{H}/vr/odd_length_wrong.dcm", bytes(c), "quarantine",
        "PatientName length one byte short (odd): the next element is misaligned")
    d = bytearray(encode(make_ds(11, name="ODDLENGTH^VALUE")))
    pn = offset_of(d, 0x0010, 0x0010, b"PN")
    (length,) = struct.unpack_from("<H", d, pn + 6)
    assert d[pn + 8 + length - 1:pn + 8 + length] == b" "  # "ODDLENGTH^VALUE " padded to even
    struct.pack_into("<H", d, pn + 6, length - 1)
    del d[pn + 8 + length - 1]
    put(f"{H}/vr/odd_length_value.dcm", bytes(d), "either",
        "PatientName of odd length, correctly encoded (non-conformant but parseable)",
        absent=(b"ODDLENGTH",))

    # Undefined-length sequences.
    put(f"{H}/sequences/undefined_length_valid.dcm", encode(with_sequences(12)), "release",
        "valid undefined-length sequences (explicit VR)", absent=(_uid(12, 9, 1).encode(),))
    put(f"{H}/sequences/undefined_length_valid_implicit.dcm", encode(with_sequences(13), implicit=True), "release",
        "valid undefined-length sequences (implicit VR)", absent=(_uid(13, 9, 1).encode(),))
    e = encode(with_sequences(14))
    ris = offset_of(e, 0x0008, 0x1140, b"SQ")
    inner = e.index(SEQ_DELIM, ris)  # PurposeOfReferenceCodeSequence, nested in the item
    outer = e.index(SEQ_DELIM, inner + 8)  # ReferencedImageSequence itself
    put(f"{H}/sequences/unterminated_outer.dcm", e[:outer] + e[outer + 8:], "quarantine",
        "ReferencedImageSequence without its sequence delimiter, more elements follow")
    e = encode(with_sequences(28))
    inner = e.index(SEQ_DELIM, offset_of(e, 0x0008, 0x1140, b"SQ"))
    put(f"{H}/sequences/unterminated_nested.dcm", e[:inner] + e[inner + 8:], "quarantine",
        "nested sequence (in an item of ReferencedImageSequence) without its delimiter")
    f = encode(with_sequences(15, pixels=False))
    assert f.endswith(SEQ_DELIM)
    put(f"{H}/sequences/unterminated_at_eof.dcm", f[:-8], "quarantine",
        "last element an undefined-length sequence whose delimiter is missing (file ends)")

    # Other transfer syntaxes: deflated (read whole by pydicom) and explicit VR big endian.
    for n, (ts, label) in enumerate(((DeflatedExplicitVRLittleEndian, "deflated"),
                                     (ExplicitVRBigEndian, "big_endian")), start=29):
        data = encode(make_ds(n), ts=ts)
        put(f"{H}/transfer_syntax/{label}_valid.dcm", data, "release", f"valid, {label}")
        data = encode(make_ds(n + 2), ts=ts)
        put(f"{H}/transfer_syntax/{label}_truncated.dcm", data[:-40], "quarantine", f"{label}, last 40 bytes cut")

    # A partial copy (interrupted transfer: cut in the pixel data) next to the complete file.
    whole = encode(make_ds(33))
    put(f"{H}/partial_copy/a_partial.dcm", whole[:-100], "quarantine", "partial copy, cut in the pixel data")
    put(f"{H}/partial_copy/b_complete.dcm", whole, "either",
        "the complete file (same SOPInstanceUID as the partial copy); see test_complete_file_wins_over_partial_copy")

    # Duplicated SOPInstanceUID, different content.
    dup = _uid(16, 3, 1)
    first, second = make_ds(16, sop=dup, seed=161), make_ds(16, sop=dup, seed=162)
    second.ImageComments = "a different image with the same SOPInstanceUID"
    put(f"{H}/duplicate_sop/first.dcm", encode(first), "either", "duplicate SOPInstanceUID", group="dup")
    put(f"{H}/duplicate_sop/second.dcm", encode(second), "either", "duplicate SOPInstanceUID", group="dup")

    # Two patients in one series folder.
    mixed = _uid(17, 2)
    put(f"{H}/two_patients_one_series/a.dcm", encode(make_ds(17, patient_id="HOSTMIXA", series=mixed)),
        "quarantine", "series holds two patients")
    put(f"{H}/two_patients_one_series/b.dcm", encode(make_ds(18, patient_id="HOSTMIXB", series=mixed)),
        "quarantine", "series holds two patients")

    # 100 MB private OB element in an otherwise valid file (written around a placeholder).
    ds = make_ds(19)
    block = ds.private_block(0x0009, "HOSTILE BLOB", create=True)
    block.add_new(0x10, "OB", b"PLACEHOLDER!")
    g = encode(ds)
    at = offset_of(g, 0x0009, 0x1010, b"OB")
    blob = (BLOB_MARKER + bytes(1 << 20)) * (BLOB_SIZE // ((1 << 20) + len(BLOB_MARKER)))
    blob += bytes(BLOB_SIZE - len(blob))
    p = inp / H / "private_blob" / "blob_100mb.dcm"
    p.parent.mkdir(parents=True)
    with open(p, "wb") as fh:
        fh.write(g[:at + 8] + struct.pack("<I", BLOB_SIZE))
        fh.write(blob)
        fh.write(g[at + 12 + 12:])
    corpus.expect[p.relative_to(inp).as_posix()] = Expect(
        "release", "100 MB private OB element (dicom.private: remove)", absent=(BLOB_MARKER, b"HOSTILE BLOB"))
    del blob

    # Non-ASCII names in three character sets.
    for n, (cs, name, enc) in enumerate((("ISO_IR 100", "Sørensen^Åsa Ölund", "latin-1"),
                                          ("ISO_IR 192", "Ωμέγα^Δέλτα Ζήτα", "utf-8"),
                                          ("GB18030", "欧阳^小明", "gb18030")), start=20):
        parts = [w for w in name.replace("^", " ").split() if len(w) > 1]
        put(f"{H}/charsets/{cs.replace(' ', '_')}.dcm", encode(make_ds(n, name=name, charset=cs)), "release",
            f"{cs} patient name", absent=tuple(w.encode(enc) for w in parts))
    put(f"{H}/charsets/Ünïcødé 名前/valid.dcm", encode(make_ds(23)), "release", "valid file in a non-ASCII folder")

    # Unreadable paths.
    put(f"{H}/unreadable/mode_000.dcm", encode(make_ds(24)),
        "release" if IS_ROOT else "quarantine",
        "mode 000: root bypasses permissions, so it is readable and released" if IS_ROOT else "mode 000")
    locked = inp / H / "unreadable" / "locked_dir"
    put(f"{H}/unreadable/locked_dir/inside.dcm", encode(make_ds(25)), "release",
        "in a mode-000 folder: root bypasses permissions, the folder is walked")
    if not IS_ROOT:  # the folder cannot be listed: its content is no entry, the folder is
        del corpus.expect[f"{H}/unreadable/locked_dir/inside.dcm"]
        corpus.expect[f"{H}/unreadable/locked_dir"] = Expect("quarantine", "mode-000 folder")
    # As root nothing with a mode is unreadable: a FIFO (not a regular file, never opened) and the
    # broken symlink under links/ stand in for files that cannot be read.
    os.mkfifo(inp / H / "unreadable" / "fifo.dcm")
    corpus.expect[f"{H}/unreadable/fifo.dcm"] = Expect("quarantine", "FIFO (as root: stands in for an unreadable file)")

    # Symbolic links (entries of their own; never followed).
    outside.mkdir()
    target = outside / f"{MARKER}.dcm"
    ds = make_ds(26, name=f"{MARKER}^OUTSIDE", patient_id=MARKER[:16])
    ds.StudyDescription = MARKER
    ds.ImageComments = MARKER
    target.write_bytes(encode(ds))
    links = inp / H / "links"
    links.mkdir(parents=True)
    demo_file = sorted(r for r, e in corpus.expect.items() if e.why == "valid demo patient")[0]
    os.symlink(os.path.relpath(inp / demo_file, links), links / "to_file_inside.dcm")
    os.symlink(target, links / "to_file_outside.dcm")
    os.symlink(outside, links / "to_folder_outside")
    os.symlink(links / "does-not-exist.dcm", links / "broken.dcm")
    os.symlink("..", links / "cycle_to_parent")
    for name, why in (("to_file_inside.dcm", "symlink to a file inside the input"),
                      ("to_file_outside.dcm", "symlink to a file outside the input"),
                      ("to_folder_outside", "symlink to a folder outside the input"),
                      ("broken.dcm", "broken symlink (as root: stands in for an unreadable file)"),
                      ("cycle_to_parent", "directory cycle: symlink to the parent folder")):
        corpus.expect[f"{H}/links/{name}"] = Expect("quarantine", why)

    # NIfTI with a lying header, and a gzip bomb.
    put(f"{H}/nifti/lying_header.nii", _nifti_header((3, 512, 512, 512))[:200], "quarantine",
        "sizeof_hdr 348 but only 200 bytes")
    put(f"{H}/nifti/header_only.nii", _nifti_header((3, 512, 512, 512)), "quarantine",
        "complete header claiming 512 MiB of voxels, no voxels")
    bomb = inp / H / "nifti" / "bomb.nii.gz"
    _gzip_bomb(bomb, _nifti_header((4, 1024, 1024, 1024, 4)), BOMB_CLAIMED)
    assert bomb.stat().st_size < 2 << 20
    corpus.expect[bomb.relative_to(inp).as_posix()] = Expect(
        "quarantine", f"gzip bomb: {bomb.stat().st_size} bytes inflating to {BOMB_CLAIMED + 352} bytes")

    # Random bytes named .dcm, a DICOMDIR.
    put(f"{H}/random.dcm", random.Random(1337).randbytes(64 * 1024), "quarantine", "random bytes")
    put(f"{H}/DICOMDIR", Path(get_testdata_file("DICOMDIR")).read_bytes(), "quarantine", "DICOMDIR")

    # File names with a newline or a tab (the UTF-8-invalid name has its own test below).
    junk = b"scanner export log, not an image\n" * 20
    put(f"{H}/names/new\nline.dcm", junk, "quarantine", "junk, newline in the name")
    put(f"{H}/names/tab\there.dcm", junk, "quarantine", "junk, tab in the name")
    put(f"{H}/names/valid\nname\twith controls.dcm", encode(make_ds(27)), "release",
        "valid DICOM, newline and tab in the name")

    # Permissions last (the folder could not be written into afterwards as non-root).
    os.chmod(inp / H / "unreadable" / "mode_000.dcm", 0o000)
    os.chmod(locked, 0o000)
    return corpus


# ------------------------------------------------------------------------------------------------
# Observing the input and the outputs
# ------------------------------------------------------------------------------------------------
def input_entries(inp: Path) -> list[str]:
    """Every entry the test counts: files, symlinks (to files or folders, broken) and special
    files from ``os.walk(followlinks=False)``; a folder that cannot be listed counts as itself."""
    out = []
    for root, dirs, files in os.walk(inp, followlinks=False):
        rel = Path(root).relative_to(inp)
        for d in list(dirs):
            full = Path(root) / d
            if full.is_symlink():
                out.append((rel / d).as_posix())
            elif not os.access(full, os.R_OK | os.X_OK):
                out.append((rel / d).as_posix())
        out.extend((rel / f).as_posix() for f in files)
    return sorted(out)


def snapshot(inp: Path) -> dict[str, tuple]:
    """lstat mode and mtime of every entry (folders included), content hash of regular files,
    target of symbolic links; FIFOs are never opened."""
    snap = {}
    for root, dirs, files in os.walk(inp, followlinks=False):
        for name in [*dirs, *files]:
            full = Path(root) / name
            st = full.lstat()
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                try:
                    with open(full, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 22), b""):
                            h.update(chunk)
                    what = h.hexdigest()
                except PermissionError:  # mode 000 when not root
                    what = "unreadable"
            elif stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(full)
            else:
                what = stat.filemode(st.st_mode)
            snap[full.relative_to(inp).as_posix()] = (st.st_mode, st.st_mtime_ns, st.st_size, what)
    return snap


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".snakemake_timestamp")}


def _forms(rel: str) -> list[str]:
    """How a path may be written in quarantine.tsv: raw, or escaped (a fix may escape control
    characters, backslash style or JSON style)."""
    from deidflow.fsutil import display_path
    from deidflow.mapping import tsv_field
    return list(dict.fromkeys([tsv_field(display_path(rel)), rel, rel.encode("unicode_escape").decode("ascii"),
                               json.dumps(rel)]))


def parse_quarantine(text: str, known: list[str]) -> tuple[dict[str, str], list[str]]:
    """{entry: reason} of quarantine.tsv, read leniently: each record is the longest known entry
    (in any of its :func:`_forms`) followed by a tab, then the reason up to the end of the line.
    That reassembles names holding a newline or a tab (the strict one-line check is a test of its
    own).  Returns the records and the lines that match no entry."""
    assert text.startswith("file\treason\n"), f"bad header: {text[:40]!r}"
    rest = text[len("file\treason\n"):]
    forms = sorted(((f, rel) for rel in known for f in _forms(rel)), key=lambda x: -len(x[0]))
    records: dict[str, str] = {}
    unknown: list[str] = []
    while rest:
        for form, rel in forms:
            if rest.startswith(form + "\t"):
                reason, _, rest = rest[len(form) + 1:].partition("\n")
                assert rel not in records, f"{rel!r} listed twice in quarantine.tsv"
                records[rel] = reason
                break
        else:
            line, _, rest = rest.partition("\n")
            unknown.append(line)
    return records, unknown


@dataclass
class Outcome:
    run: Run
    release_root: Path
    restricted: Path
    inventory: list[dict]
    released: dict[str, Path]  # input entry -> released file
    quarantined: dict[str, str]  # input entry -> reason
    unknown_lines: list[str]
    ok_but_missing: list[str]  # inventory says ok, no file, not quarantined either
    quarantine_text: str


def observe(run: Run, out: Path, entries: list[str]) -> Outcome:
    restricted = out.with_name(out.name + "_restricted")
    root = out / "sourcedata" / "dicom"
    rows = pq.read_table(restricted / "inventory.parquet").to_pylist() if (restricted / "inventory.parquet").exists() else []
    qfile = restricted / "quarantine.tsv"
    text = qfile.read_bytes().decode("utf-8", "surrogateescape") if qfile.exists() else "file\treason\n"
    quarantined, unknown = parse_quarantine(text, entries)
    released, missing = {}, []
    for r in rows:
        if r["status"] == "ok":
            f = root / r["subject"] / r["out_relpath"]
            if f.is_file():
                released[r["relpath"]] = f
            elif r["relpath"] not in quarantined:
                missing.append(r["relpath"])
    return Outcome(run, root, restricted, rows, released, quarantined, unknown, missing, text)


# ------------------------------------------------------------------------------------------------
# The runs (built and run once for the module)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    t0 = time.monotonic()
    corpus = build_corpus(base)
    build_s = time.monotonic() - t0
    entries = input_entries(corpus.input)
    before = snapshot(corpus.input)
    out, strict_out = base / "release", base / "release-strict"
    first = run_cli("run", str(corpus.input), str(out), "--cores", "2", measure=True)
    main = observe(first, out, entries)
    release_after_first = tree_hashes(out) if out.exists() else {}
    strict = observe(run_cli("run", str(corpus.input), str(strict_out), "--cores", "2", "--strict"),
                     strict_out, entries)
    second = run_cli("run", str(corpus.input), str(out), "--cores", "2")
    release_after_second = tree_hashes(out) if out.exists() else {}
    after = snapshot(corpus.input)
    res = {"corpus": corpus, "entries": entries, "before": before, "after": after, "main": main,
           "strict": strict, "second": second, "release_first": release_after_first,
           "release_second": release_after_second, "build_s": build_s}
    _report(res)
    yield res
    unreadable = corpus.input / "hostile" / "unreadable"
    os.chmod(unreadable / "locked_dir", 0o700)  # let pytest clean up
    os.chmod(unreadable / "mode_000.dcm", 0o600)


def _report(res: dict) -> None:
    """Figures on stderr (shown with -s or on failure)."""
    main: Outcome = res["main"]
    reasons: dict[str, int] = {}
    for reason in main.quarantined.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    print(f"\n[hostile] corpus: {len(res['entries'])} entries (built in {res['build_s']:.1f} s); "
          f"released {len(main.released)}, quarantined {len(main.quarantined)}; "
          f"runs: first {main.run.seconds:.1f} s (rc {main.run.returncode}, peak RSS "
          f"{(main.run.peak_rss_kb or 0) / 1024:.0f} MiB), strict {res['strict'].run.seconds:.1f} s "
          f"(rc {res['strict'].run.returncode}), second {res['second'].seconds:.1f} s "
          f"(rc {res['second'].returncode})", file=sys.stderr)
    print(f"[hostile] second run says nothing to do: {'Nothing to be done' in res['second'].stdout + res['second'].stderr}",
          file=sys.stderr)
    for reason, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0])):
        print(f"[hostile] {n:3d}  {reason}", file=sys.stderr)
    for rel in res["entries"]:
        if rel.startswith("hostile/"):
            where = "RELEASED" if rel in main.released else f"quarantined: {main.quarantined.get(rel)}"
            print(f"[hostile]   {rel!r:62} {where}", file=sys.stderr)


def _explain(res: dict, rel: str) -> str:
    main: Outcome = res["main"]
    e = res["corpus"].expect.get(rel)
    row = next((r for r in main.inventory if r["relpath"] == rel), None)
    return (f"{rel!r} ({e.why if e else 'no expectation'}): "
            f"{'released' if rel in main.released else 'not released'}, "
            f"quarantine reason {main.quarantined.get(rel)!r}, inventory "
            f"{None if row is None else (row['status'], row['reason'])}")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
def test_run_completes(hostile):
    """Every hostile file is quarantined or released; the quarantined ones make the release
    incomplete (exit 3), but no subject is withheld and no marker stays."""
    main = hostile["main"]
    assert main.run.returncode == 3, main.run.tail
    withheld = json.loads((main.restricted / "withheld.json").read_text())
    assert withheld["withheld"] == {} and withheld["published_with_leaks"] == {}, withheld


def test_every_input_ends_in_exactly_one_place(hostile):
    main: Outcome = hostile["main"]
    entries = set(hostile["entries"])
    released, quarantined = set(main.released), set(main.quarantined)
    both = released & quarantined
    neither = entries - released - quarantined
    strays = (released | quarantined) - entries
    problems = [f"in release AND quarantine: {_explain(hostile, r)}" for r in sorted(both)]
    problems += [f"in neither (silently skipped): {_explain(hostile, r)}" for r in sorted(neither)]
    problems += [f"listed but not an input entry: {r!r}" for r in sorted(strays)]
    problems += [f"inventory ok, no released file, not quarantined: {r!r}" for r in main.ok_but_missing]
    problems += [f"quarantine.tsv line naming no input entry: {ln!r}" for ln in main.unknown_lines]
    problems += [f"empty reason: {r!r}" for r, why in main.quarantined.items() if not why.strip()]
    assert not problems, "\n".join(problems)
    assert len(entries) == len(released) + len(quarantined), (
        f"{len(entries)} input entries != {len(released)} released + {len(quarantined)} quarantined")
    files = {p for p in main.release_root.rglob("*") if p.is_file()}
    assert files == set(main.released.values()), "release holds files no inventory row accounts for"


def test_report_lists_every_quarantined_file_without_its_name(hostile):
    """The QC report (in the release) lists each quarantined file by its keyed ID and reason;
    the original path never appears in it."""
    from deidflow.qc import report
    main: Outcome = hostile["main"]
    html = (main.release_root.parents[1] / "derivatives" / "deidflow" / "qc" / "report.html").read_text()
    listed = report._quarantine(main.restricted, main.inventory)
    assert len(listed) == len(main.quarantined) > 20
    for item in listed:
        assert item["src_id"] in html
    for rel in main.quarantined:
        name = Path(rel).name
        if len(name) >= 8 and not name.isalpha():  # "DICOMDIR" is also a word of its reason
            assert name not in html, rel


def test_expected_outcomes(hostile):
    """Valid files are released, damaged ones quarantined (reasons in the message)."""
    main: Outcome = hostile["main"]
    expect: dict[str, Expect] = hostile["corpus"].expect
    assert set(expect) == set(hostile["entries"]), "the corpus expectations do not cover the walk"
    wrong = []
    for rel, e in sorted(expect.items()):
        if e.kind == "release" and rel not in main.released:
            wrong.append(f"should be released: {_explain(hostile, rel)}")
        elif e.kind == "quarantine" and rel not in main.quarantined:
            wrong.append(f"should be quarantined: {_explain(hostile, rel)}")
    groups: dict[str, list[str]] = {}
    for rel, e in expect.items():
        if e.group:
            groups.setdefault(e.group, []).append(rel)
    for g, members in groups.items():
        if sum(m in main.released for m in members) != 1:
            wrong.append(f"exactly one of group {g} should be released: "
                          + "; ".join(_explain(hostile, m) for m in members))
    assert not wrong, "\n".join(wrong)
    reasons = {rel: main.quarantined.get(rel, "") for rel in expect}
    assert "zero-byte" in reasons["hostile/empty.dcm"]
    assert "duplicate SOPInstanceUID" in (reasons["hostile/duplicate_sop/first.dcm"]
                                          + reasons["hostile/duplicate_sop/second.dcm"])
    assert "2 different patients" in reasons["hostile/two_patients_one_series/a.dcm"]
    assert "DICOMDIR" in reasons["hostile/DICOMDIR"]
    assert "symbolic link" in reasons["hostile/links/cycle_to_parent"]
    assert "not a regular file" in reasons["hostile/unreadable/fifo.dcm"]


def test_released_files_parse_and_hold_no_names(hostile):
    main: Outcome = hostile["main"]
    expect: dict[str, Expect] = hostile["corpus"].expect
    bad = []
    for rel, f in sorted(main.released.items()):
        try:
            ds = pydicom.dcmread(f)
            for _elem in ds.iterall():  # decode every element, sequences included
                pass
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.PatientID == f.relative_to(main.release_root).parts[0]
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert not [e.tag for e in ds.iterall() if e.tag.is_private], "private element released"
        except Exception as exc:  # noqa: BLE001 - collect them all
            bad.append(f"{rel!r} -> {f.name}: {type(exc).__name__}: {exc}")
            continue
        data = f.read_bytes()
        for s in expect[rel].absent if rel in expect else ():
            if s in data:
                bad.append(f"{rel!r}: {s!r} is in the released file")
    assert not bad, "\n".join(bad)


def test_specific_releases(hostile):
    main: Outcome = hostile["main"]
    blob = main.released.get("hostile/private_blob/blob_100mb.dcm")
    assert blob is not None and blob.stat().st_size < 1 << 20
    ds = pydicom.dcmread(blob)
    assert 0x00090010 not in ds and 0x00091010 not in ds
    for n, rel in ((12, "hostile/sequences/undefined_length_valid.dcm"),
                   (13, "hostile/sequences/undefined_length_valid_implicit.dcm")):
        ds = pydicom.dcmread(main.released[rel])
        ref = ds.ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID.startswith("2.25.") and ref.ReferencedSOPInstanceUID != _uid(n, 9, 1)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121311"
        # the code value holds the patient's family name (HOSTILE^PATIENT): the residual sweep stars it
        assert ds.PerformedProtocolCodeSequence[0].CodeValue == "*1"
        assert len(ds.PixelData) == 16 * 16 * 2
    for rel, name in (("hostile/charsets/ISO_IR_100.dcm", "Sørensen"), ("hostile/charsets/ISO_IR_192.dcm", "Ωμέγα"),
                      ("hostile/charsets/GB18030.dcm", "欧阳")):
        ds = pydicom.dcmread(main.released[rel])
        assert name not in str(ds.PatientName) and name not in str(ds.get("ReferringPhysicianName", ""))


def test_nothing_from_outside_the_input(hostile):
    main: Outcome = hostile["main"]
    marker = MARKER.encode()
    for root in (main.release_root.parent.parent, main.restricted):
        for p in root.rglob("*"):
            assert MARKER not in p.name, p
            if p.is_file() and not p.is_symlink():
                assert marker not in p.read_bytes(), f"the outside file's marker is in {p}"


def test_input_tree_unchanged(hostile):
    before, after = hostile["before"], hostile["after"]
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, [(k, before.get(k), after.get(k)) for k in changed]


def test_peak_rss_stays_below_1_gib(hostile):
    """The 100 MB blob is streamed (memory-mapped), the gzip bomb never inflated."""
    rss = hostile["main"].run.peak_rss_kb
    assert rss is not None, "the wrapper did not report RUSAGE_CHILDREN"
    assert rss < RSS_LIMIT_KB, f"peak RSS {rss / 1024:.0f} MiB >= 1 GiB"


def test_strict_run_fails_and_lists_the_same_files(hostile):
    strict: Outcome = hostile["strict"]
    assert strict.run.returncode != 0, strict.run.tail
    assert "strict_check" in strict.run.tail and not (strict.restricted / "strict.ok").exists()
    assert strict.quarantined == hostile["main"].quarantined  # same files, same reasons


def test_second_run_nothing_to_do_or_identical(hostile):
    second: Run = hostile["second"]
    assert second.returncode == hostile["main"].run.returncode, second.stdout[-2000:] + second.stderr[-2000:]
    assert hostile["release_first"], "no release after the first run"
    assert hostile["release_second"] == hostile["release_first"]


def test_mode_000_paths(hostile):
    """Root bypasses permission checks: a mode-000 file and the content of a mode-000 folder are
    readable and released.  Other users: both end in quarantine."""
    main: Outcome = hostile["main"]
    f, d = "hostile/unreadable/mode_000.dcm", "hostile/unreadable/locked_dir"
    if IS_ROOT:
        assert f in main.released and f"{d}/inside.dcm" in main.released, [_explain(hostile, f)]
    else:
        assert "not readable" in main.quarantined[f] and "not readable" in main.quarantined[d]
    assert "not a regular file" in main.quarantined["hostile/unreadable/fifo.dcm"]
    assert "symbolic link" in main.quarantined["hostile/links/broken.dcm"]


def test_complete_file_wins_over_partial_copy(hostile):
    """Regression (was: duplicates are resolved from headers before the release job finds the damage: the complete file is quarantined as a duplicate of a truncated partial copy that sorts first, so neither is released)."""
    main: Outcome = hostile["main"]
    partial, complete = "hostile/partial_copy/a_partial.dcm", "hostile/partial_copy/b_complete.dcm"
    assert partial in main.quarantined, _explain(hostile, partial)
    assert complete in main.released, _explain(hostile, complete)


def test_quarantine_tsv_one_line_per_file(hostile):
    """Regression (was: quarantine.tsv writes the path raw, so a name with a newline spans two lines and a name with a tab shifts the reason column)."""
    main: Outcome = hostile["main"]
    lines = main.quarantine_text.split("\n")
    assert lines[0] == "file\treason" and lines[-1] == ""
    body = lines[1:-1]
    assert len(body) == len(main.quarantined), (
        f"{len(body)} lines for {len(main.quarantined)} quarantined files")
    assert all(line.count("\t") == 1 for line in body), [ln for ln in body if ln.count("\t") != 1]


# ------------------------------------------------------------------------------------------------
# Inputs that crash the whole run today: small corpora of their own
# ------------------------------------------------------------------------------------------------
def _small_run(tmp_path: Path, hostile_name: bytes, data: bytes) -> tuple[Run, Outcome, str]:
    inp = tmp_path / "input"
    inp.mkdir()
    (inp / "good.dcm").write_bytes(encode(make_ds(40)))
    with open(os.path.join(os.fsencode(inp), hostile_name), "wb") as fh:
        fh.write(data)
    rel = os.fsdecode(hostile_name)
    entries = input_entries(inp)
    assert rel in entries and len(entries) == 2
    run = run_cli("run", str(inp), str(tmp_path / "release"), "--cores", "1")
    return run, observe(run, tmp_path / "release", entries), rel


def test_non_utf8_file_name_is_quarantined_not_fatal(tmp_path):
    """Regression (was: a file name that is not valid UTF-8 crashes the run at parse time: UnicodeEncodeError in Pseudonymizer.source_id (relpath encoded as UTF-8); pyarrow writing inventory.parquet fails the same way)."""
    run, out, rel = _small_run(tmp_path, b"latin1_\xe9\xff.dcm", b"not an image " * 40)
    assert run.returncode == 3, run.tail  # finished; incomplete by the one quarantined file
    assert "good.dcm" in out.released and rel in out.quarantined, out.quarantine_text


def test_newline_name_quarantined_by_the_release_job_is_not_fatal(tmp_path):
    """Regression (was: a damaged DICOM whose name holds a newline, quarantined by the release job, crashes the mapping job (work quarantine.tsv re-split into lines: ValueError on a line without a tab))."""
    full = encode(make_ds(41))
    px = offset_of(full, 0x7FE0, 0x0010, b"OW")
    run, out, rel = _small_run(tmp_path, b"cut\npixels.dcm", full[:px + 112])
    assert run.returncode == 3, run.tail  # finished; incomplete by the one quarantined file
    assert "good.dcm" in out.released and rel in out.quarantined, out.quarantine_text
