"""BIDS release on real data: conversion parity, private=safe diffusion, no original identifier.

Two releases are built with ``deidflow run`` (the whole workflow) from copies of ../shared/data:

* ``basic``: default profile (private attributes removed from the released DICOM): dcm_qa_xa30 series 5, 6 and the Phoenix
  document series, dcm_qa_decubitus HFS and HFP.
* ``safe``: ``dicom.private: safe``: the Siemens DTI mosaic of nibabel (0.dcm, 1.dcm) and xa30
  series 5.

Parity means: voxel data identical (values and type), affine within 1e-4, and every field of the
reference sidecar equal, except the fields listed below that the profile removes *by design*.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deidflow.bids import dcm2niix

from .conftest import ROOT, TEST_KEY, assert_finished, require_shared
from .test_realdata_dicom import Ident, _fail_on_hits, collect_identifiers, scan_bytes, scan_tree

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.workflow]

# Removed by the profile whatever the private policy: identity, institution and device, free text
# (descriptions and protocol names: basic profile without clean_descriptors), the time of day
# (basic profile without a longitudinal option), and dcm2niix's BidsGuess (built from the protocol
# name text).
REMOVED_IDENTITY = {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                    "DeviceSerialNumber", "StationName", "ProcedureStepDescription", "StudyDescription",
                    "SeriesDescription", "ProtocolName", "AcquisitionTime", "BidsGuess"}
# Vendor private elements: none lost, whatever dicom.private says. dcm2niix converts the restricted
# working copy (deidflow.bids.workcopy, issue 20), so the fields that came from the Siemens CSA
# headers, the XA SDS/SDI sequences and the XProtocol blob equal the reference; the released DICOM
# still follows dicom.private (tests/test_bids_parity.py covers remove, safe and keep).
# Ref/*.json was written by dcm2niix v1.0.20260416; the pinned v1.0.20260724 names the sequence
# SequenceName instead of PulseSequenceName, no longer writes PartialFourier for XA 3D and adds a few
# derived fields (tests/test_bids_parity.py compares with the pinned binary on the originals instead).
VERSION_ONLY = {"ConversionSoftwareVersion", "PulseSequenceName", "PartialFourier"}
CORE_FIELDS = ("RepetitionTime", "EchoTime", "FlipAngle", "MagneticFieldStrength", "ImageType", "Modality",
               "MRAcquisitionType", "SliceThickness", "Manufacturer", "ManufacturersModelName")


def _run(inp: Path, out: Path, *extra: str) -> None:
    """A release without defacing: these tests compare the conversion itself with dcm2niix's
    references voxel for voxel (tests/test_face_realdata.py covers the defaced release)."""
    env = {**os.environ, "DEIDFLOW_KEY": TEST_KEY}
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
                        "--set", "face.method=none", *extra],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert_finished(r, out)


def _images(restricted: Path) -> dict[str, list[dict]]:
    """Series folder name prefix (e.g. MR005) -> images of the convert done markers."""
    out: dict[str, list[dict]] = {}
    for marker in sorted((restricted / "done" / "convert").glob("*.json")):
        for subj in json.loads(marker.read_text())["subjects"]:
            for im in subj["images"]:
                out.setdefault(im["series"].split("/")[1].split("-")[0], []).append(im)
    return out


def _not_converted(restricted: Path) -> list[dict]:
    return [nc for m in sorted((restricted / "done" / "convert").glob("*.json"))
            for s in json.loads(m.read_text())["subjects"] for nc in s["not_converted"]]


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    xa30, dec = require_shared("dcm_qa_xa30"), require_shared("dcm_qa_decubitus")
    base = tmp_path_factory.mktemp("bids-basic")
    inp = base / "input"
    for name in ("5_anat-T1w_acq-tfl", "6_anat-T1w_acq-tfl", "99_Phoenix_Document"):
        shutil.copytree(xa30 / "In" / name, inp / "xa30" / name)
    for pos in ("HFS", "HFP"):
        shutil.copytree(dec / "In" / pos, inp / "decubitus" / pos)
    _run(inp, base / "release")
    return {"input": inp, "out": base / "release", "restricted": base / "release_restricted", "base": base}


@pytest.fixture(scope="module")
def safe(tmp_path_factory):
    nib_dir, xa30 = require_shared("nibabel"), require_shared("dcm_qa_xa30")
    base = tmp_path_factory.mktemp("bids-safe")
    inp = base / "input"
    (inp / "dti").mkdir(parents=True)
    for name in ("0.dcm", "1.dcm"):
        shutil.copyfile(nib_dir / name, inp / "dti" / name)
    shutil.copytree(xa30 / "In" / "5_anat-T1w_acq-tfl", inp / "xa30" / "5")
    _run(inp, base / "release", "--set", "dicom.private=safe")
    return {"input": inp, "out": base / "release", "restricted": base / "release_restricted", "base": base}


def _reference_conversion(series_dir: Path, dest: Path) -> Path:
    """dcm2niix (the pinned binary) on an original series, as a user would run it."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([dcm2niix.executable(), "-z", "n", "-f", "ref", "-o", str(dest), str(series_dir)],
                   check=True, capture_output=True)
    return dest / "ref.nii"


