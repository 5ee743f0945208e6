"""Face stage on real faces (../shared/data): chris_t1 (NIfTI given as an input file, released by
the other stage), dcm_qa_xa30 series 5 and 6 (enhanced DICOM) and dcm_qa_decubitus HFS/HFP
(classic 2D, prone) through the whole workflow.

Checks the acceptance criteria: the most anterior skin (nose, lips, chin) is gone, >= 99.9 % of
the deepbet brain mask of the original is untouched, skull-stripping leaves nothing outside a
3-voxel dilation of the brain, voxels outside the removed region are bit-identical in NIfTI and
DICOM (dcm2niix of the written-back DICOM equals the released NIfTI), and a face job killed with
SIGKILL and run again gives the same bytes.
"""
from __future__ import annotations

import csv
import hashlib
import io
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

from .conftest import ROOT, TEST_KEY, assert_finished, require_shared

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
    (inp / "volunteer_chris").mkdir()             # a NIfTI input: no header names modality or anatomy
    shutil.copyfile(require_shared("mricron", "chris_t1.nii.gz"), inp / "volunteer_chris" / "chris_t1.nii.gz")
    out = inp.parent / "face_release"
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert_finished(r, out)
    restricted = out.with_name(out.name + "_restricted")
    reports = {d: json.loads(d.read_text()) for d in sorted((restricted / "done" / "face").glob("*.json"))}
    images = [dict(im, unit=r["unit"]) for r in reports.values() for im in r["images"]]
    return out, restricted, reports, images, inp


def _pristine(restricted: Path, unit: str, rel: str) -> Path:
    return restricted / "work" / "face" / unit / "orig" / rel


def test_every_head_image_is_defaced(released, brain_of):
    out, restricted, _, images, _ = released
    assert len(images) == 5 and all(im["method"] == "deface" and im["backend"] == "ants" for im in images)
    assert sum(im["format"] == "nifti1" and not im["series"] for im in images) == 1      # chris_t1
    for im in images:
        before_img = nib.load(_pristine(restricted, im["unit"], im["nifti"]))
        after_img = nib.load(out / im["nifti"])
        b = reference_volume(before_img.get_fdata(dtype=np.float32), before_img.affine)
        a = reference_volume(after_img.get_fdata(dtype=np.float32), after_img.affine)
        mask = nib.load(restricted / "work" / "face" / im["unit"] / "masks" /
                        (im["nifti"][: -len(".nii.gz")] + "_removed.nii.gz"))
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


def test_nifti_input_is_defaced_in_place(released):
    """chris_t1 arrived as a NIfTI file: its release (sourcedata/nifti/sub-X/<keyed id>.nii.gz) is
    defaced; header bytes are those the other stage released (only descrip differs from the input),
    voxels outside the removed region are the input's, bit for bit."""
    out, restricted, _, images, inp = released
    im = next(i for i in images if i["format"] == "nifti1" and not i["series"])
    assert im["nifti"].startswith("sourcedata/nifti/sub-") and "head-sized" in im["reason"]
    src = (inp / "volunteer_chris" / "chris_t1.nii.gz").read_bytes()
    rel = (out / im["nifti"]).read_bytes()
    scrubbed = _pristine(restricted, im["unit"], im["nifti"]).read_bytes()
    a, b, s = Nifti.from_bytes(src), Nifti.from_bytes(rel), Nifti.from_bytes(scrubbed)
    assert b.prefix == s.prefix and b.suffix == s.suffix                   # header as the other stage wrote it
    ha, hb = (nib.Nifti1Header.from_fileobj(io.BytesIO(n.prefix)) for n in (a, b))
    assert [k for k in ha.keys() if not np.array_equal(ha[k], hb[k])] == ["descrip"]
    np.testing.assert_array_equal(s.raw, a.raw)                            # the other stage kept every voxel
    img = nib.load(out / im["nifti"])
    native = np.asarray(nib.load(restricted / "work" / "face" / im["unit"] / "masks" /
                                 (im["nifti"][: -len(".nii.gz")] + "_removed.nii.gz")).dataobj) > 0
    assert img.shape == native.shape and 0.05 < native.mean() < 0.2
    np.testing.assert_array_equal(b.raw[~native], a.raw[~native])         # bit-identical outside
    assert not np.asarray(img.dataobj)[native].any()
    sub = im["nifti"].split("/")[2]
    idx = json.loads((out / "derivatives/deidflow/qc" / sub / "face/index.json").read_text())
    assert {e["kind"] for e in idx} == {"face_front_after", "face_slices"}
    assert (restricted / "qc" / sub / "face" / (_stem(im["nifti"]) + "_face-front-before.png")).is_file()


