"""Red-team round 5: DICOM object types and encodings.

Identifiers planted where the engine copies bytes as they are: Pixel Data.  Each attack was
released with exit 0 before the fix (the leak scan does not read pixel data): text after a JPEG,
JPEG-LS or JPEG 2000 frame's end-of-image, in an extra fragment, in the Basic Offset Table,
after an RLE frame's segments, after the last frame of native data, and in a reserved JPEG
marker segment (JPGn) before the scan.  The frames decode to the same pixels afterwards, and
files without such bytes keep their Pixel Data byte for byte (every pydicom test file and every
real vendor file of ../shared/data)."""
from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from deidflow import codestreams
from deidflow.dicom import Scrubber, SubjectContext
from deidflow.dicomio import DicomError, deidentify_path, jpeg_frame_without_metadata
from deidflow.profile import build_plan
from deidflow.pseudonym import Pseudonymizer

from .conftest import ROOT, SHARED_DATA, TEST_KEY

SECRET = b"NIXON^NORA 4455667 19610423"


def _scrubber() -> Scrubber:
    return Scrubber(build_plan(options=(), private=None, overrides=()),
                    SubjectContext(Pseudonymizer(TEST_KEY.encode()), "sub-rt5", date_offset=-10))


def _even(b: bytes) -> bytes:
    return b + b"\x00" * (len(b) % 2)


def _after_end(frames, text=SECRET):
    return encapsulate([_even(frames[0] + text)], has_bot=True)


def _extra_fragment(frames, text=SECRET):
    return encapsulate(frames, has_bot=False) + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(_even(text))) \
        + _even(text)


def _text_offset_table(frames, text=SECRET):
    table = text + b"\x00" * (-len(text) % 4)
    body = b"".join(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(_even(f))) + _even(f) for f in frames)
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(table)) + table + body


def _reserved_marker(frames, text=SECRET):
    f = frames[0]
    return encapsulate([f[:2] + b"\xff\xf1" + struct.pack(">H", len(text) + 2) + text + f[2:]], has_bot=True)


def _rle_header_offsets(frames, text=SECRET):
    f = frames[0]
    n = struct.unpack("<I", f[:4])[0]
    slot = 4 + 4 * (n + 1)  # an unused offset of the header
    return encapsulate([f[:slot] + text[:4] + f[slot + 4:]], has_bot=True)


ATTACKS = [
    ("SC_rgb_jpeg_dcmtk.dcm", _after_end), ("SC_rgb_jpeg_dcmtk.dcm", _extra_fragment),
    ("SC_rgb_jpeg_dcmtk.dcm", _text_offset_table), ("SC_rgb_jpeg_dcmtk.dcm", _reserved_marker),
    ("MR_small_jp2klossless.dcm", _after_end), ("MR_small_jpeg_ls_lossless.dcm", _after_end),
    ("MR_small_RLE.dcm", _after_end), ("MR_small_RLE.dcm", _rle_header_offsets),
    ("JPEG-LL.dcm", _after_end),  # two fragments in one frame: the text after the last one
]


def _planted(tmp_path: Path, name: str, attack) -> Path:
    ds = pydicom.dcmread(get_testdata_file(name))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    ds.PixelData = attack(frames)
    ds["PixelData"].VR = "OB"
    path = tmp_path / f"{Path(name).stem}-{attack.__name__}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _pixels(path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path).pixel_array


@pytest.mark.parametrize("name, attack", ATTACKS, ids=[f"{n[:-4]}-{a.__name__[1:]}" for n, a in ATTACKS])
def test_text_hidden_in_encapsulated_pixel_data_is_removed(tmp_path, name, attack):
    """Text a decoder never reads (after the codestream's end, in an extra fragment, in the offset
    table, in a reserved marker segment, in an RLE header's unused offsets) was copied into the
    release; it is removed and every frame decodes to the same pixels."""
    src = _planted(tmp_path, name, attack)
    assert SECRET[:4] in src.read_bytes()
    dst = tmp_path / "out.dcm"
    result = deidentify_path(src, dst, _scrubber())
    assert SECRET[:4] not in dst.read_bytes()
    assert result.actions.get("PixelData") == "C"
    np.testing.assert_array_equal(_pixels(dst), _pixels(get_testdata_file(name)))


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "CT_small.dcm",
                                  "SC_rgb.dcm", "liver_1frame.dcm", "image_dfl.dcm"])
