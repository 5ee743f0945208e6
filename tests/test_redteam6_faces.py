"""Red-team round 6: faces that escaped the face stage (docs/design-notes.md, "Red-team round 6:
faces"). Each test is named for the attack; each released a recognisable face with exit 0 before.

* an MR head stored under Modality OT or PT, as a Secondary Capture, or with no Modality;
* a head stack exported as screen saves without position or orientation;
* 2D pictures derived from a head: a MIP, a rendered skin surface as an RGB secondary capture, an
  external-camera photograph;
* a head split into one-slice series;
* a series whose second volume is the head turned (the first volume's mask missed its face);
* a 3D T1 given as a NIfTI named ``*_bold.nii.gz``;
* a header whose orientation lies (a flipped or swapped axis): the template was registered to a
  wrong local optimum and the back or top of the head was "defaced".
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage, generate_uid

from deidflow import demo_head
from deidflow.face import render
from deidflow.face.select import ImageFacts, decide
from deidflow.settings import load_defaults

from .conftest import ROOT, TEST_KEY, require_shared
from .face_series import head_series, read_volume
from .test_face_dicom import KEY, _MemoAnts, _reference_mask, _released, _run, _unit

FACE = load_defaults()["face"]


@pytest.fixture
def memo_ants(monkeypatch):
    """The real ants backend, memoised per volume (as in test_face_dicom)."""
    from deidflow.face import backends
    monkeypatch.setenv("DEIDFLOW_KEY", KEY)
    monkeypatch.setattr(backends, "get_backend", lambda name, program=None: _MemoAnts())


def _relabelled(blobs: list[bytes], **attrs) -> list[bytes]:
    """The series with attributes set (None: removed), one new series UID; the SOP class in the
    file meta follows the data set's."""
    uid, out = generate_uid(), []
    for b in blobs:
        ds = pydicom.dcmread(io.BytesIO(b))
        ds.SeriesInstanceUID = uid
        for k, v in attrs.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _report(restricted) -> dict:
    return {e["dicom_series"].split("/")[-2]: e for e in json.loads((restricted / "done.json").read_text())["images"]}


def _quarantined(restricted) -> set[str]:
    return {json.loads(line)["file"].split("/")[1] for line in (restricted / "q.jsonl").read_text().splitlines()}


