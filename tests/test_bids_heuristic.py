"""Series heuristic, user mapping, naming (acq-/run-/echo-, no collisions) and dataset files."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from deidflow.bids.dataset import dataset_files
from deidflow.bids.dcm2niix import Output, gzip_file
from deidflow.bids.heuristic import Target, classify, nifti_volumes, parse_rules, rules_for, task_label
from deidflow.bids.naming import Image, assign_names
from deidflow.bids.series import SeriesInfo

BUILTIN = rules_for([])


def attrs(**kw):
    base = {"Modality": "MR", "Description": "", "Volumes": 1, "HasBValues": False, "BValueMax": 0.0,
            "EchoNumber": 1, "IsPhase": False, "ConverterTag": "", "ImageType": "ORIGINAL\\PRIMARY\\M\\ND"}
    return {**base, **kw}


@pytest.mark.parametrize("given, expected", [
    (dict(ScanningSequence="GR\\IR", InversionTime=900, EchoTime=2.4, RepetitionTime=1800), ("anat", "T1w")),
    (dict(ScanningSequence="SE", EchoTime=15, RepetitionTime=500), ("anat", "T1w")),
    (dict(ScanningSequence="SE", EchoTime=100, RepetitionTime=4000), ("anat", "T2w")),
    (dict(ScanningSequence="SE\\IR", InversionTime=2500, EchoTime=90, RepetitionTime=9000), ("anat", "FLAIR")),
    (dict(ScanningSequence="SE", EchoTime=12, RepetitionTime=3000), ("anat", "PDw")),
    (dict(ScanningSequence="GR", EchoTime=20, RepetitionTime=600), ("anat", "T2starw")),
    (dict(ScanningSequence="EP", EchoTime=30, RepetitionTime=2000, Volumes=200), ("func", "bold")),
    (dict(ScanningSequence="EP", EchoTime=30, RepetitionTime=2000, Volumes=1, SequenceName="epfid2d1_64"), ("func", "sbref")),
    (dict(ScanningSequence="EP", HasBValues=True, BValueMax=1000, Volumes=65), ("dwi", "dwi")),
    (dict(ScanningSequence="EP", SequenceName="*epse2d1_86", Volumes=3, EchoTime=66), ("fmap", "epi")),
    (dict(SequenceName="*fm2d2r", EchoNumber=2), ("fmap", "magnitude2")),
    (dict(SequenceName="*fm2d2r", IsPhase=True), ("fmap", "phasediff")),
    (dict(SequenceName="tgse_pcasl", Volumes=20), ("perf", "asl")),
    (dict(Modality="CT"), ("ct", "ct")),
    (dict(Modality="PT"), ("pet", "pet")),
    (dict(Modality="US"), ("unsorted", "")),
    (dict(ImageType="DERIVED\\PRIMARY\\ADC"), ("unsorted", "")),
    (dict(Description="AAHead_Scout_64ch", EchoTime=1.4, RepetitionTime=3), ("unsorted", "")),
    (dict(ScanningSequence="EP", ImageType="ORIGINAL\\PRIMARY\\DIFFUSION\\NONE", Volumes=30), ("unsorted", "")),
    (dict(ScanningSequence="SE", EchoTime=100, RepetitionTime=4000, IsPhase=True), ("unsorted", "")),
    (dict(EchoTime=40, RepetitionTime=800), ("unsorted", "")),  # no rule: kept aside, never dropped
    # issue 20: EPI time series are never anat; GE multiband fMRI of 3 volumes is BOLD
    (dict(ScanningSequence="EP\\GR", SequenceName="epiRT", EchoTime=30, RepetitionTime=1000, Volumes=3), ("func", "bold")),
    (dict(ScanningSequence="EP", SequenceName="epfid2d1_64", EchoTime=30, RepetitionTime=2000, Volumes=4), ("func", "bold")),
    (dict(ScanningSequence="SE", SequenceName="*epse2d1_64", EchoTime=20, RepetitionTime=800, Volumes=6), ("unsorted", "")),
    (dict(ImageType="ORIGINAL\\PRIMARY\\EPI\\NONE", EchoTime=12, RepetitionTime=900, Volumes=8,
          ScanningSequence="SE"), ("unsorted", "")),
    (dict(ScanningSequence="GR", EchoTime=2, RepetitionTime=5, Volumes=40), ("unsorted", "")),  # DCE: not anat
    # pCASL/ASL → perf, whatever its TE/TR say (Philips enhanced pCASL was named anat/PDw)
    (dict(ScanningSequence="GR", PulseSequenceDetails="%SiemensSeq%\\tgse_pcasl", EchoTime=13, RepetitionTime=4000,
          Volumes=30), ("perf", "asl")),
    (dict(ImageType="ORIGINAL\\PRIMARY\\ASL\\NONE", EchoTime=13, RepetitionTime=4000, Volumes=2), ("perf", "asl")),
    (dict(ArterialSpinLabelingType="PCASL", ScanningSequence="EP", EchoTime=13, RepetitionTime=4000, Volumes=80),
     ("perf", "asl")),
    # DWI of every vendor with a gradient table (GE EP\SE, Philips/Canon without ScanningSequence EP)
    (dict(ScanningSequence="EP\\SE", SequenceName="epi2", HasBValues=True, BValueMax=1000, Volumes=7), ("dwi", "dwi")),
    (dict(ScanningSequence="SE", HasBValues=True, BValueMax=800, Volumes=33), ("dwi", "dwi")),
])
def test_builtin_heuristic(given, expected):
    t = classify(attrs(**given), BUILTIN)
    assert (t.datatype, t.suffix) == expected, t.rule


def test_unmatched_reason_and_task_labels():
    t = classify(attrs(EchoTime=40, RepetitionTime=800), BUILTIN)
    assert t.reason == "no BIDS rule matched"
    for rule in BUILTIN:  # every built-in rule that sets an image aside says why
        assert rule.datatype != "unsorted" or rule.reason, rule.name
    bold = classify(attrs(ScanningSequence="EP", Volumes=100, Description="fMRI_task-nback_run1"), BUILTIN)
    assert bold.entities == {"task": "nback"}
    assert task_label({"Description": "resting state"}) == "rest" and task_label({}) == "unknown"


def test_user_mapping_wins_and_is_validated():
    rules = rules_for([{"match": {"SeriesDescription": "^mprage", "EchoTime": "<5"}, "datatype": "anat",
                        "suffix": "T1w", "entities": {"acq": "mprage"}},
                       {"match": {"SeriesDescription": "junk"}, "datatype": "unsorted"}])
    t = classify(attrs(SeriesDescription="MPRAGE_sag", EchoTime=2.9, RepetitionTime=2300), rules)
    assert (t.rule, t.suffix, t.entities) == ("bids.mapping[0]", "T1w", {"acq": "mprage"})
    assert classify(attrs(SeriesDescription="junk T2", EchoTime=100, RepetitionTime=4000), rules).datatype == "unsorted"
    for bad, msg in [({"match": {}, "datatype": "anat", "suffix": "T1w"}, "match"),
                     ({"match": {"X": "("}, "datatype": "anat", "suffix": "T1w"}, "regular expression"),
                     ({"match": {"X": "a"}, "datatype": "nope"}, "datatype"),
                     ({"match": {"X": "a"}, "datatype": "anat", "suffix": "T1 w"}, "suffix"),
                     ({"match": {"X": "a"}, "datatype": "anat", "suffix": "T1w", "entities": {"run": "1"}}, "entity"),
                     ({"match": {"X": "a"}, "datatype": "anat", "suffix": "T1w", "entities": {"acq": "a-b"}}, "label")]:
        with pytest.raises(ValueError, match=msg) as exc:
            parse_rules([bad], "bids.mapping")
        assert "bids.mapping[0]" in str(exc.value)


def _image(session, label, number, target, tag="", **a):
    series = SeriesInfo(session, label, Path("/nonexistent"), 1, {"SeriesNumber": number, **a}, a.get("Plane", ""))
    return Image(series, Output(tag, Path(f"/nonexistent/series{tag}.nii")), {**series.attrs, **a}, target)


def test_names_runs_variants_echoes_and_no_collision():
    t1 = Target("anat", "T1w", {}, "t1w")
    bold = Target("func", "bold", {"task": "rest"}, "bold")
    images = [
        _image("ses-a", "MR002-x", 2, t1, MRAcquisitionType="3D", EchoTime=2.4),
        _image("ses-a", "MR005-y", 5, t1, MRAcquisitionType="3D", EchoTime=2.4),  # repeat
        _image("ses-a", "MR007-z", 7, t1, MRAcquisitionType="2D", EchoTime=2.4),  # variant
        _image("ses-a", "MR009-w", 9, bold, tag="_e1", EchoNumber=1, EchoTime=12),
        _image("ses-a", "MR009-w", 9, bold, tag="_e2", EchoNumber=2, EchoTime=30),
        _image("ses-b", "MR002-v", 2, t1, MRAcquisitionType="3D", EchoTime=2.4),  # other session
        _image("ses-a", "US001-u", 1, Target("unsorted", "", {}, "not-mr")),
        _image("ses-a", "MR011-s", 11, t1, tag="", MRAcquisitionType="3D", EchoTime=2.4, Plane="sag"),
    ]
    assign_names("sub-abc", images)
    stems = [im.stem for im in images]
    assert len(set(stems)) == len(stems)
    assert stems[0] == "sub-abc/ses-a/anat/sub-abc_ses-a_acq-3d_run-1_T1w"
    assert stems[1] == "sub-abc/ses-a/anat/sub-abc_ses-a_acq-3d_run-2_T1w"
    assert stems[2] == "sub-abc/ses-a/anat/sub-abc_ses-a_acq-2d_T1w"
    assert stems[3] == "sub-abc/ses-a/func/sub-abc_ses-a_task-rest_echo-1_bold"
    assert stems[4] == "sub-abc/ses-a/func/sub-abc_ses-a_task-rest_echo-2_bold"
    assert stems[5] == "sub-abc/ses-b/anat/sub-abc_ses-b_T1w"
    assert stems[6] == "sourcedata/unsorted/sub-abc/ses-a/US001-u"
    assert stems[7] == "sub-abc/ses-a/anat/sub-abc_ses-a_acq-3dsag_T1w"  # no single property tells all apart


def test_acq_labels_fall_back_when_no_property_tells_variants_apart():
    t = Target("anat", "T2w", {}, "t2w")
    images = [_image("ses-a", "MR001-k", 1, t, FlipAngle=90), _image("ses-a", "MR002-k", 2, t)]
    assign_names("sub-x", images)  # one flip angle unknown: no label can be built from the values
    assert [im.entities.get("acq") for im in images] == ["v1", "v2"]
    te = [_image("ses-a", f"MR00{n}-k", n, t, EchoTime=e, RepetitionTime=r)
          for n, (e, r) in enumerate([(100, 4000), (100, 5000), (120, 4000)], start=1)]
    assign_names("sub-x", te)
    assert [im.entities["acq"] for im in te] == ["te100tr4000", "te100tr5000", "te120tr4000"]


def test_dataset_files_characteristics_and_determinism():
    subjects = [{"subject": "sub-b", "images": [{}], "unsorted": [], "not_converted": [],
                 "participant": {"sex": "F", "age": 90}},
                {"subject": "sub-a", "images": [{}], "unsorted": [{}], "not_converted": [],
                 "participant": {"age": 0.5}},
                {"subject": "sub-c", "images": [], "unsorted": [{}], "not_converted": [], "participant": {}}]
    settings = {"options": ["retain_patient_characteristics"], "private": "safe"}
    files = dataset_files(sorted(subjects, key=lambda s: s["subject"]), settings, {"name": "Study X"}, "v1.0.20260724")
    assert files["participants.tsv"] == "participant_id\tsex\tage\nsub-a\tn/a\t0.5\nsub-b\tF\t90\n"
    desc = json.loads(files["dataset_description.json"])
    assert desc["Name"] == "Study X" and desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    assert "retain_patient_characteristics" in desc["GeneratedBy"][0]["Description"]
    assert desc["GeneratedBy"][1] == {"Name": "dcm2niix", "Version": "v1.0.20260724",
                                      "Description": desc["GeneratedBy"][1]["Description"]}
    plain = dataset_files(subjects, {"options": []}, {}, "v")
    assert plain["participants.tsv"].splitlines()[0] == "participant_id"
    assert "sex" not in json.loads(plain["participants.json"])
    assert dataset_files(subjects, {"options": []}, {}, "v") == plain


def test_nifti_volumes_and_deterministic_gzip(tmp_path):
    hdr = bytearray(352)
    hdr[0:4] = struct.pack("<i", 348)
    hdr[40:56] = struct.pack("<8h", 4, 2, 2, 2, 7, 1, 1, 1)
    src = tmp_path / "a.nii"
    src.write_bytes(bytes(hdr) + b"\0" * 56)
    assert nifti_volumes(src) == 7
    gzip_file(src, tmp_path / "1.nii.gz")
    gzip_file(src, tmp_path / "2.nii.gz")
    assert (tmp_path / "1.nii.gz").read_bytes() == (tmp_path / "2.nii.gz").read_bytes()
    assert gzip.decompress((tmp_path / "1.nii.gz").read_bytes()) == src.read_bytes()
    assert b"a.nii" not in (tmp_path / "1.nii.gz").read_bytes()[:32]  # no file name in the gzip header
