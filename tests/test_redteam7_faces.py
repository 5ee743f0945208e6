"""Red-team round 7: faces the face stage still skipped (docs/design-notes.md, "Red-team round 7:
faces the stage skipped"). Each test is named for the attack; each released a recognisable face
with exit 0 before (or, for the QC caption, withheld a clean subject).

* a head series of two volumes described as fMRI, ASL or a field map (skipped by its label);
* one 3D head volume whose ImageType says DIFFUSION, P or ADC (skipped by its label);
* a NIfTI head named with a derivative's suffix (``_mask``, ``_dseg``: taken at its name);
* a family name RED found in the face QC caption "removed region outlined in red".
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from deidflow.face import render
from deidflow.face.select import ImageFacts, decide, head_shape
from deidflow.settings import load_defaults, profile_settings

from .conftest import require_shared
from .face_series import head_series, read_volume
from .test_face_dicom import KEY, _MemoAnts, _reference_mask, _released, _run, _unit, _volume
from .test_redteam6_faces import _relabelled, _report

FACE = load_defaults()["face"]


@pytest.fixture
def memo_ants(monkeypatch):
    """The real ants backend, memoised per volume (as in test_face_dicom)."""
    from deidflow.face import backends
    monkeypatch.setenv("DEIDFLOW_KEY", KEY)
    monkeypatch.setattr(backends, "get_backend", lambda name, program=None: _MemoAnts())


def _face(blobs: list[bytes]) -> np.ndarray:
    """Where the demo head's face is (the reference mask on its skin), stored (slice, row, col) order."""
    ref_mask, _ = _reference_mask()
    original = read_volume(blobs)
    return ref_mask & (original > render.skin_threshold(original.astype(np.float32)))


def _other_unit(tmp_path, files: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> tuple[dict, dict, dict]:
    """Run the face stage on NIfTI inputs released by the other stage: ``files`` maps a release
    name to (data, affine, original file name). Returns the report by release name, the bytes
    before and the bytes after."""
    from deidflow.face.stage import face_unit
    out, restricted = tmp_path / "release", tmp_path / "restricted"
    folder = out / "sourcedata/nifti/sub-a"
    folder.mkdir(parents=True)
    restricted.mkdir()
    rows = []
    for key, (data, affine, name) in files.items():
        (folder / key).write_bytes(nib.Nifti1Image(data, affine).to_bytes())
        rows.append({"relpath": f"site/{key}/{name}", "format": "nifti1", "release_dir": "sourcedata/nifti",
                     "out_relpath": key, "primary": ""})
    before = {k: (folder / k).read_bytes() for k in files}
    (restricted / "manifest.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a",
                                                                                          "files": rows}]}))
    (restricted / "other.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a",
                                                                                       "files": len(rows)}]}))
    face_unit(None, out / "sourcedata/dicom", out, restricted, restricted / "done.json", restricted / "q.jsonl",
              profile_settings(load_defaults()), FACE, other_done=restricted / "other.json",
              manifest=restricted / "manifest.json")
    report = {im["nifti"].split("/")[-1]: im for im in json.loads((restricted / "done.json").read_text())["images"]}
    after = {k: (folder / k).read_bytes() if (folder / k).exists() else None for k in files}
    return report, before, after


# ------------------------------------------------------------------------------------------ 1. labels of a few volumes
@pytest.mark.usefixtures("memo_ants")
def test_head_series_of_two_volumes_described_as_fmri_asl_or_field_map_is_defaced(tmp_path):
    """The demo head twice (frames repeated at each position) described 'fMRI run', 'pCASL
    perfusion' or 'gre_field_mapping' was 'fMRI time series: not defaced (face.select.skip)' and
    released with both faces. A label of an image of at most six volumes at face resolution
    (pixels <= 3 mm) no longer decides alone: the head-shaped volume is defaced, both volumes."""
    head = head_series()
    series = {f"MR{k}-{kind}": _relabelled(head + head_series(), SeriesDescription=desc)
              for k, (kind, desc) in enumerate((("fmri", "fMRI run"), ("asl", "pCASL perfusion"),
                                                ("fieldmap", "gre_field_mapping")), start=1)}
    out, restricted = _unit(tmp_path, series)
    _run(out, restricted)
    report = _report(restricted)
    face = _face(head)
    for label in series:
        assert report[label]["method"] == "deface", (label, report[label]["reason"])
        assert "head-shaped volumes at face resolution" in report[label]["reason"]
        stored = read_volume(_released(out, label)[:96]), read_volume(_released(out, label)[96:])
        assert not stored[0][face].any() and not stored[1][face].any(), label


