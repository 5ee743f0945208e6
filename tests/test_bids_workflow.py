"""BIDS release through the workflow on the bundled demo patients: validator, layout, switches."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deidflow.demo import planted_identifiers

from .conftest import ROOT, TEST_KEY

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

MAPPING = ('bids.mapping=[{match: {SeriesDescription: "^t1_se_sag$"}, datatype: anat, suffix: T1w, '
           'entities: {acq: sag}}]')


def validator_errors(root: Path) -> list[str]:
    """Errors of the BIDS validator (the bids-validator-deno package of the test extra, which
    bundles the validator and its schema and runs offline)."""
    exe = Path(sys.executable).with_name("bids-validator-deno")
    if not exe.exists():
        exe = Path(shutil.which("bids-validator-deno") or "")
    assert exe.is_file(), "bids-validator-deno is missing: pip install -e '.[test]' (make install)"
    r = subprocess.run([str(exe), str(root), "--format", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(r.stdout)
    return [f"{i['code']} {i.get('location', '')} {i.get('subCode', '')}"
            for i in report["issues"]["issues"] if i["severity"] == "error"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEIDFLOW_KEY": TEST_KEY}
    return subprocess.run([sys.executable, "-m", "deidflow.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def bids_hashes(out: Path) -> dict[str, str]:
    """Every release file except the de-identified DICOM."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and "sourcedata/dicom" not in p.as_posix()}


def _word(value: str) -> re.Pattern:
    """``value`` not touching a letter or digit (MARY is a planted name part, PRIMARY is not it)."""
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(value) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def markers(restricted: Path) -> list[dict]:
    return [s for m in sorted((restricted / "done" / "convert").glob("*.json"))
            for s in json.loads(m.read_text())["subjects"]]


@pytest.fixture(scope="module")
def default(demo_release):
    """The demo export released with the default configuration (conftest's session run)."""
    return demo_release


def test_demo_command_release_passes_bids_validator(demo_command):
    """`deidflow demo` itself (ephemeral key) gives a BIDS tree with zero validator errors (the
    session's demo run, conftest's ``demo_command``)."""
    assert demo_command["exit"] == 0, demo_command["text"][-3000:]
    out = demo_command["dest"] / "release"
    assert (out / "dataset_description.json").is_file() and list(out.glob("sub-*/ses-*/anat/*_T2w.nii.gz"))
    assert validator_errors(out) == []


def test_layout_and_done_markers(default):
    out, restricted = default["out"], default["restricted"]
    subjects = markers(restricted)
    assert len(subjects) == 5
    with_bids = sorted(s["subject"] for s in subjects if s["images"])
    assert sorted(p.name for p in out.glob("sub-*")) == with_bids
    lines = (out / "participants.tsv").read_text().splitlines()
    assert lines[0] == "participant_id" and lines[1:] == with_bids  # no sex/age without the option
    kinds = {(i["datatype"], i["suffix"]) for s in subjects for i in s["images"]}
    assert kinds == {("anat", "T1w"), ("anat", "T2w"), ("ct", "ct")}  # T1w: the demo's 3D head MRI
    for s in subjects:
        for i in s["images"]:
            assert (out / i["nifti"]).is_file() and all((out / f).is_file() for f in i["files"])
            assert i["series"].startswith("ses-") and (out / "sourcedata" / "dicom" / s["subject"] / i["series"]).is_dir()
            assert Path(i["nifti"]).name.startswith(f"{s['subject']}_ses-")
    unsorted = [u for s in subjects for u in s["unsorted"]]
    assert unsorted and all(u["modality"] == "US" and (out / u["nifti"]).is_file() for u in unsorted)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["GeneratedBy"][0]["Name"] == "deidflow"
    assert "Basic Application Level Confidentiality Profile" in desc["GeneratedBy"][0]["Description"]
    assert "**/ct" in (out / ".bidsignore").read_text()
    # two T2w series of one session with the same acquisition: repeats, run-1 and run-2
    runs = sorted(Path(i["nifti"]).name.split("_")[2] for s in subjects for i in s["images"]
                  if i["suffix"] == "T2w" and "run-" in i["nifti"])
    assert runs == ["run-1", "run-2"]