def test_text_after_the_last_native_frame_is_removed(tmp_path, name):
    """Native Pixel Data longer than its frames (text appended) kept the text; the value is cut
    after the last frame, in every encoding (a deflated data set too), 1-bit segmentations too."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PixelData = ds.PixelData + _even(SECRET)
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "out.dcm"
    deidentify_path(src, dst, _scrubber())
    assert SECRET[:4] not in dst.read_bytes()
    np.testing.assert_array_equal(_pixels(dst), _pixels(get_testdata_file(name)))


def test_frames_that_cannot_be_told_apart_are_quarantined(tmp_path):
    """Two RLE frames in three fragments without an offset table: which bytes are image cannot be
    known, so the file is refused (quarantined with a one-line reason), not copied."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate([frame, frame[:64], frame[64:]], has_bot=False)
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    with pytest.raises(DicomError, match="cannot be told apart"):
        deidentify_path(src, tmp_path / "out.dcm", _scrubber())


def test_reserved_jpeg_marker_segment_is_removed_from_frames():
    frame = next(generate_frames(pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).PixelData,
                                 number_of_frames=1))
    for marker in (b"\xff\xf1", b"\xff\xc8", b"\xff\x40", b"\xff\xfd"):
        planted = frame[:2] + marker + struct.pack(">H", len(SECRET) + 2) + SECRET + frame[2:]
        assert jpeg_frame_without_metadata(planted) == frame, marker


def _benign_files() -> list[str]:
    files = [f for f in get_testdata_files("*") if f.endswith(".dcm")]
    if SHARED_DATA.exists():
        for pattern in ("highdicom/data/test_files/*.dcm", "dcm_qa_ct_ge/In/**/*", "dcm_qa_ge/In/*/*",
                        "jsl_pseudo_phi/*.dcm"):
            files += [f for f in glob.glob(str(SHARED_DATA / pattern), recursive=True) if os.path.isfile(f)]
    return sorted(set(files))


def test_pixel_data_without_extra_bytes_stays_byte_identical():
    """Every pydicom test file and real vendor file (native, JPEG, JPEG-LS, JPEG 2000, RLE, 1-bit,
    multi-fragment and multi-frame, odd lengths padded with 0xFF) keeps its Pixel Data as it is."""
    checked = 0
    for f in _benign_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, force=True)
            ts = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
            g = codestreams.Geometry(int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1)),
                                     int(ds.BitsAllocated), int(ds.get("NumberOfFrames") or 1),
                                     str(ds.get("PhotometricInterpretation", "")).endswith("_422"))
            value = ds.PixelData
        except Exception:  # no pixel module, or a file pydicom cannot read: nothing to compare
            continue
        if "too_short" in f:
            continue
        assert codestreams.image_extent(value, ts, g) is value, f
        checked += 1
    assert checked > 100