def _stem(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].split(".")[0]


def test_uid_mapping_points_at_the_released_uids(released):
    """mapping/uids.csv maps every original SOP Instance UID to the one in the release: the
    defaced images' new UIDs, never the scrubbed-but-replaced ones in between."""
    out, restricted, _, images, inp = released
    with open(restricted / "mapping" / "uids.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    mapping = dict(rows)
    assert len(mapping) == len(rows)
    released_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                     for p in (out / "sourcedata" / "dicom").rglob("*.dcm")}
    between = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in (restricted / "work" / "face").glob("*/orig/sourcedata/dicom/**/*.dcm")}
    originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in inp.rglob("*.dcm")}
    assert between and not (between & (set(mapping) | set(mapping.values())))
    assert originals <= set(mapping)
    assert {mapping[u] for u in originals} == released_uids


def test_dicom_write_back_matches_the_nifti(released, tmp_path):
    out, restricted, _, images, _ = released
    from deidflow.bids.dcm2niix import executable
    from deidflow.sidecar import scrub_sidecar
    exe = executable()
    for im in [i for i in images if i["series"]]:
        subject = im["nifti"].split("/")[0]
        series = out / "sourcedata" / "dicom" / subject / im["series"]
        dest = tmp_path / im["series"].replace("/", "_")
        dest.mkdir()
        subprocess.run([exe, "-z", "n", "-f", "x", "-o", str(dest), str(series)], check=True, capture_output=True)
        conv = nib.load(dest / "x.nii").get_fdata()
        np.testing.assert_array_equal(conv, nib.load(out / im["nifti"]).get_fdata())
        # the released sidecar says DERIVED like the DICOM, and stays within the allow-list
        side = json.loads((out / im["nifti"].replace(".nii.gz", ".json")).read_text())
        again = json.loads((dest / "x.json").read_text())
        assert side["ImageType"][0] == "DERIVED" and side["ImageType"] == again["ImageType"]
        assert scrub_sidecar(side)[0] == side
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
    out, restricted, _, images, _ = released
    for subject in {next(p for p in im["nifti"].split("/") if p.startswith("sub-")) for im in images}:
        idx = json.loads((out / "derivatives/deidflow/qc" / subject / "face/index.json").read_text())
        kinds = {e["kind"] for e in idx}
        assert kinds == {"face_front_after", "face_slices"}          # the original face stays restricted
        for e in idx:
            assert (out / "derivatives/deidflow/qc" / subject / "face" / e["file"]).read_bytes()[:4] == b"\x89PNG"
        ridx = json.loads((restricted / "qc" / subject / "face/index.json").read_text())
        assert "face_front_before" in {e["kind"] for e in ridx}


