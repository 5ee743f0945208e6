"""Red-team round 6 (lead): bytes nobody could measure.

Pixel Data whose pixel module is incomplete (no Rows, no Bits Allocated) cannot be decoded, so
the burned-in text screen saw "no image", the engine could not tell the frames from bytes after
them, and the leak scan does not search pixel data: text appended to it was released with exit 0.
Such files are now withheld by the engine with their own reason, and the leak scan counts them as
not scanned."""
from __future__ import annotations

import os
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
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
                        "--set", "face.method=none", "--set", "outputs.bids=false"],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    quarantine = (tmp_path / "out_restricted" / "quarantine.tsv").read_text()
    assert quarantine.count(INCOMPLETE_PIXEL_MODULE) == 2
    released = [p for p in out.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".dcm" for p in released) == 1
    for p in released:
        blob = p.read_bytes()
        assert b"NIXONI" not in blob and b"773310" not in blob, p