def _picture(rows: int = 128, cols: int = 128, *, rgb: bool, image_type, modality="OT", sop=SecondaryCaptureImageStorage,
             body_part=None, geometry=False) -> bytes:
    """One 2D picture of the demo head (its lateral maximum intensity projection)."""
    mip = read_volume(head_series()).max(axis=0).astype(np.float32)        # (rows, cols) of a sagittal view
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, generate_uid(), modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1", generate_uid()
    ds.PatientID = ds.PatientName = "sub-a"
    ds.ImageType = image_type
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = mip.shape
    if rgb:
        pic = (mip / mip.max() * 255).astype(np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = np.stack([pic] * 3, axis=-1).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = mip.astype(np.uint16).tobytes()
    if geometry:
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [0, 1, 0, 0, 0, -1], [2, 2]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.usefixtures("memo_ants")
def test_mr_head_labelled_ot_pt_secondary_capture_or_no_modality_is_defaced(tmp_path):
    """'modality OT, neither MR nor CT': the demo head stored with Modality OT or PT (MR Image
    Storage kept), as a Secondary Capture with its geometry, or with no Modality at all, was
    released with its face. The SOP class says MR; a generic label (OT, SC, none) says nothing, so
    the body part and, failing it, the volume decide. Each is now defaced like the reference."""
    head = head_series()
    series = {
        "OT1-mr-as-ot": _relabelled(head, Modality="OT"),
        "PT2-mr-as-pt": _relabelled(head, Modality="PT"),
        "OT3-secondary-capture": _relabelled(head, Modality="OT", SOPClassUID=SecondaryCaptureImageStorage),
        "OT4-no-modality": _relabelled(head, Modality=None),
        "OT5-sc-no-body-part": _relabelled(head, Modality="OT", SOPClassUID=SecondaryCaptureImageStorage,
                                           BodyPartExamined=None),
    }
    out, restricted = _unit(tmp_path, series)
    _run(out, restricted)
    ref_mask, _ = _reference_mask()
    original = read_volume(head)
    face = ref_mask & (original > render.skin_threshold(original.astype(np.float32)))
    report = _report(restricted)
    for label in series:
        assert report[label]["method"] == "deface", (label, report[label]["reason"])
        assert not read_volume(_released(out, label))[face].any(), label
    assert "head-shaped" in report["OT5-sc-no-body-part"]["reason"]


def test_pet_and_ultrasound_are_still_left_alone():
    """Research utility: a real PET (PET SOP class) or ultrasound series is not a head MRI/CT."""
    base = dict(path="sourcedata/dicom/sub-a/ses-1/PT1/", suffix="", body_part="HEAD", description="",
                extent_mm=(256.0, 256.0, 200.0))
    assert decide(ImageFacts(modality="PT", **base), FACE).method == "none"
    assert decide(ImageFacts(modality="US", **base), FACE).method == "none"


# ------------------------------------------------------------------------------------------ pictures
@pytest.mark.usefixtures("memo_ants")
def test_head_stack_exported_as_screen_saves_without_geometry_is_withheld(tmp_path):
    """A head exported as Secondary Capture frames without ImagePositionPatient /
    ImageOrientationPatient (what PACS 'screen save' exports of a CT look like:
    DERIVED\\SECONDARY\\SCREEN SAVE, no geometry) was 'no image frames with a position' and released:
    stacked in file order it is the head, face included. Withheld, as is an MR stack without geometry."""
    head = head_series()
    series = {
        "OT1-screen-saves": _relabelled(head, Modality="OT", SOPClassUID=SecondaryCaptureImageStorage,
                                        ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"],
                                        ImagePositionPatient=None, ImageOrientationPatient=None),
        "MR2-no-geometry": _relabelled(head, ImagePositionPatient=None, ImageOrientationPatient=None),
    }
    out, restricted = _unit(tmp_path, series)
    _run(out, restricted)
    report = _report(restricted)
    for label in series:
        assert report[label]["method"] == "withhold", report[label]
        assert "without position or orientation" in report[label]["reason"]
        assert _released(out, label) == []
    assert _quarantined(restricted) == set(series)


@pytest.mark.usefixtures("memo_ants")
def test_2d_pictures_derived_from_a_head_are_withheld(tmp_path):
    """A lateral MIP of the head (MR, DERIVED\\SECONDARY\\MIP, one frame), a rendering as an RGB
    Secondary Capture (DERIVED\\SECONDARY\\3D) and an external-camera photograph (XC) of the head
    were released ('no 3D coverage', 'modality OT'): pictures cannot be defaced, so they are
    withheld. A MIP of a knee is not a picture of a head: released. (An original sagittal localiser
    slice of the head was released here too; since red-team 7 it is withheld as a facial profile:
    test_redteam7_faces.)"""
    series = {
        "MR1-mip": [_picture(rgb=False, image_type=["DERIVED", "SECONDARY", "MIP"], modality="MR", sop=MRImageStorage,
                             body_part="HEAD", geometry=True)],
        "OT2-render-rgb": [_picture(rgb=True, image_type=["DERIVED", "SECONDARY", "3D"])],
        "XC3-photo": [_picture(rgb=True, image_type=["ORIGINAL", "PRIMARY"], modality="XC",
                               sop="1.2.840.10008.5.1.4.1.1.77.1.4", body_part="FACE")],
        "MR4-localizer": [_picture(rgb=False, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], modality="MR",
                                   sop=MRImageStorage, body_part="HEAD", geometry=True)],
        "MR5-knee-mip": [_picture(rgb=False, image_type=["DERIVED", "SECONDARY", "MIP"], modality="MR",
                                  sop=MRImageStorage, body_part="KNEE", geometry=True)],
    }
    out, restricted = _unit(tmp_path, series)
    before = {label: _released(out, label) for label in series}
    _run(out, restricted)
    report = _report(restricted)
    for label in ("MR1-mip", "OT2-render-rgb", "XC3-photo"):
        assert report[label]["method"] == "withhold", report[label]
        assert "can show the face and cannot be defaced" in report[label]["reason"]
        assert _released(out, label) == []
    for label in ("MR5-knee-mip",):
        assert report[label]["method"] == "none", report[label]
        assert _released(out, label) == before[label]
    assert report["MR4-localizer"]["method"] == "withhold" and "facial profile" in report["MR4-localizer"]["reason"]
    assert _quarantined(restricted) == {"MR1-mip", "OT2-render-rgb", "XC3-photo", "MR4-localizer"}