def _run(inp, out, *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2", *args],
                          env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_text_in_pixel_streams_never_reaches_the_release(tmp_path):
    """End to end: one subject per attack (each its own name, MRN and birth date in the stream),
    the whole release searched byte by byte (also the BIDS NIfTI gunzipped): nothing of them is
    released, the run finishes with exit 0 and the pixels are the originals'."""
    import gzip
    inp = tmp_path / "in"
    planted = []
    for k, (name, attack) in enumerate(ATTACKS[:6] + [("MR_small.dcm", None)]):
        ds = pydicom.dcmread(get_testdata_file(name))
        mrn, fam = f"44556{k:02d}", f"NIXONIA{'ABCDEFGHIJ'[k]}"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{fam}^NORA", mrn, "19610423"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        text = f"{fam} {mrn}".encode()
        if attack is None:
            ds.PixelData = ds.PixelData + _even(text)
        else:
            frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
            ds.PixelData = attack(frames, text)
            ds["PixelData"].VR = "OB"
        (inp / f"p{k}").mkdir(parents=True)
        ds.save_as(inp / f"p{k}" / "1.dcm", enforce_file_format=True)
        planted += [fam.encode(), mrn.encode()]
    out = tmp_path / "out"
    r = _run(inp, out, "face.method=none")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    released = [p for p in out.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".dcm" for p in released) == 7
    for p in released:
        blob = p.read_bytes()
        if p.name.endswith(".gz"):
            blob += gzip.decompress(blob)
        for s in planted:
            assert s not in blob, (p, s)



@pytest.mark.parametrize("options, expected", [
    ((), ("", "", "19000101000000")),
    (("retain_long_modified_dates",), ("20190422", "101010", "20191222101010")),
    (("retain_long_full_dates",), ("20190502", "101010", "20200101101010")),
])
def test_dates_the_profile_does_not_list_follow_the_date_options(tmp_path, options, expected):
    """SecondaryReviewDate/Time and ExpirationDateTime are in no row of PS3.15 Table E.1-1: they
    were released with their original values under the Basic Profile.  They follow the
    acquisition date's rule: removed (or a dummy), shifted, or kept under full dates."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SecondaryReviewDate, ds.SecondaryReviewTime, ds.ExpirationDateTime = "20190502", "101010", "20200101101010"
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    scrubber = Scrubber(build_plan(options=options, private=None, overrides=()),
                        SubjectContext(Pseudonymizer(TEST_KEY.encode()), "sub-rt5", date_offset=-10))
    deidentify_path(src, tmp_path / "out.dcm", scrubber)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    got = tuple(str(out.get(k) or "") for k in ("SecondaryReviewDate", "SecondaryReviewTime", "ExpirationDateTime"))
    assert got == expected


@pytest.mark.parametrize("name, attack", [ATTACKS[0], ATTACKS[2], ATTACKS[6], ("MR_small.dcm", None)],
                         ids=["jpeg-after-end", "offset-table", "rle-after-end", "native-tail"])
def test_leak_scan_withholds_pixel_data_with_bytes_outside_the_image(tmp_path, name, attack):
    """Defense in depth: a release file whose Pixel Data holds bytes no decoder reads (which the
    engine removes, and which the leak scan does not search) is a hit of kind ``unscanned``; the
    same file without them is clean."""
    from deidflow.qc import identifiers, leakscan
    matcher = identifiers.matcher_for([("name", "PatientName", "NIXON^NORA")])
    clean = leakscan.scan_file(Path(get_testdata_file(name)), "clean.dcm", matcher)
    assert not clean.hits
    if attack is None:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.PixelData = ds.PixelData + _even(b"some text")
        planted = tmp_path / "planted.dcm"
        ds.save_as(planted, enforce_file_format=True)
    else:
        planted = _planted(tmp_path, name, lambda frames: attack(frames, b"some text"))
    hits = leakscan.scan_file(planted, "planted.dcm", matcher).hits
    assert [h.kind for h in hits] == ["unscanned"]



def test_safe_private_value_in_sr_content_is_cleaned_under_clean_structured_content(tmp_path):
    """A safe-listed private element (Philips 2001,xx90) inside a content item of a real SR kept
    the document's own SOP Instance UID and the patient's name under the research options: the
    content's person names were collected by decoding every element of each item, which turned
    the raw private value into a decoded one that the private-value cleaning skipped (found by
    the fuzz suite in this round)."""
    ds = pydicom.dcmread(SHARED_DATA / "highdicom/data/test_files/sr_document.dcm") if (
        SHARED_DATA / "highdicom/data/test_files/sr_document.dcm").exists() else pydicom.dcmread(
        get_testdata_file("test-SR.dcm"))
    ds.PatientName, ds.PatientID = "NIXON^NORA", "4455667"
    uid = str(ds.SOPInstanceUID)
    item = ds.ContentSequence[0]
    item.add_new(0x20010010, "LO", "Philips Imaging DD 001")
    item.add_new(0x20011090, "LO", f"ref {uid} NIXON")
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    scrubber = Scrubber(build_plan(options=("clean_structured_content",), private="safe", overrides=()),
                        SubjectContext(Pseudonymizer(TEST_KEY.encode()), "sub-rt5", date_offset=-10))
    deidentify_path(src, tmp_path / "out.dcm", scrubber)
    blob = (tmp_path / "out.dcm").read_bytes()
    assert uid.encode() not in blob and b"NIXON" not in blob
    assert 0x20011090 in pydicom.dcmread(tmp_path / "out.dcm").ContentSequence[0]  # kept, cleaned


def test_extra_bytes_with_an_extended_offset_table_are_quarantined(tmp_path):
    """With an Extended Offset Table the frames' offsets and lengths live outside Pixel Data:
    removing bytes would leave them wrong, so the file is refused rather than rewritten."""
    from pydicom.encaps import encapsulate_extended
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    frames = [frame, _even(frame + SECRET)]
    ds.NumberOfFrames = 2
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    ds["PixelData"].VR = "OB"
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    with pytest.raises(DicomError, match="Extended Offset Table"):
        deidentify_path(src, tmp_path / "out.dcm", _scrubber())


@pytest.mark.parametrize("box_size", ["sized", "to-end"])
def test_text_after_the_codestream_box_of_a_jp2_wrapped_frame_is_cut(box_size):
    """A JPEG 2000 frame wrapped as a JP2 file (not what DICOM asks for, but decoders read it)
    ends with its codestream box; bytes after it are no part of the image."""
    frame = next(generate_frames(pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm")).PixelData,
                                 number_of_frames=1))

    def box(kind: bytes, payload: bytes, size: int | None = None) -> bytes:
        return struct.pack(">I", 8 + len(payload) if size is None else size) + kind + payload
    jp2 = box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ") + box(
        b"jp2c", frame, None if box_size == "sized" else 0)
    assert codestreams.j2k_end(jp2 + SECRET) == len(jp2)
    value = encapsulate([_even(jp2 + SECRET)], has_bot=False)
    out = codestreams.image_extent(value, "1.2.840.10008.1.2.4.90", codestreams.Geometry(64, 64, 1, 16, 1))
    assert SECRET not in out and jp2 in out


def test_text_after_float_pixel_data_is_removed(tmp_path):
    """Float Pixel Data (a parametric map) is native data too: bytes after its frames go."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    del ds.PixelRepresentation
    ds.BitsAllocated, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 1, "MONOCHROME2"
    del ds.BitsStored, ds.HighBit
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"
    values = np.linspace(0, 1, int(ds.Rows) * int(ds.Columns), dtype="<f4")
    ds.FloatPixelData = values.tobytes() + _even(SECRET)
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    deidentify_path(src, tmp_path / "out.dcm", _scrubber())
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert SECRET[:4] not in (tmp_path / "out.dcm").read_bytes()
    assert out.FloatPixelData == values.tobytes()


def test_encapsulated_document_is_refused_by_the_pixel_step_with_its_own_reason():
    """An encapsulated PDF or CDA (the name in its text) is withheld by the pixel step; the
    quarantine list said "image pixel module incomplete: AttributeError"."""
    from pydicom.dataset import Dataset

    from deidflow.pixels.pixeldata import Frames, PixelDataError
    ds = Dataset()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 NIXON NORA"
    with pytest.raises(PixelDataError, match="encapsulated document"):
        Frames(ds)