def _assert_same_image(ours: Path, ref: Path) -> None:
    a, b = nib.load(ours), nib.load(ref)
    assert a.get_data_dtype() == b.get_data_dtype()
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), f"voxels differ: {ours.name}"
    assert np.allclose(a.affine, b.affine, atol=1e-4, rtol=0), f"affine differs: {ours.name}"


def _assert_sidecar_parity(ours: dict, ref: dict, removed: set[str]) -> None:
    for key in CORE_FIELDS:
        if key in ref:
            assert ours.get(key) == ref[key], key
    for key, value in ref.items():
        if key in removed:
            assert key not in ours, f"{key} should be removed by design"
        elif key in VERSION_ONLY:
            continue
        else:
            assert key in ours and ours[key] == value, f"{key}: {ours.get(key)!r} != reference {value!r}"
    if "PulseSequenceName" in ref:
        assert ours.get("SequenceName", ref["PulseSequenceName"]) == ref["PulseSequenceName"]


def _sidecar(out: Path, image: dict) -> dict:
    return json.loads((out / image["nifti"].replace(".nii.gz", ".json")).read_text())


@pytest.mark.parametrize("series", ["5", "6"])
def test_xa30_parity_with_ref(basic, series):
    ref_dir = require_shared("dcm_qa_xa30", "Ref")
    [image] = _images(basic["restricted"])[f"MR00{series}"]
    assert image["datatype"] == "anat" and image["suffix"] == "T1w"
    ref = ref_dir / f"{series}_anat-T1w_acq-tfl"
    _assert_same_image(basic["out"] / image["nifti"], ref.with_suffix(".nii"))
    _assert_sidecar_parity(_sidecar(basic["out"], image), json.loads(ref.with_suffix(".json").read_text()),
                           REMOVED_IDENTITY)


def test_xa30_repeats_get_runs_and_document_is_listed(basic):
    imgs = _images(basic["restricted"])
    names = [Path(i["nifti"]).name for i in imgs["MR005"] + imgs["MR006"]]
    assert [n.split("_")[2] for n in names] == ["run-1", "run-2"]
    reasons = [nc["reason"] for nc in _not_converted(basic["restricted"])]
    assert reasons and all("no image" in r for r in reasons)  # the Phoenix SR document


@pytest.mark.parametrize("position", ["HFS", "HFP"])
def test_decubitus_parity_with_original_conversion(basic, position, tmp_path):
    original = basic["input"] / "decubitus" / position
    ref_nii = _reference_conversion(next(p for p in original.iterdir() if p.is_dir()), tmp_path)
    ref = json.loads(ref_nii.with_suffix(".json").read_text())
    candidates = [i for lst in _images(basic["restricted"]).values() for i in lst
                  if _sidecar(basic["out"], i).get("PatientPosition") == ref["PatientPosition"]
                  and i["modality"] == "MR" and _sidecar(basic["out"], i).get("SeriesNumber") == ref["SeriesNumber"]]
    [image] = candidates
    assert image["suffix"] == "T1w"
    _assert_same_image(basic["out"] / image["nifti"], ref_nii)
    _assert_sidecar_parity(_sidecar(basic["out"], image), ref, REMOVED_IDENTITY)