@pytest.mark.usefixtures("memo_ants")
def test_head_split_into_one_slice_series_is_withheld(tmp_path):
    """The demo head as 96 series of one slice each (a new SeriesInstanceUID per file): every series
    had 'no 3D coverage of a face' and all 96 were released untouched; stacked by position they
    are the head. Withheld together. A localiser split into three one-slice series (sagittal,
    coronal, axial) is no head: its axial and coronal slices stay, its sagittal slice is withheld
    as a facial profile (red-team 7)."""
    head = head_series()
    series = {f"MR{100 + k}-slice": _relabelled([b]) for k, b in enumerate(head)}
    for k, iop in ((1, [1, 0, 0, 0, 1, 0]), (2, [1, 0, 0, 0, 0, -1]), (3, [0, 1, 0, 0, 0, -1])):
        series[f"MR{k}-localizer"] = _relabelled([head[40 + k]], ImageOrientationPatient=iop, PixelSpacing=[1.6, 1.6],
                                                 ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    out, restricted = _unit(tmp_path, series)
    before = {label: _released(out, label) for label in series if "localizer" in label}
    _run(out, restricted)
    report = _report(restricted)
    for label in series:
        if label == "MR3-localizer":   # sagittal: a facial profile since red-team 7
            assert report[label]["method"] == "withhold" and "facial profile" in report[label]["reason"]
        elif "localizer" in label:
            assert report[label]["method"] == "none" and _released(out, label) == before[label], report[label]
        else:
            assert report[label]["method"] == "withhold", report[label]
            assert "thin series of a head that together cover a face" in report[label]["reason"]
            assert _released(out, label) == []
    assert _quarantined(restricted) == {label for label in series if "localizer" not in label} | {"MR3-localizer"}


@pytest.mark.usefixtures("memo_ants")
def test_series_whose_second_volume_is_a_turned_head_is_withheld(tmp_path):
    """A two-volume series (frames repeated at each position) whose first volume is the demo head
    and whose second is the same head flipped along its rows: every volume got the first volume's
    mask, so the second kept its face (released, exit 0). Two echoes of one head (the second at 0.6
    of the intensity) are still defaced, both of them."""
    t1 = demo_head.head_t1()
    turned = t1[:, ::-1, :].copy()                  # rows reversed: the face on the other side
    series = {
        "MR1-decoy": _relabelled(head_series() + head_series(pixels=turned)),
        "MR2-echoes": _relabelled(head_series() + head_series(pixels=(t1 * 0.6).astype(t1.dtype))),
    }
    out, restricted = _unit(tmp_path, series)
    _run(out, restricted)
    report = _report(restricted)
    assert report["MR1-decoy"]["withheld"].startswith("volume 2 does not show the head where volume 1 does")
    assert _released(out, "MR1-decoy") == []
    assert report["MR2-echoes"]["method"] == "deface" and "withheld" not in report["MR2-echoes"]
    ref_mask, _ = _reference_mask()
    face = ref_mask & (t1 > render.skin_threshold(t1.astype(np.float32)))
    blobs = _released(out, "MR2-echoes")
    stored = np.stack([pydicom.dcmread(io.BytesIO(b)).pixel_array for b in blobs])   # 2 x 96 files, file order
    assert not stored[:96][face].any() and not stored[96:][face].any()


@pytest.mark.realdata
def test_moved_or_turned_later_volume_of_a_real_head_is_caught():
    """The measure behind the check, on the real chris_t1: echoes and an inversion-like contrast of
    the head pass; the head moved 10 mm or turned front to back does not."""
    from deidflow.face.stage import moved_volume
    from deidflow.face.volume import reference_volume
    data, affine, _ = _chris()
    x = reference_volume(data.astype(np.float32), affine)
    ok = [x.data * 0.6, np.abs(x.data - np.percentile(x.data[x.data > 0], 70))]
    assert moved_volume((x.data, ok), x.affine) is None
    for bad in (np.roll(x.data, -10, axis=1), x.data[:, ::-1, :].copy()):
        assert "volume 2 does not show the head" in moved_volume((x.data, [bad]), x.affine)


# ------------------------------------------------------------------------------------------ names
@pytest.mark.usefixtures("memo_ants")
def test_3d_head_named_as_a_time_series_is_not_skipped(tmp_path):
    """A NIfTI input named ``sub-01_task-rest_bold.nii.gz`` holding one 3D head (the demo T1): the
    name's BIDS suffix made it 'no modality and not a head MRI suffix' and it was released with its
    face. BIDS bold, dwi and asl images are 4D: the name of a 3D file so named is no evidence, the
    suffix makes it MR, and the head-shape test decides (defaced). The same head as an 8-volume
    ``_bold`` series is still an fMRI run and keeps every voxel."""
    import nibabel as nib

    from deidflow.face.stage import face_unit
    from deidflow.settings import profile_settings

    from .test_face_dicom import _volume
    vol = _volume(head_series())
    out, restricted = tmp_path / "release", tmp_path / "restricted"
    (out / "sourcedata/nifti/sub-a").mkdir(parents=True)
    restricted.mkdir()
    files = []
    for key, data in (("k1", vol.data), ("k2", np.repeat(vol.data[..., None], 8, axis=-1))):
        (out / f"sourcedata/nifti/sub-a/{key}.nii").write_bytes(nib.Nifti1Image(data.astype(np.int16), vol.affine).to_bytes())
        files.append({"relpath": f"site/{key}/sub-01_task-rest_bold.nii", "format": "nifti1",
                      "release_dir": "sourcedata/nifti", "out_relpath": f"{key}.nii", "primary": ""})
    before = {k: (out / f"sourcedata/nifti/sub-a/{k}.nii").read_bytes() for k in ("k1", "k2")}
    (restricted / "manifest.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a", "files": files}]}))
    (restricted / "other.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a", "files": 2}]}))
    face_unit(None, out / "sourcedata/dicom", out, restricted, restricted / "done.json", restricted / "q.jsonl",
              profile_settings(load_defaults()), FACE, other_done=restricted / "other.json",
              manifest=restricted / "manifest.json")
    report = {im["nifti"].split("/")[-1]: im for im in json.loads((restricted / "done.json").read_text())["images"]}
    assert report["k1.nii"]["method"] == "deface" and "head-shaped" in report["k1.nii"]["reason"], report["k1.nii"]
    after = np.asarray(nib.load(out / "sourcedata/nifti/sub-a/k1.nii").dataobj)
    ras_before = np.asarray(nib.Nifti1Image.from_bytes(before["k1"]).dataobj)
    assert (after != ras_before).sum() > 10000                     # the face region is gone
    assert report["k2.nii"]["method"] == "none" and "fMRI" in report["k2.nii"]["reason"]
    assert (out / "sourcedata/nifti/sub-a/k2.nii").read_bytes() == before["k2"]