def test_sidecars_hold_no_planted_identifier(default, demo_export):
    planted = sorted((v for v in planted_identifiers(demo_export) if len(v) >= 4), key=len)
    out = default["out"]
    for p in sorted(out.rglob("*")):
        if p.is_file() and "sourcedata/dicom" not in p.as_posix() and not p.name.endswith((".nii.gz", ".png")):
            text = p.read_text(encoding="utf-8")
            rel = p.relative_to(out).as_posix()
            leaked = [v for v in planted if _word(v).search(text) or _word(v).search(rel)]
            assert not leaked, (rel, leaked[:5])
    sidecar = json.loads(next(out.glob("sub-*/ses-*/anat/*_T2w.json")).read_text())
    for gone in ("InstitutionName", "StationName", "DeviceSerialNumber", "SeriesDescription", "DeidentificationMethod"):
        assert gone not in sidecar
    assert sidecar["EchoTime"] == 0.24 and sidecar["RepetitionTime"] == 4


def test_rerun_is_idempotent(default, demo_export):
    """A second run into the finished release leaves its BIDS files as they were.  (That a second
    release with the same key has the same bytes, BIDS files included, is
    test_workflow.py::test_second_run_does_nothing_and_same_key_gives_same_bytes: the whole tree,
    with another --cores.)"""
    before = bids_hashes(default["out"])
    r = run_cli("run", str(demo_export), str(default["out"]), "--cores", "2")
    assert r.returncode == 0 and bids_hashes(default["out"]) == before