@pytest.mark.usefixtures("memo_ants")
def test_decoy_first_volume_does_not_hide_a_head_behind_its_label(tmp_path):
    """A two-volume ``_bold`` NIfTI whose first volume is blank and whose second is the head: the
    volume test looks at every one of a few volumes, so the head is found, and the series, whose
    first volume gives no mask for the second, is withheld."""
    vol = _volume(head_series())
    data = np.stack([np.zeros(vol.data.shape, np.int16), vol.data.astype(np.int16)], axis=-1)
    report, _, after = _other_unit(tmp_path, {"k1.nii": (data, vol.affine, "sub-01_task-rest_bold.nii")})
    assert report["k1.nii"]["method"] == "deface", report["k1.nii"]
    assert "withheld" in report["k1.nii"] and after["k1.nii"] is None


@pytest.mark.realdata
def test_real_epi_time_series_and_a_real_4d_of_few_volumes_keep_every_voxel(tmp_path):
    """Research utility: the real GE fMRI run (3 volumes, 3.75 mm pixels) named ``_bold`` and the
    Siemens-like nibabel example (2 volumes, 2 mm, 53 mm of slices) are not defaced or withheld:
    the first is too coarse for a label to be doubted, the second covers no face."""
    files = {}
    for key, rel, name in (("k1.nii", ("dcm_qa_ge", "Ref", "Ax_fMRI_HB3_48sl_int_asc_14.nii"), "sub-01_task-rest_bold.nii"),
                           ("k2.nii", ("nibabel", "example4d.nii.gz"), "sub-01_task-rest_bold.nii")):
        img = nib.load(require_shared(*rel))
        files[key] = (np.asarray(img.dataobj), img.affine, name)
    report, before, after = _other_unit(tmp_path, files)
    for key in files:
        assert report[key]["method"] == "none", report[key]
        assert after[key] == before[key]
    assert "fMRI" in report["k1.nii"]["reason"]


def test_coarse_or_long_series_still_skipped_by_its_label():
    """The label still decides for what cannot hide a head at face resolution: pixels coarser than
    3 mm, or more than six volumes (a real run); no volume is read for them."""
    base = dict(path="sourcedata/dicom/sub-a/ses-1/MR1/", suffix="", modality="MR", body_part="HEAD", description="",
                extent_mm=(240.0, 240.0, 96.0), kind="bold")
    assert decide(ImageFacts(volumes=3, in_plane_mm=3.75, **base), FACE).method == "none"
    assert not decide(ImageFacts(volumes=3, in_plane_mm=3.75, **base), FACE).pending
    assert not decide(ImageFacts(volumes=8, in_plane_mm=2.0, **base), FACE).pending
    assert decide(ImageFacts(volumes=2, in_plane_mm=2.0, **base), FACE).pending


# ------------------------------------------------------------------------------------------ 2. ImageType of one volume
@pytest.mark.usefixtures("memo_ants")
def test_3d_head_whose_image_type_says_diffusion_phase_or_adc_is_defaced(tmp_path):
    """One 3D head volume whose ImageType says DIFFUSION, P (phase) or ADC was 'diffusion-weighted
    series' / 'phase image: not defaced' and released with its face; the volume decides now."""
    head = head_series()
    series = {"MR1-diffusion": head_series(image_type=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]),
              "MR2-phase": head_series(image_type=["ORIGINAL", "PRIMARY", "P", "ND"]),
              "MR3-adc": head_series(image_type=["DERIVED", "PRIMARY", "ADC", "ND"])}
    out, restricted = _unit(tmp_path, series)
    _run(out, restricted)
    report = _report(restricted)
    face = _face(head)
    for label in series:
        assert report[label]["method"] == "deface", (label, report[label]["reason"])
        assert not read_volume(_released(out, label))[face].any(), label


def test_a_phase_map_is_not_taken_for_a_head():
    """Research utility: a phase map (wrapped phase inside the head, uniform phase noise outside)
    is a signed map, not a picture of a head; a CT in Hounsfield units and a magnitude head are not
    signed maps."""
    from deidflow.face.select import signed_map
    t1 = _volume(head_series()).data.astype(np.float32)
    rng = np.random.default_rng(5)
    inside = t1 > render.skin_threshold(t1)
    x = np.indices(t1.shape)[0].astype(np.float32)
    phase = np.where(inside, np.angle(np.exp(1j * x / 7.0)), rng.uniform(-np.pi, np.pi, t1.shape)).astype(np.float32)
    assert signed_map(phase)
    ok, why = head_shape(phase, (2.0, 2.0, 2.0), render.skin_threshold(phase))
    assert not ok and "signed map" in why
    hu = np.where(inside, 40.0, -1000.0).astype(np.float32)
    assert not signed_map(hu) and not signed_map(t1)


