"""Face stage, fast tests on synthetic data: selector, orientation, NIfTI and DICOM write-back,
quickshear geometry, renders, kill-safe bookkeeping, backend availability checks."""
from __future__ import annotations

import copy
import gzip
import hashlib
import io
import os
import stat
import sys
import textwrap

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from deidflow.face import backends, render
from deidflow.face.apply import GeometryMismatch, Nifti, mask_dicom, stored_zero
from deidflow.face.quickshear import shear_mask
from deidflow.face.select import ImageFacts, decide, extent_mm
from deidflow.face.stage import Keeper, implausible
from deidflow.face.volume import reference_volume
from deidflow.settings import ConfigError, _check_semantics, load_defaults

FACE = load_defaults()["face"]


def facts(**kw) -> ImageFacts:
    base = dict(path="sub-a/ses-b/anat/sub-a_ses-b_T1w.nii.gz", suffix="T1w", modality="MR", body_part="",
                description="", extent_mm=(176.0, 256.0, 256.0))
    base.update(kw)
    return ImageFacts(**base)


# ------------------------------------------------------------------------------------------ selector
@pytest.mark.parametrize("kw, method", [
    ({}, "deface"),                                                   # anatomical suffix
    ({"body_part": "BRAIN", "suffix": "bold"}, "deface"),             # head by body part
    ({"body_part": "KNEE"}, "none"),                                  # another body part
    ({"modality": "CT"}, "none"),                                     # not MR
    ({"suffix": "dwi"}, "none"),                                      # nothing says head
    ({"suffix": "dwi", "description": "Brain DTI"}, "deface"),        # description says head
    ({"extent_mm": (256.0, 256.0, 5.0)}, "none"),                     # one slice: no 3D face
    ({"modality": "", "suffix": "T2w"}, "deface"),                    # no modality, head suffix
    ({"modality": "", "suffix": "foo"}, "none"),
])
def test_selector(kw, method):
    assert decide(facts(**kw), FACE).method == method


def test_selector_overrides_and_per_suffix_method():
    cfg = copy.deepcopy(FACE)
    cfg["by_suffix"] = {"T2w": "skullstrip", "angio": "none"}
    cfg["select"]["exclude"] = ["*_acq-nodeface_*"]
    cfg["select"]["include"] = ["*_knee*"]
    assert decide(facts(suffix="T2w"), cfg).method == "skullstrip"
    assert decide(facts(suffix="angio"), cfg).method == "none"
    assert decide(facts(path="sub-a/anat/sub-a_acq-nodeface_T1w.nii.gz"), cfg).method == "none"
    assert decide(facts(path="sub-a/anat/sub-a_kneeT1w.nii.gz", body_part="KNEE"), cfg).method == "deface"
    cfg["method"] = "none"
    assert decide(facts(), cfg).method == "none"


def test_extent():
    assert extent_mm((256, 256, 35), (1.0, 1.0, 4.8)) == (256.0, 256.0, 168.0)
    assert extent_mm((64, 64), (2.0, 2.0)) == (128.0, 128.0, 1.0)


# ------------------------------------------------------------------------------------------ geometry
def _phantom(shape=(40, 48, 36)):
    """A head-like ellipsoid with a 'nose' bump in front (RAS voxel order, 1 mm)."""
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    head = (x / 15) ** 2 + (y / 20) ** 2 + (z / 15) ** 2 <= 1
    nose = (x / 3) ** 2 + ((y - 20) / 4) ** 2 + ((z + 2) / 4) ** 2 <= 1
    brain = (x / 11) ** 2 + ((y + 2) / 15) ** 2 + ((z - 3) / 10) ** 2 <= 1
    data = np.where(head | nose, 300.0, 0.0) + np.where(brain, 500.0, 0.0)
    return data.astype(np.float32), brain


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R"), ("I", "L", "A")])
def test_reference_volume_round_trip_any_orientation(codes):
    data, _ = _phantom()
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes))
    native = nib.orientations.apply_orientation(data, ornt)
    affine = nib.orientations.inv_ornt_aff(ornt, data.shape)  # native voxel -> RAS voxel (= mm)
    assert nib.aff2axcodes(affine) == codes
    vol = reference_volume(native, affine)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(vol.data, data)          # same RAS array whatever the storage order
    mask = vol.data > 400
    np.testing.assert_array_equal(vol.to_native(mask), native > 400)


