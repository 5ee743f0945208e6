"""Issue 20 on the demo export through the whole workflow: gzip-compressed DICOM input gives the
same release as the plain files; sessions.tsv / scans.tsv keep the longitudinal order without a
real date; profile.preset research; dataset_description.json fields from config; the BIDS
validator passes on every release made here."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from datetime import date
from pathlib import Path

import pydicom
import pytest

from .conftest import assert_finished
from .test_bids_workflow import run_cli, validator_errors

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def _release(inp: Path, out: Path, *extra: str) -> Path:
    r = run_cli("run", str(inp), str(out), "--cores", "2", "--set", "face.method=none", *extra)
    assert_finished(r, out)
    return out


@pytest.fixture(scope="module")
def plain(demo_export, tmp_path_factory):
    return _release(demo_export, tmp_path_factory.mktemp("opt-plain") / "release")


@pytest.fixture(scope="module")
def research(demo_export, tmp_path_factory):
    return _release(demo_export, tmp_path_factory.mktemp("opt-research") / "release",
                    "--set", "profile.preset=research", "--set", 'bids.authors=["A. Researcher", "B. Scientist"]',
                    "--set", "bids.license=CC0", "--set", "bids.acknowledgements=Thanks to the participants")


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _original_dates(inp: Path) -> set[str]:
    out = set()
    for f in inp.rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate"):
                v = str(ds.get(kw) or "")
                if re.fullmatch(r"\d{8}", v):
                    out.add(f"{v[:4]}-{v[4:6]}-{v[6:]}")
                    out.add(v)
    return out


def test_gzipped_dicom_gives_the_same_release(demo_export, plain, tmp_path):
    gz_in = tmp_path / "gz-input"
    for f in sorted(p for p in demo_export.rglob("*") if p.is_file()):
        dst = gz_in / f.relative_to(demo_export)
        dst = dst.with_name(dst.name + ".gz")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as fin, gzip.GzipFile(dst, "wb", mtime=0) as out:
            shutil.copyfileobj(fin, out)
    out = _release(gz_in, tmp_path / "release")
    a, b = _hashes(plain), _hashes(out)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not [p for p in out.rglob("*.gz") if not p.name.endswith(".nii.gz")]  # released DICOM is plain
    assert (out.with_name("release_restricted") / "quarantine.tsv").read_text().count("\n") <= 1


def test_sessions_and_scans_keep_order_without_dates(plain, demo_export):
    """Basic profile: days between sessions (an interval), no acq_time, no date anywhere."""
    sessions = sorted(plain.glob("sub-*/sub-*_sessions.tsv"))
    subjects = [d for d in plain.glob("sub-*") if d.is_dir()]
    assert sessions and len(sessions) == len(subjects)
    offsets = []
    for s in sessions:
        rows = [line.split("\t") for line in s.read_text().splitlines()]
        assert rows[0] == ["session_id", "days_from_first_session"]
        days = [int(r[1]) for r in rows[1:]]
        assert min(days) == 0
        offsets += days
        for ses in plain.joinpath(s.parent.name).glob("ses-*"):
            scans = ses / f"{s.parent.name}_{ses.name}_scans.tsv"
            lines = scans.read_text().splitlines()
            assert lines[0] == "filename"
            listed = sorted(lines[1:])
            assert listed == sorted(p.relative_to(ses).as_posix() for p in ses.glob("*/*.nii.gz"))
    # the demo patient with two MR studies 108 days apart (2021-09-22, 2022-01-08)
    assert (date(2022, 1, 8) - date(2021, 9, 22)).days in offsets
    text = "".join(p.read_text() for p in plain.rglob("*.tsv"))
    assert not re.search(r"\d{4}-\d{2}-\d{2}|(19|20)\d{6}", text)


def test_research_preset_scans_acq_time_is_shifted(research, demo_export):
    originals = _original_dates(demo_export)
    scans = sorted(research.glob("sub-*/ses-*/*_scans.tsv"))
    assert scans
    times = []
    for s in scans:
        lines = [line.split("\t") for line in s.read_text().splitlines()]
        assert lines[0] == ["filename", "acq_time"]
        for name, t in lines[1:]:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", t), t
            assert t[:10] not in originals and t[:10].replace("-", "") not in originals
            times.append(t)
        assert (s.parent / s.name.replace(".tsv", ".json")).is_file()
    assert times
    run = json.loads((research.with_name("release_restricted") / "run.json").read_text())
    settings = run.get("settings", run)
    assert "retain_long_modified_dates" in json.dumps(settings) and '"safe"' in json.dumps(settings)


def test_dataset_description_from_config(research, plain):
    desc = json.loads((research / "dataset_description.json").read_text())
    assert desc["Authors"] == ["A. Researcher", "B. Scientist"]
    assert desc["License"] == "CC0" and desc["Acknowledgements"] == "Thanks to the participants"
    assert "Authors" not in json.loads((plain / "dataset_description.json").read_text())


@pytest.mark.parametrize("which", ["plain", "research"])
def test_releases_pass_bids_validator(which, request):
    assert validator_errors(request.getfixturevalue(which)) == []