# ------------------------------------------------------------------------------------------ 3. derivative names
@pytest.mark.usefixtures("memo_ants")
def test_nifti_head_named_as_a_mask_or_segmentation_is_defaced(tmp_path):
    """The demo head given as ``sub-01_mask.nii`` or ``sub-01_dseg.nii`` was 'no modality and not a
    head MRI suffix' and released with its face. A real mask (two values) and a label image (four
    tissue classes) so named keep every voxel; a greyscale head is what its voxels show."""
    vol = _volume(head_series())
    t1 = vol.data.astype(np.int16)
    thr = render.skin_threshold(vol.data)
    mask = (vol.data > thr).astype(np.uint8)
    from scipy import ndimage
    labels = np.digitize(ndimage.gaussian_filter(vol.data, 1.5), [thr, 2 * thr, 4 * thr]).astype(np.int16)  # 4 classes
    report, before, after = _other_unit(tmp_path, {
        "k1.nii": (t1, vol.affine, "sub-01_mask.nii"), "k2.nii": (t1, vol.affine, "sub-01_desc-brain_dseg.nii"),
        "k3.nii": (mask, vol.affine, "sub-01_desc-head_mask.nii"), "k4.nii": (labels, vol.affine, "sub-01_dseg.nii")})
    for key in ("k1.nii", "k2.nii"):
        assert report[key]["method"] == "deface" and "withheld" not in report[key], report[key]
        assert (np.asarray(nib.Nifti1Image.from_bytes(after[key]).dataobj) != t1).sum() > 10000
    for key in ("k3.nii", "k4.nii"):
        assert report[key]["method"] == "none" and "label image" in report[key]["reason"], report[key]
        assert after[key] == before[key]


@pytest.mark.realdata
def test_real_head_is_no_label_image_even_in_eight_bits():
    """chris_t1 (8 bits, 255 values; 4 % of its voxels equal their neighbour) is greyscale: not a label image."""
    from deidflow.face.select import label_image
    img = nib.load(require_shared("mricron", "chris_t1.nii.gz"))
    data = np.asarray(img.dataobj)
    assert not label_image(data)
    assert not label_image(np.round(data / data.max() * 255).astype(np.uint8))
    assert label_image((data > np.percentile(data, 60)).astype(np.uint8))


# ------------------------------------------------------------------------------------------ 7. the release's own words
def test_qc_caption_wording_is_not_a_leak_but_a_value_in_it_is(tmp_path):
    """A subject whose family name is RED was withheld: the face QC caption says 'removed region
    outlined in red'. The caption's own wording is not searched; its values (the image's path, the
    backend) are, and the same words elsewhere in the release are still a hit."""
    from deidflow.qc import captions   # (the old code had no such module: the test below names its forms)
    from deidflow.qc.identifiers import Matcher, needles_for
    from deidflow.qc.leakscan import scan_file
    matcher = Matcher(needles_for("sub-a", [("name", "PatientName", "RED^ALMA")], b"salt"))
    qc = tmp_path / "derivatives/deidflow/qc/sub-a/face"
    qc.mkdir(parents=True)

    def hits(rel: str, doc) -> int:
        (tmp_path / rel).write_text(json.dumps(doc))
        return len(scan_file(tmp_path / rel, rel, matcher).hits)

    index = "derivatives/deidflow/qc/sub-a/face/index.json"
    clean = [{"file": "a.png", "kind": "face_slices", "caption": captions.FACE_SLICES.format(
        image="sub-a/anat/sub-a_T1w.nii.gz", what="defaced", backend="ants")},
        {"file": "b.png", "kind": "face_front_after", "caption": captions.FACE_FRONT.format(
            image="sub-a/anat/sub-a_T1w.nii.gz", when="after", what="defaced", backend="ants")}]
    assert hits(index, clean) == 0
    leak = [dict(clean[0], caption=captions.FACE_SLICES.format(image="sub-a/anat/sub-a_acq-Red_T1w.nii.gz",
                                                                what="defaced", backend="ants"))]
    assert hits(index, leak) == 1
    assert hits(index, [dict(clean[0], caption="outlined in red")]) == 1           # not a caption's form
    assert hits(index, [dict(clean[0], file="red.png")]) == 1
    assert hits("derivatives/deidflow/qc/sub-a/face/notes.json", clean) >= 1     # not an index


