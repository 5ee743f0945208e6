"""Red-team round 6 (lead): bytes nobody could measure.

Pixel Data whose pixel module is incomplete (no Rows, no Bits Allocated) cannot be decoded, so
the burned-in text screen saw "no image", the engine could not tell the frames from bytes after
them, and the leak scan does not search pixel data: text appended to it was released with exit 0.
Such files are now withheld by the engine with their own reason, and the leak scan counts them as
not scanned."""
from __future__ import annotations

import os
import struct
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from deidflow.dicom import Scrubber, SubjectContext
from deidflow.dicomio import INCOMPLETE_PIXEL_MODULE, DicomError, deidentify_path
from deidflow.profile import build_plan
from deidflow.pseudonym import Pseudonymizer

from .conftest import ROOT, TEST_KEY

SECRET = b"NIXONIA 7733100"


RESEARCH_HEADERS = ("face.method=none", "pixels.clean=off", "profile.preset=research", "outputs.bids=false")


def _run(inp: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    """``deidflow run`` of ``inp`` into ``out`` with ``--set`` values ``sets``."""
    return subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
                           *[a for v in sets for a in ("--set", v)]],
                          env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _scrubber() -> Scrubber:
    return Scrubber(build_plan(options=(), private=None, overrides=()),
                    SubjectContext(Pseudonymizer(TEST_KEY.encode()), "sub-rt6", date_offset=-10))


def _incomplete(path: Path, missing: str, file_meta: bool = True) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelData = ds.PixelData + SECRET + b"\x00" * (len(SECRET) % 2)
    delattr(ds, missing)
    if file_meta:
        ds.save_as(path, enforce_file_format=True)
    else:  # no file meta: the engine reads it with pydicom
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


@pytest.mark.parametrize("missing", ["Rows", "Columns", "BitsAllocated"])
@pytest.mark.parametrize("file_meta", [True, False], ids=["stream", "pydicom"])
def test_pixel_data_without_a_complete_pixel_module_is_withheld_by_the_engine(tmp_path, missing, file_meta):
    src = _incomplete(tmp_path / "in.dcm", missing, file_meta)
    with pytest.raises(DicomError) as err:
        deidentify_path(src, tmp_path / "out" / "x.dcm", _scrubber())
    assert str(err.value) == INCOMPLETE_PIXEL_MODULE
    assert not list((tmp_path / "out").iterdir())  # nothing half-written stays


def test_a_file_without_pixel_data_needs_no_pixel_module(tmp_path):
    """An SR or a presentation state has no Pixel Data and no pixel module: still released."""
    src = Path(get_testdata_file("test-SR.dcm"))
    res = deidentify_path(src, tmp_path / "x.dcm", _scrubber())
    assert res.pixel_bytes == 0 and (tmp_path / "x.dcm").is_file()


@pytest.mark.parametrize("missing", ["Rows", "BitsAllocated"])
def test_leak_scan_counts_pixel_data_it_cannot_measure_as_not_scanned(tmp_path, missing):
    """Defence in depth: had such a file reached the release, the leak scan (which does not search
    pixel data) would not have trusted it."""
    from deidflow.qc import identifiers, leakscan
    matcher = identifiers.matcher_for([("name", "PatientName", "NIXON^NORA")])
    hits = leakscan.scan_file(_incomplete(tmp_path / "x.dcm", missing), "x.dcm", matcher).hits
    assert [h.kind for h in hits] == ["unscanned"]
    assert "pixel module" in hits[0].location