def test_bids_only_release_with_options_and_mapping(demo_export, tmp_path):
    """outputs.dicom false: the scrubbed DICOM stays in the restricted work area and is still
    converted; retain_patient_characteristics gives sex/age; a bids.mapping rule wins."""
    out = tmp_path / "release"
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", "--set", "outputs.dicom=false",
                "--set", "profile.options=[retain_patient_characteristics,clean_descriptors]", "--set", MAPPING)
    assert r.returncode == 0, r.stderr[-3000:]
    restricted = tmp_path / "release_restricted"
    assert not (out / "sourcedata" / "dicom").exists()
    assert list((restricted / "work" / "dicom").glob("sub-*/ses-*/*/0001.dcm"))
    rows = [line.split("\t") for line in (out / "participants.tsv").read_text().splitlines()]
    assert rows[0] == ["participant_id", "sex", "age"]
    assert all(r[1] in ("M", "F") and 0 < int(r[2]) <= 90 for r in rows[1:])
    pjson = json.loads((out / "participants.json").read_text())
    assert "90" in pjson["age"]["Description"]
    mapped = [i for s in markers(restricted) for i in s["images"] if i["rule"] == "bids.mapping[0]"]
    assert len(mapped) == 1 and mapped[0]["suffix"] == "T1w" and "_acq-sag_" in mapped[0]["nifti"]
    sidecar = json.loads((out / mapped[0]["nifti"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["SeriesDescription"] == "t1_se_sag"  # kept, cleaned, with clean_descriptors
    # nothing dropped: the US series went to sourcedata/unsorted as NIfTI
    assert list((out / "sourcedata" / "unsorted").glob("sub-*/ses-*/US*.nii.gz"))
    assert validator_errors(out) == []


def test_outputs_bids_false_writes_no_bids(demo_export, tmp_path):
    out = tmp_path / "release"
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", "--set", "outputs.bids=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "sourcedata" / "dicom").is_dir()
    assert not list(out.glob("sub-*")) and not (out / "dataset_description.json").exists()
    assert not (tmp_path / "release_restricted" / "done" / "convert").exists()


def test_bad_mapping_fails_before_any_job(demo_export, tmp_path):
    r = run_cli("run", str(demo_export), str(tmp_path / "release"), "--cores", "1", "--set",
                "bids.mapping=[{match: {SeriesDescription: '('}, datatype: anat, suffix: T1w}]")
    assert r.returncode != 0
    assert "bids.mapping[0]" in (r.stdout + r.stderr)
    assert not (tmp_path / "release_restricted" / "done").exists()


def test_convert_job_resumes_after_a_kill(default, tmp_path):
    """A convert job killed mid-way leaves a staging folder and a work area in the restricted
    folder; the rerun publishes exactly the bytes of an uninterrupted run and nothing partial."""
    from deidflow.bids.convert import convert_unit
    manifests = sorted((default["restricted"] / "manifests").glob("*.json"))
    dicom_root = default["out"] / "sourcedata" / "dicom"
    work_root = default["restricted"] / "work" / "bids-dicom"  # the conversion working copy (issue 20)
    release, restricted = tmp_path / "release", tmp_path / "restricted"

    def convert_all():
        for m in manifests:
            convert_unit(m, dicom_root, release, restricted, restricted / "done" / "convert" / m.name,
                         {"options": []}, {"mapping": [], "dicom_released": True}, work_root=work_root)

    convert_all()
    clean = bids_hashes(release)
    # the library gives the workflow's bytes, but for the series the face stage defaced afterwards
    # (the working copy is not defaced: it is restricted and only converted)
    treated = [i for m in (default["restricted"] / "done" / "face").glob("*.json")
               for i in json.loads(m.read_text())["images"] if i["method"] != "none"]
    assert treated  # the demo's head MRI
    folders = {i["series"].split("/")[-1] for i in treated}
    niftis = {i["nifti"] for i in treated}

    def untreated(hashes: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in hashes.items() if k.replace(".json", ".nii.gz") not in niftis
                and Path(k).name.split(".")[0] not in folders}

    workflow = {k: v for k, v in bids_hashes(default["out"]).items() if k.startswith("sub-")
                or k.startswith("sourcedata/unsorted")}
    assert untreated(clean) == untreated(workflow) and len(clean) == len(workflow)
    subject = sorted(p.name for p in release.glob("sub-*"))[0]
    stage = restricted / "tmp" / "stage-bids" / "tmp" / f".staging-{subject}"
    (stage / "ses-x" / "anat").mkdir(parents=True)
    (stage / "ses-x" / "anat" / "half.nii.gz").write_bytes(b"\x1f\x8b partial")
    (restricted / "tmp" / f"convert-{manifests[0].stem}" / "ses_junk").mkdir(parents=True)
    (release / subject / "stale_from_an_older_run.json").write_text("{}")
    convert_all()
    assert bids_hashes(release) == clean
    assert not stage.exists() and not (restricted / "tmp" / f"convert-{manifests[0].stem}").exists()


def test_dcm2niix_failure_fails_the_convert_job(default, tmp_path, monkeypatch):
    """dcm2niix failing (a full disk, a crash) is a job failure, never "not converted": the unit is
    not published, and a rerun converts it."""
    from deidflow.bids import dcm2niix
    from deidflow.bids.convert import ConvertOutputError, convert_unit

    def fail(*a, **k):
        raise dcm2niix.ConversionError("dcm2niix exited with status 134")

    monkeypatch.setattr(dcm2niix, "convert_series", fail)
    m = sorted((default["restricted"] / "manifests").glob("*.json"))[0]
    restricted = tmp_path / "restricted"
    with pytest.raises(ConvertOutputError, match="status 134"):
        convert_unit(m, default["out"] / "sourcedata" / "dicom", tmp_path / "release", restricted,
                     restricted / "done.json", {"options": []}, {"mapping": [], "dicom_released": True},
                     work_root=default["restricted"] / "work" / "bids-dicom")
    assert not (restricted / "done.json").exists()


def test_iso_2022_text_does_not_fail_the_conversion(tmp_path):
    """dcm2niix copies ISO 2022 text (Korean, Japanese) with its escape sequences into the sidecar,
    which strict JSON refuses: the convert job failed and every subject of its batch was withheld
    (found by red-team 2).  The sidecar is read leniently; the series converts."""
    import pydicom
    from pydicom.data import get_charset_files
    from deidflow.bids import dcm2niix
    series = tmp_path / "series"
    series.mkdir()
    ds = pydicom.dcmread(get_charset_files("chrI2.dcm")[0])  # ISO 2022 IR 149
    ds.SeriesDescription = "홍길동 head"
    ds.save_as(series / "0001.dcm")
    assert b"\x1b$)C" in (series / "0001.dcm").read_bytes()
    outputs = dcm2niix.convert_series(series, tmp_path / "work")
    assert len(outputs) == 1 and "SeriesDescription" in outputs[0].sidecar