# ------------------------------------------------------------------------------------------ orientation
def _chris():
    import nibabel as nib
    img = nib.load(require_shared("mricron", "chris_t1.nii.gz"))
    return np.asarray(img.dataobj), img.affine, img.header


_LIES = {"anterior-posterior flipped": np.diag([1.0, -1.0, 1.0, 1.0]),
         "superior-inferior flipped": np.diag([1.0, 1.0, -1.0, 1.0]),
         "anterior and superior swapped": np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])}


@pytest.mark.realdata
@pytest.mark.parametrize("lie", sorted(_LIES))
def test_orientation_header_that_lies_is_caught(lie):
    """The real chris_t1 head with an affine that lies: the template was registered to the back or
    top of the head (11-25 % removed: plausible) and 0 of the 20 most anterior lower-face skin
    points were removed. The orientation check finds a better-fitting orientation and says so; the
    true header passes."""
    from deidflow.face.ants_deface import orientation_problem
    from deidflow.face.volume import reference_volume
    data, affine, _ = _chris()
    true = reference_volume(data.astype(np.float32), affine)
    assert orientation_problem(true.data, true.affine) is None
    lying = reference_volume(data.astype(np.float32), _LIES[lie] @ affine)
    assert "orientation in the header does not match" in (orientation_problem(lying.data, lying.affine) or "")