@pytest.mark.slow
def test_text_in_unmeasurable_pixel_data_never_reaches_the_release(tmp_path):
    """End to end: a subject whose only image lacks Rows (the screen said "no image") and one
    that lacks Bits Allocated are withheld with the engine's reason; the run says the release is
    incomplete; the third subject, whose text sits after a complete native frame, is published
    with the text cut."""
    inp = tmp_path / "in"
    for k, missing in enumerate(["Rows", "BitsAllocated", None]):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"NIXONI{k}^NORA", f"773310{k}", "19610423"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.PixelData = ds.PixelData + f"NIXONI{k} 773310{k} ".encode()
        if missing:
            delattr(ds, missing)
        (inp / f"p{k}").mkdir(parents=True)
        ds.save_as(inp / f"p{k}" / "1.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    r = _run(inp, out, "face.method=none", "outputs.bids=false")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    quarantine = (tmp_path / "out_restricted" / "quarantine.tsv").read_text()
    assert quarantine.count(INCOMPLETE_PIXEL_MODULE) == 2
    released = [p for p in out.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".dcm" for p in released) == 1
    for p in released:
        blob = p.read_bytes()
        assert b"NIXONI" not in blob and b"773310" not in blob, p


# -- UTF-16 text of other scripts in kept binary values ----------------------------------------------
OTHER_SCRIPTS = [("Иванова^Мария", "Пациент: Иванова Мария"), ("山田^花子", "患者氏名 山田花子 様"),
                 ("Łukasiewicz^Żaneta", "Pacjent: ŁUKASIEWICZ Żaneta"), ("Παπαδοπούλου^Ελένη", "Ασθενής Παπαδοπούλου")]


@pytest.mark.parametrize("name, text", OTHER_SCRIPTS, ids=["cyrillic", "japanese", "polish", "greek"])
@pytest.mark.parametrize("enc", ["utf-16-le", "utf-16-be", "utf-16"])
def test_utf16_text_of_other_scripts_is_found_and_swept(name, text, enc):
    """Round 3 taught the matcher UTF-16 text in binary values, in the Latin-1 range only: a
    Cyrillic, Japanese, Polish or Greek name written by a Windows device into a kept OB value was
    not found, so neither swept nor seen by the leak scan."""
    from deidflow.qc import identifiers
    m = identifiers.matcher_for([("name", "PatientName", name)])
    family = name.split("^")[0]
    blob = b"\x01\x02\x00\x00" + text.encode(enc) + b"\x00\x00\x07"
    assert m.spans(blob), (enc, text)
    red = m.redact(blob)
    assert len(red) == len(blob)
    for v in (family, family.upper()):
        assert v.encode("utf-16-le") not in red and v.encode("utf-16-be") not in red


@pytest.mark.slow
def test_utf16_other_script_name_in_safe_private_blob_not_released(tmp_path):
    """End to end (research preset keeps the safe-listed SIEMENS Ultrasound SC2000 state blob):
    the patient's Cyrillic name in it, in UTF-16, is swept; the rest of the blob stays."""
    inp = tmp_path / "in" / "p1"
    inp.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Иванова^Мария", "58213907", "19610423"
    blk = ds.private_block(0x0129, "SIEMENS Ultrasound SC2000", create=True)
    blob = "<State><Patient>Иванова Мария</Patient><Probe>4V1c</Probe></State>".encode("utf-16")
    blk.add_new(0x10, "OB", blob)
    ds.save_as(inp / "1.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    r = _run(inp.parent, out, *RESEARCH_HEADERS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    released = [p.read_bytes() for p in out.rglob("*.dcm")]
    assert len(released) == 1
    for v in ("Иванова", "ИВАНОВА", "Мария"):
        assert v.encode("utf-16-le") not in released[0] and v.encode("utf-16-be") not in released[0], v
    assert "4V1c".encode("utf-16-le") in released[0]  # the rest of the kept value stays


# -- a slide label stored as a few tiles that does not say what it is -------------------------------
def _tiled(src: Path, img, tiles: tuple[int, int], path: Path, image_type: str = "VOLUME") -> Path:
    """A whole-slide image of ``img`` cut into ``tiles`` (rows, columns) of equal size, TILED_FULL,
    native RGB, with highdicom's ``src`` as the template; it does not declare a label."""
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian
    arr = np.asarray(img.convert("RGB"))
    th, tw = arr.shape[0] // tiles[0], arr.shape[1] // tiles[1]
    frames = [arr[r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(tiles[0]) for c in range(tiles[1])]
    ds = pydicom.dcmread(src)
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = th, tw
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = th * tiles[0], tw * tiles[1]
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    if "PerFrameFunctionalGroupsSequence" in ds:
        del ds.PerFrameFunctionalGroupsSequence
    ds.SpecimenLabelInImage = "NO"  # what a careless export says
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_slide_label_stored_as_a_few_tiles_is_withheld(tmp_path):
    """A slide label ("DOE, JANE", a specimen number) stored as a 2 x 2 tiled VOLUME image that
    says SpecimenLabelInImage NO was released unscreened, pixels unchanged: every tiled
    whole-slide image counted as a pyramid level of tissue.  An image of a few tiles is now
    screened tile by tile, and withheld when text is found (tiles are not cleaned, and the text
    crosses them); a tiled image of a few tiles without text keeps its pixels bit for bit, and
    real pyramid levels (25 tiles) are still not screened."""
    from PIL import Image, ImageDraw, ImageFont

    from .test_pixels_realdata import WSI, pixel_hash, run_subject
    from .conftest import require_shared
    src = require_shared(*WSI.parts) / "sm_image.dcm"
    font = ImageFont.load_default(size=30)
    label = Image.new("RGB", (480, 200), "white")
    d = ImageDraw.Draw(label)
    d.text((20, 30), "S19-4711 A1", fill="black", font=font)
    d.text((20, 110), "DOE, JANE", fill="black", font=font)
    tissue = Image.new("RGB", (480, 200), (236, 236, 240))
    td = ImageDraw.Draw(tissue)
    for k in range(30):  # pink blobs
        x, y = 10 + (k * 37) % 420, 10 + (k * 53) % 160
        td.ellipse([x, y, x + 40, y + 30], fill=(200, 120 + k % 40, 170))
    made = tmp_path / "made"
    made.mkdir()
    files = {"label.dcm": _tiled(src, label, (2, 2), made / "label.dcm"),
             "tissue.dcm": _tiled(src, tissue, (2, 2), made / "tissue.dcm"), "level.dcm": src}
    out_dir, _, bad, audit = run_subject(files, tmp_path / "run", {"clean": "auto"})
    assert not (out_dir / "label.dcm").exists()
    assert len(bad) == 1 and "stored as tiles shows text" in bad[0][1], bad
    for name in ("tissue.dcm", "level.dcm"):
        assert pixel_hash(out_dir / name) == pixel_hash(files[name])


# -- a file copied over another with its times kept (cp -p) -----------------------------------------
def _patient(path: Path, name: str, mrn: str) -> None:
    """A file of ``name``; every such file has the same size (UIDs of one length: generate_uid's vary)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID = name, mrn
    base = 10 ** 37 + int(mrn) * 10
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (f"2.25.{base + k}" for k in range(3))
    ds.save_as(path, enforce_file_format=True)


def test_file_copied_over_with_its_times_kept_is_examined_again(tmp_path):
    """The inventory reused its cached row (the patient, the subject) for a file of the same size
    and modification time, so another patient's file copied over it with ``cp -p`` (same
    protocol, same size; times kept) was released under the first patient's pseudonym, swept with
    the first patient's identifiers.  The status-change time (ctime) is now part of what makes a
    file the one examined: the inventory reads it again, and a job that meets it after the
    inventory quarantines it."""
    from deidflow import inventory
    from deidflow.fsutil import changed_input
    inp = tmp_path / "in"
    inp.mkdir()
    _patient(inp / "a.dcm", "NIXON^NORA", "7733100")
    _patient(tmp_path / "other.dcm", "MASON^MARA", "7733999")
    assert (inp / "a.dcm").stat().st_size == (tmp_path / "other.dcm").stat().st_size
    pseudo = Pseudonymizer(TEST_KEY.encode())
    first = inventory.build(inp, pseudo)
    restricted = tmp_path / "restricted"
    restricted.mkdir()
    inventory.write(first, restricted)
    (row,) = first.rows
    old = (inp / "a.dcm").stat()
    os.utime(tmp_path / "other.dcm", ns=(old.st_atime_ns, old.st_mtime_ns))
    shutil.copy2(tmp_path / "other.dcm", inp / "a.dcm")  # what cp -p does: content and times
    now = (inp / "a.dcm").stat()
    assert (now.st_size, now.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert "changed since the inventory" in changed_input(inp, row)
    again = inventory.build(inp, pseudo, previous=restricted / "inventory.parquet")
    (row2,) = again.rows
    assert row2["subject"] != row["subject"] and row2["patient_id"] == "7733999"


# -- barcodes and QR codes next to burned-in text --------------------------------------------------
def _ean13(digits12: str) -> str:
    """The module pattern (1 = bar) of the EAN-13 code of ``digits12`` plus its check digit."""
    L = ["0001101", "0011001", "0010011", "0111101", "0100011", "0110001", "0101111", "0111011", "0110111", "0001011"]
    G = ["0100111", "0110011", "0011011", "0100001", "0011101", "0111001", "0000101", "0010001", "0001001", "0010111"]
    R = ["1110010", "1100110", "1101100", "1000010", "1011100", "1001110", "1010000", "1000100", "1001000", "1110100"]
    P = ["LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG", "LGGLLG", "LGGGLL", "LGLGLG", "LGLGGL", "LGGLGL"]
    s = sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(digits12))
    d = [int(c) for c in digits12 + str((10 - s % 10) % 10)]
    return ("101" + "".join((L if p == "L" else G)[x] for p, x in zip(P[d[0]], d[1:7])) + "01010"
            + "".join(R[x] for x in d[7:]) + "101")


def test_barcode_and_qr_code_on_a_screened_label_are_blanked_with_its_text(tmp_path):
    """A slide label stored as a one-frame whole-slide image was screened and its text blanked, but
    its barcode and QR code (the specimen number and the patient, machine-readable) were released
    as they were: the text reader does not read them.  A frame with text now has its codes
    blanked too; afterwards neither is found."""
    import cv2
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from .test_pixels_realdata import WSI, run_subject
    from .conftest import require_shared
    src = require_shared(*WSI.parts) / "sm_image.dcm"
    label = Image.new("RGB", (720, 300), "white")
    d = ImageDraw.Draw(label)
    font = ImageFont.load_default(size=30)
    d.text((20, 20), "S19-4711 A1", fill="black", font=font)
    d.text((20, 70), "DOE, JANE", fill="black", font=font)
    for k, bit in enumerate(_ean13("400638133393")):  # EAN-13, 3 px a module, quiet zones around
        if bit == "1":
            d.rectangle([40 + 3 * k, 140, 42 + 3 * k, 270], fill="black")
    qr = cv2.QRCodeEncoder.create().encode("S19-4711 DOE JANE 7733100")
    qr = cv2.resize(qr, None, fx=5, fy=5, interpolation=cv2.INTER_NEAREST)
    label.paste(Image.fromarray(qr).convert("RGB"), (520, 40))
    made = tmp_path / "made"
    made.mkdir()
    path = _tiled(src, label, (1, 1), made / "label.dcm")
    before = pydicom.dcmread(path).pixel_array.max(axis=-1)
    assert cv2.barcode.BarcodeDetector().detect(cv2.GaussianBlur(before, (3, 3), 0))[0]
    assert cv2.QRCodeDetector().detectAndDecode(before)[0] == "S19-4711 DOE JANE 7733100"
    out_dir, _, bad, audit = run_subject({"label.dcm": path}, tmp_path / "run", {"clean": "auto"})
    assert bad == []
    (record,) = [a["pixels"] for a in audit]
    assert record["action"] == "redacted", record
    after = pydicom.dcmread(out_dir / "label.dcm").pixel_array.max(axis=-1)
    assert not cv2.barcode.BarcodeDetector().detect(cv2.GaussianBlur(after, (3, 3), 0))[0]
    assert not cv2.QRCodeDetector().detectAndDecode(after)[0]
    for rows, cols in ((slice(140, 271), slice(40, 325)), (slice(45, 160), slice(525, 640))):  # bars, QR modules
        assert np.ptp(after[rows, cols]) == 0 and np.ptp(before[rows, cols]) > 0  # filled: one value


# -- zlib and gzip streams in kept binary values ---------------------------------------------------
@pytest.mark.parametrize("pack", ["zlib", "zlib-1", "zlib-9", "gzip-ge"])
def test_identifiers_in_compressed_streams_are_found_and_swept(pack):
    """A kept binary value holding a compressed stream (GE's Protocol Data Block is gzip behind a
    4-byte length; devices keep zlib-compressed XML state): the patient's name and MRN in it were
    neither swept nor seen by the leak scan.  The stream is inflated and searched; a hit covers the
    whole stream, which the sweep fills."""
    import gzip
    import zlib

    from deidflow.qc import identifiers
    m = identifiers.matcher_for([("name", "PatientName", "ZLIBSON^NORA"), ("id", "PatientID", "55443321")])
    xml = b'SEDESC "T1 for Nora Zlibson"\nNOTE "MRN 55443321"\n' * 4
    packed = {"zlib": zlib.compress(xml), "zlib-1": zlib.compress(xml, 1), "zlib-9": zlib.compress(xml, 9),
              "gzip-ge": struct.pack("<I", len(xml)) + gzip.compress(xml)}[pack]
    blob = b"\x00\x01head" + packed + b"tail\x00"
    hits = m.spans(blob)
    assert {n.kind for _, _, n in hits} == {"name", "id"}
    red = m.redact(blob)
    assert red.startswith(b"\x00\x01head") and red.endswith(b"tail\x00") and len(red) == len(blob)
    start = 6 + (4 if pack == "gzip-ge" else 0)
    with pytest.raises(zlib.error):
        zlib.decompressobj(47).decompress(red[start:])
    clean = b"\x00" + zlib.compress(b'SEDESC "T1 MPRAGE"\n' * 4) + b"\x00"
    assert not m.spans(clean) and m.redact(clean) is clean  # a stream without identifiers is kept as it is


@pytest.mark.slow
def test_compressed_name_in_safe_private_blob_not_released(tmp_path):
    """End to end (research preset keeps the safe-listed SIEMENS Ultrasound SC2000 blob): a
    zlib-compressed XML state naming the patient was released with exit 0."""
    import zlib
    inp = tmp_path / "in" / "p1"
    inp.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "ZLIBSON^NORA", "55443321", "19610423"
    blk = ds.private_block(0x0129, "SIEMENS Ultrasound SC2000", create=True)
    blk.add_new(0x10, "OB", zlib.compress(b"<State><Patient>ZLIBSON, NORA</Patient><MRN>55443321</MRN></State>"))
    ds.save_as(inp / "1.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    r = _run(inp.parent, out, *RESEARCH_HEADERS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (released,) = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    value = released[0x0129, 0x1010].value
    for probe in (value, zlib.decompressobj().decompress(value) if value[:1] == b"x" else b""):
        assert b"ZLIBSON" not in probe and b"55443321" not in probe


def test_uids_inside_ge_protocol_data_block_are_keyed():
    """GE's Protocol Data Block (gzip, safe-listed for dcm2niix) repeats the paradigm UID of
    (0043,1072), which the profile keys: the block kept the original, which the leak scan now
    reads inside compressed streams (it withheld every GE fMRI subject under dicom.private safe).
    The block's text is cleaned with its embedded UIDs keyed, the rest of it kept."""
    import glob
    import gzip
    import zlib

    from .conftest import require_shared
    folder = require_shared("dcm_qa_ge", "In", "SliceTiming", "14_Ax_fMRI_HB3_48sl_int_asc")
    ds = pydicom.dcmread(sorted(glob.glob(str(folder / "*.dcm")))[0], stop_before_pixels=True)
    original_uid = str(ds[0x0043, 0x1072].value)
    block = ds[0x0025, 0x101B].value
    before = gzip.decompress(block[4:])
    assert original_uid.encode() in before
    new = _scrubber().clean_private("GEMS_SERS_01", 0x0025101B, block)
    after = zlib.decompressobj(31).decompress(new[4:])
    assert original_uid.encode() not in after
    uid_line = [ln for ln in after.splitlines() if ln.startswith(b"PDGMUID ")]
    assert len(uid_line) == 1 and len(uid_line[0]) == len(b'PDGMUID ""') + len(original_uid)  # keyed, same length
    for key in (b"SLICEORDER", b"TR", b"FLIPANG", b"NUMSHOTS"):  # what dcm2niix reads stays
        assert [ln for ln in before.splitlines() if ln.startswith(key + b" ")] == \
            [ln for ln in after.splitlines() if ln.startswith(key + b" ")]


def test_a_one_pixel_code_box_is_grown_without_endless_recursion():
    """A degenerate detection (all four corners on one pixel) gave a 1 x 1 box whose bar profiles
    compare NaN; the box is kept as it is instead of transposing for ever."""
    import numpy as np

    from deidflow.pixels.codes import _along_bars
    img = np.full((40, 40), 255, np.uint8)
    assert _along_bars(img, (5, 5, 6, 6)) == (5, 5, 6, 6)