@pytest.mark.parametrize("which", ["dicom", "nifti_input"])
def test_kill_and_rerun_give_identical_bytes(released, tmp_path, which):
    """The unit with the most BIDS images (NIfTI and written-back DICOM), and the unit of the NIfTI
    input: every file reset to its undefaced bytes and the QC pictures gone, the job killed right
    after its first rewritten image, run again: the release is byte-identical to the uninterrupted run."""
    out, restricted, reports, _, _ = released
    before = _hashes(out)
    run = json.loads((restricted / "run.json").read_text())
    if which == "dicom":
        done, report = max(reports.items(), key=lambda kv: sum(bool(i["series"]) for i in kv[1]["images"]))
    else:
        done, report = next((d, r) for d, r in reports.items() if any(not i["series"] for i in r["images"]))
    unit = report["unit"]
    first_image = next(i for i in report["images"] if bool(i["series"]) == (which == "dicom"))["nifti"]
    markers = {s: restricted / "done" / s / f"{unit}.json" for s in ("convert", "other")}
    args = [sys.executable, "-m", "deidflow.jobs", "face", "--manifest", str(restricted / "manifests" / f"{unit}.json"),
            f"--convert-done={markers['convert'] if markers['convert'].exists() else ''}",
            f"--other-done={markers['other'] if markers['other'].exists() else ''}",
            "--dicom-root", str(out / "sourcedata" / "dicom"), "--release-root", str(out),
            "--restricted", str(restricted), "--done", str(tmp_path / "done.json"),
            "--quarantine", str(tmp_path / "q.jsonl"), "--settings", json.dumps(run["settings"]),
            "--face", json.dumps(load_defaults()["face"]), "--threads", "2", "--log", str(tmp_path / "face.log")]
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    # the convert, dicom and other stages ran again: every file of the unit holds its undefaced bytes again
    kept = restricted / "work" / "face" / unit / "orig"
    reset = sorted(p for p in kept.rglob("*") if p.is_file())
    for p in reset:
        shutil.copyfile(p, out / p.relative_to(kept))
    for im in report["images"]:                # and no QC pictures yet
        shutil.rmtree(out / "derivatives/deidflow/qc" / next(p for p in im["nifti"].split("/") if p.startswith("sub-"))
                      / "face", ignore_errors=True)
    assert _hashes(out) != before
    proc = subprocess.Popen(args, env=env, cwd=ROOT)
    first = out / first_image
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if first.read_bytes() != (kept / first_image).read_bytes():
            break                              # the first image is rewritten, the rest is not
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert _hashes(out) != before              # killed half-way
    subprocess.run(args, env=env, cwd=ROOT, check=True, timeout=600)
    assert _hashes(out) == before
    again = json.loads((tmp_path / "done.json").read_text())["images"]
    assert [(i["nifti"], i.get("removed_fraction")) for i in again] == \
        [(i["nifti"], i.get("removed_fraction")) for i in report["images"]]


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