def test_reference_volume_oblique_and_4d():
    data, _ = _phantom()
    theta = np.deg2rad(20)
    rot = np.array([[1, 0, 0, 0], [0, np.cos(theta), -np.sin(theta), 0], [0, np.sin(theta), np.cos(theta), 0], [0, 0, 0, 1]])
    four = np.stack([data, data * 2], axis=-1)
    vol = reference_volume(four, rot)
    np.testing.assert_array_equal(vol.data, data)           # first volume is the reference
    np.testing.assert_allclose(vol.affine, rot)             # oblique affine kept as is
    assert vol.to_native(vol.data > 0).shape == data.shape


# ------------------------------------------------------------------------------------------ NIfTI write-back
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["int16", "scaled", "float32", "4d"])
def test_nifti_masking_changes_only_the_region(kind, gz):
    rng = np.random.default_rng(0)
    shape = (12, 10, 8) + ((3,) if kind == "4d" else ())
    arr = rng.integers(1, 1000, shape).astype(np.float32 if kind == "float32" else np.int16)
    img = nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.set_data_dtype(arr.dtype)
    if kind == "scaled":
        img.header.set_slope_inter(0.5, -100.0)
    raw = img.to_bytes()
    data = gzip.compress(raw) if gz else raw
    n = Nifti.from_bytes(data)
    mask = np.zeros(shape[:3], bool)
    mask[:4, :, :3] = True
    out = n.masked(mask)
    out_raw = gzip.decompress(out) if gz else out
    assert out_raw[:352] == raw[:352]                       # header byte for byte
    back = nib.Nifti1Image.from_bytes(out_raw)
    stored = back.dataobj.get_unscaled()
    orig = nib.Nifti1Image.from_bytes(raw).dataobj.get_unscaled()
    keep = ~np.broadcast_to(mask.reshape(mask.shape + (1,) * (orig.ndim - 3)), orig.shape)
    np.testing.assert_array_equal(stored[keep], orig[keep])  # bit-identical outside
    real = back.get_fdata()
    assert np.all(real[~keep] == 0)                          # real value 0 inside (-inter/slope)
    assert Nifti.from_bytes(out).masked(mask) == out         # idempotent, deterministic


def test_stored_zero_clips_to_range():
    assert stored_zero(np.dtype("uint16"), 1.0, 100.0) == 0   # -100 not representable
    assert stored_zero(np.dtype("int16"), 2.0, 100.0) == -50
    assert stored_zero(np.dtype("uint16"), 1.0, -1024.0, 0, 4095) == 1024


# ------------------------------------------------------------------------------------------ DICOM write-back
def _classic_series(arr: np.ndarray, affine: np.ndarray, rescale=(1.0, 0.0)) -> list[bytes]:
    """One MR file per slice k of ``arr`` (x=columns... as dcm2niix lays out a NIfTI from DICOM)."""
    files = []
    nx, ny, nz = arr.shape
    lps = np.diag([-1.0, -1.0, 1.0])
    col_dir = lps @ affine[:3, 0] / np.linalg.norm(affine[:3, 0])   # NIfTI i runs along DICOM columns
    row_dir = lps @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    for k in range(nz):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.BurnedInAnnotation = "YES"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))]
        ds.ImageOrientationPatient = [float(v) for v in (*col_dir, *row_dir)]
        ds.ImagePositionPatient = [float(v) for v in lps @ (affine @ [0, 0, k, 1])[:3]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if rescale != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T).astype("<u2").tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    return files