def test_siemens_dti_mosaic_keeps_diffusion_and_slice_timing_with_safe(safe, tmp_path):
    ref_nii = _reference_conversion(safe["input"] / "dti", tmp_path)
    [image] = _images(safe["restricted"])["MR012"]
    assert image["datatype"] == "dwi" and image["suffix"] == "dwi"
    stem = safe["out"] / image["nifti"][:-len(".nii.gz")]
    for ext in (".bval", ".bvec"):
        assert Path(str(stem) + ext).read_bytes() == ref_nii.with_suffix(ext).read_bytes(), ext
    _assert_same_image(Path(str(stem) + ".nii.gz"), ref_nii)
    ours, ref = _sidecar(safe["out"], image), json.loads(ref_nii.with_suffix(".json").read_text())
    for key in ("SliceTiming", "PhaseEncodingDirection", "EffectiveEchoSpacing", "TotalReadoutTime"):
        assert key in ref and ours[key] == ref[key], key
    _assert_sidecar_parity(ours, ref, REMOVED_IDENTITY)


def test_xa30_safe_brings_back_xa_fields(safe):
    ref = json.loads(require_shared("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.json").read_text())
    [image] = _images(safe["restricted"])["MR005"]
    _assert_same_image(safe["out"] / image["nifti"], require_shared("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii"))
    ours = _sidecar(safe["out"], image)
    for key in ("ScanningSequence", "SequenceVariant", "ScanOptions", "DwellTime", "ShimSetting", "TxRefAmp"):
        assert ours[key] == ref[key], key
    _assert_sidecar_parity(ours, ref, REMOVED_IDENTITY)


def _nifti_headers(root: Path) -> list[tuple[str, bytes]]:
    """Header (and extensions) of every released .nii.gz, decompressed: scanned like text."""
    out = []
    for p in sorted(root.rglob("*.nii.gz")):
        with gzip.open(p, "rb") as fh:
            head = fh.read(352)
            vox_offset = int(np.frombuffer(head[108:112], "<f4")[0])
            out.append((p.relative_to(root).as_posix(), head + fh.read(max(0, vox_offset - 352))))
    return out


@pytest.mark.parametrize("which", ["basic", "safe"])
def test_no_original_identifier_in_bids_release(which, request):
    run = request.getfixturevalue(which)
    idents: set[Ident] = set()
    names: set[str] = set()
    for f in sorted(p for p in run["input"].rglob("*") if p.is_file()):
        names.add(f.name)
        if f.suffix == ".dcm":
            idents |= collect_identifiers(f)
    assert len(idents) > 10
    out = run["out"]
    bids_roots = [p for p in out.iterdir() if p.name != "sourcedata"] + [out / "sourcedata" / "unsorted"]
    hits = []
    for root in bids_roots:
        if root.is_dir():
            hits += scan_tree(root, idents, names_too=sorted(n for n in names if len(n) >= 8))
        elif root.is_file():
            hits += scan_bytes(root.read_bytes(), idents, root.name)
    for rel, header in _nifti_headers(out):
        hits += scan_bytes(header, idents, f"{rel} (NIfTI header)")
    _fail_on_hits(hits, f"the BIDS part of the {which} release")
    released = [p for p in out.rglob("*") if p.is_file() and "sourcedata/dicom" not in p.as_posix()]
    assert any(p.name.endswith(".json") for p in released) and any(p.name == "participants.tsv" for p in released)


def test_leak_scan_finds_identifiers_in_an_unscrubbed_conversion(basic, tmp_path):
    """Positive control for the scan above: dcm2niix without anonymisation, on the original,
    writes identifiers into its sidecar, and the same scan finds them."""
    series = basic["input"] / "xa30" / "5_anat-T1w_acq-tfl"
    subprocess.run([dcm2niix.executable(), "-ba", "n", "-z", "n", "-f", "raw", "-o", str(tmp_path), str(series)],
                   check=True, capture_output=True)
    idents = set().union(*(collect_identifiers(f) for f in series.iterdir()))
    hits = scan_bytes((tmp_path / "raw.json").read_bytes(), idents, "raw.json")
    kinds = {h.ident.kind for h in hits}
    assert {"PatientID", "InstitutionName", "DeviceSerialNumber", "SeriesInstanceUID"} <= kinds, kinds


def test_real_data_release_passes_bids_validator(basic):
    from .test_bids_workflow import validator_errors
    assert validator_errors(basic["out"]) == []