# ---------------------------------------------------------------------------------------- head CT
def _ct_brain(hu: np.ndarray) -> np.ndarray:
    """Brain of a head CT: soft tissue (0-80 HU) enclosed by bone, eroded twice, largest part."""
    bone = hu > 300
    inside = np.zeros_like(bone)
    for k in range(hu.shape[2]):
        inside[:, :, k] = ndimage.binary_fill_holes(ndimage.binary_closing(bone[:, :, k], iterations=3))
    brain = ndimage.binary_erosion(inside & ~bone & (hu > 0) & (hu < 80), iterations=2)
    lab, _ = ndimage.label(brain)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def test_head_ct_dcm_qa_ct_ge_is_selected_and_defaced(tmp_path, monkeypatch):
    """GE head CT with a tilted gantry and two slice spacings (4.2 and 7.4 mm), released as DICOM
    only (no converted image): selected by its body part, reconstructed on an orthogonal grid,
    defaced with the ants template after the CT-to-T1-like mapping; the orbit / forehead region in
    front of the brain is air in every released frame, no brain voxel changes, every file is
    rewritten with a new SOP Instance UID."""
    from deidflow.face import dicomvol
    from deidflow.face.stage import face_unit
    from deidflow.settings import profile_settings
    monkeypatch.setenv("DEIDFLOW_KEY", TEST_KEY)
    src = require_shared("dcm_qa_ct_ge", "In", "GE")
    out, restricted = tmp_path / "release", tmp_path / "restricted"
    series = out / "sourcedata/dicom/sub-ct/ses-1/CT2-x"
    series.mkdir(parents=True)
    names = sorted(p.name for p in src.glob("*.dcm"))
    for name in names:
        shutil.copyfile(src / name, series / name)
    restricted.mkdir()
    files = [{"relpath": f"ct/{n}", "format": "dicom", "out_relpath": f"ses-1/CT2-x/{n}"} for n in names]
    (restricted / "manifest.json").write_text(json.dumps({"unit": "sub-ct", "subjects": [
        {"subject": "sub-ct", "files": files}]}))
    counts = face_unit(None, out / "sourcedata/dicom", out, restricted, restricted / "done.json", restricted / "q.jsonl",
                       profile_settings(load_defaults()), load_defaults()["face"], manifest=restricted / "manifest.json")
    report = json.loads((restricted / "done.json").read_text())["images"][0]
    assert report["method"] == "deface" and report["reason"].startswith("body part names a head"), report
    assert report["resampled"] and counts["dicom_files"] == len(names) and counts["withheld"] == 0
    before = {n: (src / n).read_bytes() for n in names}
    after = {n: (series / n).read_bytes() for n in names}
    vb = dicomvol.reconstruct(before, dicomvol.scan(before).stacks()[0])
    va = dicomvol.reconstruct(after, dicomvol.scan(after).stacks()[0])
    brain = _ct_brain(vb.data)
    changed = vb.data != va.data
    assert brain.sum() > 1_000_000 and not (brain & changed).any()          # brain untouched
    removed_tissue = changed & (vb.data > -400)
    assert removed_tissue.sum() > 50_000                                     # a face region went
    idx = np.argwhere(removed_tissue)
    bidx = np.argwhere(brain)
    assert idx[:, 2].min() <= bidx[:, 2].min()                               # below the brain's top…
    for n in names:                                                          # …set to air in every frame
        a, b = (pydicom.dcmread(io.BytesIO(x[n])) for x in (before, after))
        ra = a.pixel_array * float(a.RescaleSlope) + float(a.RescaleIntercept)
        rb = b.pixel_array * float(b.RescaleSlope) + float(b.RescaleIntercept)
        assert np.all(rb[ra != rb] == -1000), n
    olds = {pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID for b in before.values()}
    news = {pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID for b in after.values()}
    assert not (olds & news)


# ---------------------------------------------------------------------------------------- coverage of eyes and brows
COVER_DEPTH_MM = 20.0    # the face's own tissue: within this depth of the front skin surface …
BRAIN_CLEAR_MM = 12.0    # … and this far from the brain (the template keeps 6 mm off its brain; affine error)