def test_dicom_write_back_classic_series():
    rng = np.random.default_rng(1)
    arr = rng.integers(1, 4000, (10, 12, 6)).astype(np.uint16)
    arr[0, 0, 0] = 0xF123                     # garbage in the unused high bits must survive
    theta = np.deg2rad(10)
    affine = np.array([[0.9 * np.cos(theta), 0, 0.0, -20], [0.9 * np.sin(theta), 0.8, 0, 30], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    mask = np.zeros(arr.shape, bool)
    mask[5:, 3:9, 2:] = True
    files = _classic_series(arr, affine, rescale=(1.0, -1024.0))
    seen = set()
    for k, data in enumerate(files):
        res = mask_dicom(data, [(affine, mask)], lambda old: "2.25.1" + str(len(seen)), "Defaced", "deidflow face")
        ds = pydicom.dcmread(io.BytesIO(res.data))
        out = np.frombuffer(ds.PixelData, "<u2").reshape(arr.shape[1], arr.shape[0]).T
        np.testing.assert_array_equal(out[~mask[:, :, k]], arr[:, :, k][~mask[:, :, k]])
        assert np.all(out[mask[:, :, k]] == 1024)        # real value 0 with intercept -1024
        assert ds.ImageType[0] == "DERIVED" and ds.BurnedInAnnotation == "NO"
        assert ds.RecognizableVisualFeatures == "NO" and ds.DerivationDescription == "Defaced"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113102"]
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == res.new_sop_instance_uid
        seen.add(res.new_sop_instance_uid)
        assert res.pixels_removed == int(mask[:, :, k].sum())


def test_dicom_frame_off_the_grid_is_refused():
    arr = np.ones((8, 8, 3), np.uint16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    data = _classic_series(arr, affine)[1]
    shifted = affine.copy()
    shifted[2, 3] += 1.0                        # half a slice off
    with pytest.raises(GeometryMismatch):
        mask_dicom(data, [(shifted, np.zeros(arr.shape, bool))], str, "d", "n")


# ------------------------------------------------------------------------------------------ quickshear, render, plausibility
def test_quickshear_cuts_the_face_side_and_spares_the_brain():
    data, brain = _phantom((40, 60, 48))
    cut = shear_mask(brain, (1.0, 1.0, 1.0), margin_mm=2.0)
    assert not (cut & brain).any()
    ny = data.shape[1]
    nose = np.zeros_like(brain)
    nose[:, int(ny * 0.85):, : data.shape[2] // 2] = True
    assert (cut & nose & (data > 0)).sum() > 0.8 * (nose & (data > 0)).sum()   # face side gone
    back = np.zeros_like(brain)
    back[:, : ny // 4, data.shape[2] // 2:] = True
    assert not (cut & back).any()                                               # back of the head kept


def test_front_view_and_png_are_deterministic():
    data, _ = _phantom()
    img = render.front_view(data, (1.0, 1.0, 1.0), render.skin_threshold(data))
    assert img.dtype == np.uint8 and img.max() > 100
    png = render.png_bytes(img)
    assert png == render.png_bytes(render.front_view(data, (1.0, 1.0, 1.0), render.skin_threshold(data)))
    faceless = data.copy()
    faceless[:, 38:, :] = 0
    assert not np.array_equal(render.front_view(faceless, (1, 1, 1), render.skin_threshold(data)), img)
    sl = render.slices_view(faceless, data != faceless, (1.0, 1.0, 1.0))
    assert sl.ndim == 3 and (sl == render.OUTLINE).all(axis=-1).any()


def test_implausible_masks_are_caught():
    data, brain = _phantom()
    vol = reference_volume(data, np.eye(4))
    assert implausible(vol, np.zeros(data.shape, bool), "deface")
    face = np.zeros(data.shape, bool)
    face[:, 36:, :20] = True
    assert implausible(vol, face, "deface") is None
    assert implausible(vol, np.ones(data.shape, bool), "skullstrip")


# ------------------------------------------------------------------------------------------ kill-safe bookkeeping
def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_keeper_computes_from_pristine_and_notices_new_input(tmp_path):
    root, work = tmp_path / "release", tmp_path / "restricted" / "work"
    f = root / "sub-a" / "x.nii.gz"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"original")
    k = Keeper(root, work)
    assert k.source("sub-a/x.nii.gz") == b"original"
    k.publish("sub-a/x.nii.gz", b"defaced")
    assert f.read_bytes() == b"defaced" and stat.S_IMODE((work / "orig/sub-a/x.nii.gz").stat().st_mode) == 0o600
    k2 = Keeper(root, work)                           # a rerun computes from the kept original
    assert k2.source("sub-a/x.nii.gz") == b"original"
    f.write_bytes(b"reconverted")                     # convert ran again: the copy is refreshed
    assert Keeper(root, work).source("sub-a/x.nii.gz") == b"reconverted"
    k3 = Keeper(root, work)
    k3.source("sub-a/x.nii.gz")
    k3.publish("sub-a/x.nii.gz", b"defaced2")
    k3.withdraw("sub-a/x.nii.gz")
    assert not f.exists() and Keeper(root, work).available("sub-a/x.nii.gz")
    assert Keeper(root, work).restore_untouched() == ["sub-a/x.nii.gz"]   # no longer selected
    assert f.read_bytes() == b"reconverted"


def test_keeper_records_before_it_writes(tmp_path, monkeypatch):
    """A kill between recording and renaming leaves the release as it was; the rerun still uses the
    pristine copy (never the half-state)."""
    root, work = tmp_path / "release", tmp_path / "work"
    (root / "a").mkdir(parents=True)
    (root / "a/f.dcm").write_bytes(b"orig")
    k = Keeper(root, work)
    k.source("a/f.dcm")
    import deidflow.face.stage as stage

    def killed(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        k.publish("a/f.dcm", b"new")
    monkeypatch.undo()
    assert (root / "a/f.dcm").read_bytes() == b"orig"
    assert Keeper(root, work).source("a/f.dcm") == b"orig"


# ------------------------------------------------------------------------------------------ availability
def test_missing_optional_backend_fails_config_validation(monkeypatch):
    cfg = load_defaults()
    cfg["face"]["method"] = "skullstrip"
    real = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None if name in ("deepbet", "torch") else real(name))
    with pytest.raises(ConfigError, match=r"face.skullstrip_backend.*pip install 'deidflow\[deepbet\]'"):
        _check_semantics(cfg)
    cfg["face"]["method"] = "deface"
    cfg["face"]["by_suffix"] = {"T2w": "skullstrip"}      # a per-suffix method counts too
    with pytest.raises(ConfigError, match="deepbet"):
        _check_semantics(cfg)
    cfg["face"]["by_suffix"] = {}
    _check_semantics(cfg)                                  # ants needs no torch


def test_missing_external_program_is_named(monkeypatch):
    cfg = load_defaults()
    cfg["face"]["skullstrip_backend"] = "external"
    cfg["face"]["method"] = "skullstrip"
    cfg["face"]["external"]["skullstrip"] = "bet"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"'bet' is not on PATH: install FSL"):
        _check_semantics(cfg)
    cfg["outputs"]["bids"] = False                         # no BIDS release, no face stage
    _check_semantics(cfg)


def test_external_backend_runs_a_program_through_nipype(tmp_path, monkeypatch):
    """A stand-in mri_synthstrip on PATH (writes a threshold mask) goes through the real plumbing."""
    prog = tmp_path / "mri_synthstrip"
    prog.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, nibabel as nib, numpy as np
        a = sys.argv; i, m = a[a.index('-i') + 1], a[a.index('-m') + 1]
        img = nib.load(i)
        nib.save(nib.Nifti1Image((img.get_fdata() > 400).astype(np.uint8), img.affine), m)
        """))
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    backends.check_backend("external", "skullstrip", "mri_synthstrip")
    data, brain = _phantom()
    removed = backends.get_backend("external", "mri_synthstrip").removal_mask(reference_volume(data, np.eye(4)))
    np.testing.assert_array_equal(removed, ~(data > 400))