# ------------------------------------------------------------------------------------------ 4. single slices
@pytest.mark.usefixtures("memo_ants")
def test_single_sagittal_slice_of_a_head_is_withheld_axial_and_coronal_are_not(tmp_path):
    """An original sagittal slice of the head (a localiser, a midline slice: the facial profile,
    nose, lips and chin, as a profile photograph shows them) was released ('no 3D coverage').
    Withheld now; an axial or a coronal slice (a cross-section), a sagittal slice of a knee and
    one with 6 mm pixels are released untouched."""
    head = head_series()
    loc = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    series = {"MR1-sagittal": _relabelled([head[48]], ImageType=loc),
              "MR2-axial": _relabelled([head[48]], ImageType=loc, ImageOrientationPatient=[1, 0, 0, 0, 1, 0]),
              "MR3-coronal": _relabelled([head[48]], ImageType=loc, ImageOrientationPatient=[1, 0, 0, 0, 0, -1]),
              "MR4-knee": _relabelled([head[48]], ImageType=loc, BodyPartExamined="KNEE"),
              "MR5-coarse": _relabelled([head[48]], ImageType=loc, PixelSpacing=[6, 6])}
    out, restricted = _unit(tmp_path, series)
    before = {label: _released(out, label) for label in series}
    _run(out, restricted)
    report = _report(restricted)
    assert report["MR1-sagittal"]["method"] == "withhold" and "facial profile" in report["MR1-sagittal"]["reason"]
    assert _released(out, "MR1-sagittal") == []
    for label in ("MR2-axial", "MR3-coronal", "MR4-knee", "MR5-coarse"):
        assert report[label]["method"] == "none", report[label]
        assert _released(out, label) == before[label]


# ------------------------------------------------------------------------------------------ 5. pictures as NIfTI
@pytest.mark.usefixtures("memo_ants")
def test_one_slice_nifti_picture_of_a_face_is_withheld(tmp_path):
    """A rendering of the face saved as a one-slice NIfTI (no scanner geometry: qform and sform
    codes 0) and an RGB one were released ('no 3D coverage'). A picture with no medical geometry
    in a medical export is withheld; a one-slice axial image with its geometry is not."""
    from deidflow.face.volume import reference_volume
    vol = _volume(head_series())
    ras = reference_volume(vol.data.astype(np.float32), vol.affine)
    front = render.front_view(ras.data, ras.zooms, render.skin_threshold(ras.data))   # the face, seen from the front
    grey = nib.Nifti1Image(front[:, :, None].astype(np.uint8), None)     # no affine: qform and sform codes 0
    rgb_t = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = np.zeros(front.shape + (1,), rgb_t)
    rgb["R"] = rgb["G"] = rgb["B"] = front[:, :, None]
    axial = np.asarray(front[:, :, None], np.int16)
    from deidflow.face.stage import face_unit
    out, restricted = tmp_path / "release", tmp_path / "restricted"
    folder = out / "sourcedata/nifti/sub-a"
    folder.mkdir(parents=True)
    restricted.mkdir()
    imgs = {"k1.nii": grey, "k2.nii": nib.Nifti1Image(rgb, np.eye(4)), "k3.nii": nib.Nifti1Image(axial, np.eye(4))}
    rows = []
    for key, img in imgs.items():
        nib.save(img, folder / key)
        rows.append({"relpath": f"site/{key}", "format": "nifti1", "release_dir": "sourcedata/nifti",
                     "out_relpath": key, "primary": ""})
    (restricted / "manifest.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a",
                                                                                          "files": rows}]}))
    (restricted / "other.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a",
                                                                                       "files": 3}]}))
    face_unit(None, out / "sourcedata/dicom", out, restricted, restricted / "done.json", restricted / "q.jsonl",
              profile_settings(load_defaults()), FACE, other_done=restricted / "other.json",
              manifest=restricted / "manifest.json")
    report = {im["nifti"].split("/")[-1]: im for im in json.loads((restricted / "done.json").read_text())["images"]}
    for key in ("k1.nii", "k2.nii"):
        assert report[key]["method"] == "withhold" and "picture" in report[key]["reason"], report[key]
        assert not (folder / key).exists()
    assert report["k3.nii"]["method"] == "none" and (folder / "k3.nii").exists()