def _real_heads(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("heads")
    heads = {"chris_t1": require_shared("mricron", "chris_t1.nii.gz"),
             "xa30_5": require_shared("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii"),
             "xa30_6": require_shared("dcm_qa_xa30", "Ref", "6_anat-T1w_acq-tfl.nii")}
    from deidflow.bids.dcm2niix import executable
    for pos in ("HFS", "HFP"):                   # classic 2D sagittal stacks, supine and prone
        subprocess.run([executable(), "-z", "y", "-f", pos, "-o", str(out),
                        str(require_shared("dcm_qa_decubitus", "In", pos))], check=True, capture_output=True)
        heads[f"decubitus_{pos}"] = out / f"{pos}.nii.gz"
    return heads


@pytest.fixture(scope="module")
def real_heads(tmp_path_factory):
    return _real_heads(tmp_path_factory)


def _reference_box(vol) -> np.ndarray:
    """The template's eye/brow box mapped to the subject by an independent, thorough registration
    (2 mm, three levels, four times the iterations, tight convergence), not the one under test."""
    from deidflow.face import ants_deface as ad
    tpl = ad.template()
    to_template = ad.affine_registration(ad.downsample(vol.data, vol.affine, 2.0),
                                         (tpl.image.astype(np.float32), tpl.image_affine), sampling=0.25,
                                         convergence="[200x100x50,1e-6,10]", shrink="4x2x1",
                                         smoothing="2x1x0vox", step=0.1, seed=1)
    inv = np.linalg.inv(to_template)                  # template RAS -> subject RAS
    return tpl.eye_brow_box @ inv[:3, :3].T + inv[:3, 3]


def _inside(shape, affine, corners) -> np.ndarray:
    """Voxels of a grid inside the parallelepiped of ``corners`` (the 8 corners of a mapped box)."""
    c0 = corners[0]
    edges = np.stack([corners[4] - c0, corners[2] - c0, corners[1] - c0], axis=1)
    ijk = np.indices(shape).reshape(3, -1)
    uvw = np.linalg.solve(edges, affine[:3, :3] @ ijk + affine[:3, 3:] - c0[:, None])
    return np.all((uvw >= 0) & (uvw <= 1), axis=0).reshape(shape)


@pytest.mark.parametrize("name", ["chris_t1", "xa30_5", "xa30_6", "decubitus_HFS", "decubitus_HFP"])
def test_eyes_and_brows_are_removed_and_the_brain_is_not(real_heads, brain_of, name):
    """On each real head: no voxel of the deepbet brain mask of the original is removed, and every
    tissue voxel of the eye/brow region (eyeballs from their centres forward, lids, brows — the
    template's landmarks mapped by an independent registration) that lies within 20 mm of the face
    surface and more than 12 mm from the brain is removed; two fits give the same mask."""
    from deidflow.face.ants_deface import HeadRegistration
    img = nib.load(real_heads[name])
    vol = reference_volume(img.get_fdata(dtype=np.float32), img.affine)
    reg = HeadRegistration.fit(vol.data, vol.affine)
    removed = reg.mask_for(vol.data.shape, vol.affine)
    assert np.array_equal(HeadRegistration.fit(vol.data, vol.affine).mask_for(vol.data.shape, vol.affine), removed)
    brain = brain_of(vol)
    assert brain.sum() > 1000 and not (brain & removed).any()
    tissue = vol.data > render.skin_threshold(vol.data)
    ny = vol.data.shape[1]
    front = np.where(tissue.any(axis=1), ny - 1 - np.argmax(tissue[:, ::-1, :], axis=1), -1)
    depth = (front[:, None, :] - np.arange(ny)[None, :, None]) * vol.zooms[1]
    clear = ndimage.distance_transform_edt(~brain, sampling=vol.zooms) > BRAIN_CLEAR_MM
    region = _inside(vol.data.shape, vol.affine, _reference_box(vol)) & tissue & (depth <= COVER_DEPTH_MM) & clear
    assert region.sum() * np.prod(vol.zooms) > 5000            # a real region (> 5 cm3), not an empty test
    missed = region & ~removed
    assert not missed.any(), f"{name}: {int(missed.sum())} of {int(region.sum())} eye/brow voxels kept"



def test_bare_multi_echo_head_nifti_is_defaced(tmp_path):
    """A headerless 4D NIfTI of four echoes of one head (a multi-echo T1 saved as scan.nii.gz, no
    sidecar; the real chris_t1 head at four echo intensities): 'not one head-sized 3D volume', it
    was released with the face in every echo and exit 0 (red-team 3).  Up to six volumes are
    echoes or inversions of one head: every echo loses its face."""
    img = nib.load(require_shared("mricron", "chris_t1.nii.gz"))
    data = np.asarray(img.dataobj)
    echoes = np.stack([(data * f).astype(data.dtype) for f in (1.0, 0.8, 0.6, 0.45)], axis=-1)
    inp = tmp_path / "in"
    (inp / "site7").mkdir(parents=True)
    nib.save(nib.Nifti1Image(echoes, img.affine, img.header), inp / "site7" / "scan.nii.gz")
    out = tmp_path / "release"
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "1"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert_finished(r, out)
    (rel,) = list(out.glob("sourcedata/nifti/sub-*/*.nii.gz"))
    after = np.asarray(nib.load(rel).dataobj)
    assert after.shape == echoes.shape
    for k in range(4):
        b = reference_volume(echoes[..., k].astype(np.float32), img.affine).data
        a = reference_volume(after[..., k].astype(np.float32), img.affine).data
        assert front_points_removed(b, a) == 1.0, k