@pytest.mark.realdata
@pytest.mark.parametrize("axis, degrees", [("x", 30), ("y", 20), ("z", 20)])
def test_orientation_check_passes_a_head_tilted_in_the_scanner(axis, degrees):
    """Research utility: chris_t1 turned 30 degrees chin to chest, or 20 degrees about either other
    axis (a head tilted in the coil, header right) is not taken for a lying header."""
    from deidflow.face.ants_deface import orientation_problem
    from deidflow.face.volume import reference_volume
    data, affine, _ = _chris()
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    rot = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
           "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    centre = affine[:3, :3] @ ((np.array(data.shape) - 1) / 2) + affine[:3, 3]
    turn = np.eye(4)
    turn[:3, :3] = rot
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    vol = reference_volume(data.astype(np.float32), turn @ affine)
    assert orientation_problem(vol.data, vol.affine) is None


@pytest.mark.realdata
@pytest.mark.slow
def test_nifti_head_with_a_flipped_affine_is_withheld_not_released_with_its_face(tmp_path):
    """End to end: chris_t1 as ``scan.nii.gz`` with its anterior-posterior axis flipped in the
    affine was 'defaced' at the back of the head and released with its face, exit 0. Now
    withheld with the reason, exit 3."""
    import nibabel as nib
    data, affine, header = _chris()
    inp = tmp_path / "in"
    (inp / "site9").mkdir(parents=True)
    flipped = affine @ np.array([[1, 0, 0, 0], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(data, flipped, header), inp / "site9" / "scan.nii.gz")
    out = tmp_path / "release"
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "1"],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    assert not list(out.glob("sourcedata/nifti/sub-*/*.nii*"))
    quarantine = (out.with_name(out.name + "_restricted") / "quarantine.tsv").read_text()
    assert "orientation in the header does not match" in quarantine


@pytest.mark.realdata
@pytest.mark.slow
def test_real_heads_keep_their_orientation_and_face_decision(tmp_path):
    """Research utility: the true headers of every real head pass the orientation check (chris_t1,
    XA30 series 5 and 6, decubitus HFS and HFP: the workflow tests deface them)."""
    import nibabel as nib

    from deidflow.bids.dcm2niix import executable
    from deidflow.face.ants_deface import orientation_problem
    from deidflow.face.volume import reference_volume
    heads = [require_shared("mricron", "chris_t1.nii.gz"), require_shared("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii"),
             require_shared("dcm_qa_xa30", "Ref", "6_anat-T1w_acq-tfl.nii")]
    for pos in ("HFS", "HFP"):
        subprocess.run([executable(), "-z", "y", "-f", pos, "-o", str(tmp_path),
                        str(require_shared("dcm_qa_decubitus", "In", pos))], check=True, capture_output=True)
        heads.append(tmp_path / f"{pos}.nii.gz")
    for path in heads:
        img = nib.load(path)
        vol = reference_volume(img.get_fdata(dtype=np.float32), img.affine)
        assert orientation_problem(vol.data, vol.affine) is None, path.name


def test_an_icon_sized_picture_is_not_a_head_picture():
    """A 16 x 16 secondary capture with no body part (the hostile-input suite's small valid files)
    was withheld as "a 2D secondary capture of a head": nothing that small shows a recognisable
    face. From MIN_PICTURE_PIXELS on a side it is a picture again."""
    from deidflow.face.select import MIN_PICTURE_PIXELS, head_picture
    attrs = {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}
    assert head_picture(attrs, ("HEAD",), (16, 16)) == ""
    assert head_picture(attrs, ("HEAD",), (MIN_PICTURE_PIXELS, 512)) == "a 2D secondary capture of a head"
    assert head_picture(attrs, ("HEAD",)) == "a 2D secondary capture of a head"  # size unknown: fail closed