# ------------------------------------------------------------------------------------------ 6. PET
def test_pet_fused_in_colour_with_a_head_ct_is_withheld_plain_pet_is_not():
    """A PET/CT fusion of the head in colour (RGB, PET SOP class: the CT's face outline in every
    slice) was 'modality PT, neither MR nor CT' and released. Withheld as a picture that cannot
    be defaced, with or without 3D coverage; a plain (greyscale) PET head is left as it was."""
    from deidflow.face.select import head_picture
    pet = {"Modality": "PT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.128", "BodyPartExamined": "HEAD"}
    fused = head_picture({**pet, "PhotometricInterpretation": "RGB"}, FACE["select"]["body_parts"], (256, 256))
    assert fused == "a 2D colour picture of a head"
    assert head_picture({**pet, "PhotometricInterpretation": "MONOCHROME2"}, FACE["select"]["body_parts"]) == ""
    base = dict(path="sourcedata/dicom/sub-a/ses-1/PT1/", suffix="", modality="PT", body_part="HEAD", description="")
    for ext in ((256.0, 256.0, 200.0), (256.0, 256.0, 3.0)):
        assert decide(ImageFacts(extent_mm=ext, picture=fused, **base), FACE).method == "withhold"
        assert decide(ImageFacts(extent_mm=ext, **base), FACE).method == "none"


@pytest.mark.usefixtures("memo_ants")
def test_ct_head_stored_under_a_pet_label_is_defaced_a_pet_is_not(tmp_path):
    """The CT-like demo head stored under the PET SOP class with Modality PT was 'modality PT,
    neither MR nor CT' and released with its face. A series under a PET label whose values are
    Hounsfield units (a fifth of them air, a twentieth soft tissue) is a CT: defaced. The demo
    head's intensities as PET activity (nothing below zero) are left as they were."""
    pet = "1.2.840.10008.5.1.4.1.1.128"
    series = {"PT1-ct-values": _relabelled(head_series(modality="CT"), Modality="PT", SOPClassUID=pet),
              "PT2-pet": _relabelled(head_series(), Modality="PT", SOPClassUID=pet)}
    out, restricted = _unit(tmp_path, series)
    before = {label: _released(out, label) for label in series}
    _run(out, restricted)
    report = _report(restricted)
    assert report["PT1-ct-values"]["method"] == "deface", report["PT1-ct-values"]
    assert "CT values under a PET label" in report["PT1-ct-values"]["reason"]
    ct = read_volume(_released(out, "PT1-ct-values")).astype(np.int32) - 1024
    ct0 = read_volume(before["PT1-ct-values"]).astype(np.int32) - 1024
    ref_mask, _ = _reference_mask()
    assert np.mean(ct[ref_mask & (ct0 > -400)] == -1000) > 0.99       # the face region is air now
    assert report["PT2-pet"]["method"] == "none" and _released(out, "PT2-pet") == before["PT2-pet"]


@pytest.mark.usefixtures("memo_ants")
def test_converted_ct_head_under_a_pet_label_is_defaced(tmp_path):
    """The same CT head under a PET label, converted to a BIDS ``_pet`` image: the converted image
    decides for its series, and it was 'modality PT, neither MR nor CT'. Its values are Hounsfield
    units: defaced, the NIfTI's face region air."""
    import gzip
    ct_series = _relabelled(head_series(modality="CT"), Modality="PT", SOPClassUID="1.2.840.10008.5.1.4.1.1.128")
    out, restricted = _unit(tmp_path, {"PT1-ct": ct_series})
    vol = _volume(ct_series)
    pet = out / "sub-a/ses-1/pet"
    pet.mkdir(parents=True)
    data = np.rint(vol.data).astype(np.int16)
    assert data.min() <= -900                                       # real values: Hounsfield units
    (pet / "sub-a_ses-1_pet.nii.gz").write_bytes(gzip.compress(nib.Nifti1Image(data, vol.affine).to_bytes(), mtime=0))
    (restricted / "convert.json").write_text(json.dumps({"unit": "sub-a", "subjects": [{"subject": "sub-a", "images": [
        {"nifti": "sub-a/ses-1/pet/sub-a_ses-1_pet.nii.gz", "series": "ses-1/PT1-ct", "suffix": "pet",
         "modality": "PT", "files": ["sub-a/ses-1/pet/sub-a_ses-1_pet.nii.gz"]}], "not_converted": []}]}))
    _run(out, restricted)
    im = json.loads((restricted / "done.json").read_text())["images"][0]
    assert im["method"] == "deface" and "CT values under a PET label" in im["reason"], im
    after = np.asarray(nib.load(pet / "sub-a_ses-1_pet.nii.gz").dataobj)
    removed = after != data
    assert removed.sum() > 10000 and np.all(after[removed] == -1000)
