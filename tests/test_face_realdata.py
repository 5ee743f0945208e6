"""Face stage on real faces (../shared/data): chris_t1 (NIfTI), dcm_qa_xa30 series 5 and 6
(enhanced DICOM) and dcm_qa_decubitus HFS/HFP (classic 2D, prone) through the whole workflow.

Checks the acceptance criteria: the most anterior skin (nose, lips, chin) is gone, >= 99.9 % of
the deepbet brain mask of the original is untouched, skull-stripping leaves nothing outside a
3-voxel dilation of the brain, voxels outside the removed region are bit-identical in NIfTI and
DICOM (dcm2niix of the written-back DICOM equals the released NIfTI), and a face job killed with
SIGKILL and run again gives the same bytes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from deidflow.face import render
from deidflow.face.apply import Nifti
from deidflow.face.volume import reference_volume
from deidflow.settings import load_defaults

from .conftest import ROOT, TEST_KEY, require_shared

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


# ---------------------------------------------------------------------------------------- helpers
def front_points_removed(before: np.ndarray, after: np.ndarray, n: int = 20) -> float:
    """Share of the ``n`` most anterior skin points of the lower face (central third of the width,
    lower 60 % of the head) that are gone after processing (RAS arrays)."""
    tissue = before > render.skin_threshold(before)
    xs, _, zs = np.nonzero(tissue)
    x0, x1 = np.percentile(xs, [33, 67])
    z0, z1 = zs.min(), zs.min() + 0.6 * (zs.max() - zs.min())
    ys = np.where(tissue.any(axis=1), tissue.shape[1] - 1 - np.argmax(tissue[:, ::-1, :], axis=1), -1)
    cols = [(ys[x, z], x, z) for x in range(int(x0), int(x1) + 1) for z in range(int(z0), int(z1) + 1) if ys[x, z] >= 0]
    cols.sort(reverse=True)
    gone = [after[x, y, z] == 0 for y, x, z in cols[:n]]
    return float(np.mean(gone))


def brain_kept(brain: np.ndarray, before: np.ndarray, after: np.ndarray) -> float:
    return 1.0 - float((brain & (before != after)).sum()) / float(brain.sum())


@pytest.fixture(scope="module")
def brain_of():
    pytest.importorskip("deepbet", reason="deepbet extra not installed (make install installs it)")
    from deidflow.face.deepbet_strip import brain_mask
    return brain_mask


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "report" not in p.name}


# ---------------------------------------------------------------------------------------- workflow
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    inp = tmp_path_factory.mktemp("face_in")
    for src in ("dcm_qa_xa30/In/5_anat-T1w_acq-tfl", "dcm_qa_xa30/In/6_anat-T1w_acq-tfl",
                "dcm_qa_decubitus/In/HFS", "dcm_qa_decubitus/In/HFP"):
        shutil.copytree(require_shared(*src.split("/")), inp / src.replace("/", "_"))
    out = inp.parent / "face_release"
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    restricted = out.with_name(out.name + "_restricted")
    reports = {Path(d): json.loads(Path(d).read_text()) for d in sorted(glob.glob(str(restricted / "done/face/*.json")))}
    images = [dict(im, unit=r["unit"]) for r in reports.values() for im in r["images"]]
    return out, restricted, reports, images


def _pristine(restricted: Path, unit: str, rel: str) -> Path:
    return restricted / "work" / "face" / unit / "orig" / rel


def test_every_head_image_is_defaced(released, brain_of):
    out, restricted, _, images = released
    assert len(images) == 4 and all(im["method"] == "deface" and im["backend"] == "ants" for im in images)
    for im in images:
        before_img = nib.load(_pristine(restricted, im["unit"], im["nifti"]))
        after_img = nib.load(out / im["nifti"])
        b = reference_volume(before_img.get_fdata(dtype=np.float32), before_img.affine)
        a = reference_volume(after_img.get_fdata(dtype=np.float32), after_img.affine)
        mask = nib.load(glob.glob(str(restricted / "work" / "face" / im["unit"] / "masks" /
                                      (im["nifti"][: -len(".nii.gz")] + "_removed.nii.gz")))[0])
        removed = reference_volume(np.asarray(mask.dataobj), mask.affine).data > 0
        # outside the removed region bit-identical, inside zero
        raw_b = Nifti.from_bytes(_pristine(restricted, im["unit"], im["nifti"]).read_bytes()).raw
        raw_a = Nifti.from_bytes((out / im["nifti"]).read_bytes()).raw
        native = np.asarray(mask.dataobj) > 0
        np.testing.assert_array_equal(raw_a[~native], raw_b[~native])
        assert np.all(raw_a[native] == 0)
        assert np.array_equal(a.data != b.data, removed & (b.data != 0))
        assert front_points_removed(b.data, a.data) == 1.0, im["nifti"]
        brain = brain_of(b)
        assert brain_kept(brain, b.data, a.data) >= 0.999, im["nifti"]


def test_dicom_write_back_matches_the_nifti(released, tmp_path):
    out, restricted, _, images = released
    from deidflow.bids.dcm2niix import executable
    exe = executable()
    for im in images:
        subject = im["nifti"].split("/")[0]
        series = out / "sourcedata" / "dicom" / subject / im["series"]
        dest = tmp_path / im["series"].replace("/", "_")
        dest.mkdir()
        subprocess.run([exe, "-z", "n", "-f", "x", "-o", str(dest), str(series)], check=True, capture_output=True)
        conv = nib.load(dest / "x.nii").get_fdata()
        np.testing.assert_array_equal(conv, nib.load(out / im["nifti"]).get_fdata())
        for f in sorted(series.glob("*.dcm")):
            new = pydicom.dcmread(f)
            old = pydicom.dcmread(_pristine(restricted, im["unit"], str(f.relative_to(out))))
            assert new.SOPInstanceUID != old.SOPInstanceUID and new.SOPInstanceUID.startswith("2.25.")
            assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
            assert new.SeriesInstanceUID == old.SeriesInstanceUID
            for kw in ("BitsAllocated", "BitsStored", "PixelRepresentation", "Rows", "Columns", "NumberOfFrames"):
                assert new.get(kw) == old.get(kw)
            assert new.ImageType[0] == "DERIVED" and new.BurnedInAnnotation == "NO"
            assert new.RecognizableVisualFeatures == "NO" and "Defaced" in new.DerivationDescription
            if "PerFrameFunctionalGroupsSequence" in new:       # enhanced multi-frame
                ft = [it.MRImageFrameTypeSequence[0].FrameType[0] for it in
                      (list(new.SharedFunctionalGroupsSequence) + list(new.PerFrameFunctionalGroupsSequence))
                      if "MRImageFrameTypeSequence" in it]
                assert ft and set(ft) == {"DERIVED"}
            a = np.frombuffer(new.PixelData, np.uint8)
            b = np.frombuffer(old.PixelData, np.uint8)
            assert a.size == b.size and not np.array_equal(a, b) or im["removed_fraction"] == 0


def test_qc_artefacts(released):
    out, restricted, _, images = released
    for subject in {im["nifti"].split("/")[0] for im in images}:
        idx = json.loads((out / "derivatives/deidflow/qc" / subject / "face/index.json").read_text())
        kinds = {e["kind"] for e in idx}
        assert kinds == {"face_front_after", "face_slices"}          # the original face stays restricted
        for e in idx:
            assert (out / "derivatives/deidflow/qc" / subject / "face" / e["file"]).read_bytes()[:4] == b"\x89PNG"
        ridx = json.loads((restricted / "qc" / subject / "face/index.json").read_text())
        assert "face_front_before" in {e["kind"] for e in ridx}


def test_kill_and_rerun_give_identical_bytes(released, tmp_path):
    out, restricted, reports, _ = released
    before = _hashes(out)
    run = json.loads((restricted / "run.json").read_text())
    done, report = max(reports.items(), key=lambda kv: len(kv[1]["images"]))
    args = [sys.executable, "-m", "deidflow.jobs", "face",
            "--convert-done", str(restricted / "done" / "convert" / done.name),
            "--dicom-root", str(out / "sourcedata" / "dicom"), "--release-root", str(out),
            "--restricted", str(restricted), "--done", str(tmp_path / "done.json"),
            "--quarantine", str(tmp_path / "q.jsonl"), "--settings", json.dumps(run["settings"]),
            "--face", json.dumps(load_defaults()["face"]), "--threads", "2", "--log", str(tmp_path / "face.log")]
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    # the convert and dicom stages ran again: every file of the unit holds its undefaced bytes again
    kept = restricted / "work" / "face" / report["unit"] / "orig"
    reset = sorted(p for p in kept.rglob("*") if p.is_file())
    for p in reset:
        shutil.copyfile(p, out / p.relative_to(kept))
    assert _hashes(out) != before
    proc = subprocess.Popen(args, env=env, cwd=ROOT)
    first = out / report["images"][0]["nifti"]
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if first.read_bytes() != (kept / report["images"][0]["nifti"]).read_bytes():
            break                              # the first image is rewritten, the rest is not
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert _hashes(out) != before              # killed half-way
    subprocess.run(args, env=env, cwd=ROOT, check=True, timeout=600)
    assert _hashes(out) == before
    again = json.loads((tmp_path / "done.json").read_text())["images"]
    assert [(i["nifti"], i["removed_fraction"]) for i in again] == \
        [(i["nifti"], i["removed_fraction"]) for i in report["images"]]


# ---------------------------------------------------------------------------------------- backends on chris_t1
@pytest.fixture(scope="module")
def chris():
    img = nib.load(require_shared("mricron", "chris_t1.nii.gz"))
    return img.get_fdata(dtype=np.float32), img.affine


@pytest.fixture(scope="module")
def chris_ants(chris):
    from deidflow.face.backends import get_backend
    vol = reference_volume(*chris)
    return vol, get_backend("ants").removal_mask(vol)


def test_ants_defaces_chris(chris_ants, brain_of):
    vol, removed = chris_ants
    after = np.where(removed, 0, vol.data)
    assert front_points_removed(vol.data, after) == 1.0
    assert brain_kept(brain_of(vol), vol.data, after) >= 0.999


def test_ants_is_orientation_independent(chris, chris_ants):
    """The same head stored LPS (other voxel order) gives the same mask voxel for voxel; tilted by an
    oblique affine (a head rotated in the scanner) the mask moves with it."""
    from deidflow.face.backends import get_backend
    data, affine = chris
    _, removed = chris_ants
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("PIL"))
    lps = nib.orientations.apply_orientation(data, ornt)
    lps_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    vol = reference_volume(lps, lps_affine)
    got = get_backend("ants").removal_mask(vol)
    assert np.array_equal(vol.to_native(got), nib.orientations.apply_orientation(removed, ornt))
    t = np.deg2rad(12)
    tilt = np.array([[1, 0, 0, 0], [0, np.cos(t), -np.sin(t), 0], [0, np.sin(t), np.cos(t), 0], [0, 0, 0, 1.0]])
    oblique = reference_volume(data, tilt @ affine)
    got = get_backend("ants").removal_mask(oblique)
    dice = 2 * (got & removed).sum() / (got.sum() + removed.sum())
    assert dice > 0.9
    assert front_points_removed(oblique.data, np.where(got, 0, oblique.data)) == 1.0


def test_deepbet_skullstrip_and_quickshear_on_chris(chris, brain_of):
    from deidflow.face.quickshear import shear_mask
    vol = reference_volume(*chris)
    brain = brain_of(vol)
    stripped = np.where(brain, vol.data, 0)              # the deepbet backend removes ~brain
    assert not (stripped[~ndimage.binary_dilation(brain, iterations=3)] != 0).any()
    assert brain.sum() * np.prod(vol.zooms) / 1e3 > 900   # a plausible brain (cm3)
    cut = shear_mask(brain, vol.zooms)
    after = np.where(cut, 0, vol.data)
    assert brain_kept(brain, vol.data, after) >= 0.999
    assert front_points_removed(vol.data, after) == 1.0
