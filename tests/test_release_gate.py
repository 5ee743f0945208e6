"""The release gate (issue 14): a subject reaches the release only finished, defaced and leak-free.

Every per-unit stage works in <restricted>/staging/<unit>/; a publish job moves each verified
subject's folders into the release. These tests run `deidflow run` end to end on the demo export.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from .conftest import ROOT, TEST_KEY

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
NO_FACES = ("--set", "face.method=none")
MARKER = "RELEASE_INCOMPLETE"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    env["DEIDFLOW_KEY"] = TEST_KEY
    env.update(extra)
    return env


def run_cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deidflow.cli", *args], env=_env(**extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def _subjects(restricted: Path) -> dict[str, str]:
    with open(restricted / "mapping" / "patients.csv") as fh:
        return {row["id_old"]: row["id_new"] for row in csv.DictReader(fh)}


# ------------------------------------------------------------------------------------------------
# Folders a run must refuse before writing anything
# ------------------------------------------------------------------------------------------------
def _assert_refused(r: subprocess.CompletedProcess, *paths: Path, words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deidflow: error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_foreign_output_folder_refused(demo_export, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's files")
    r = run_cli("run", str(demo_export), str(out), *NO_FACES)
    _assert_refused(r, words="no deidflow run wrote it")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "shared_restricted").exists()


def test_force_sets_foreign_files_aside(demo_export, tmp_path):
    """With --force the run uses the folder, but files no deidflow stage wrote (they were never
    leak-scanned; their names may identify someone) leave the release for the restricted folder;
    so does a file dropped into a finished release before the next run that publishes."""
    out = tmp_path / "shared"
    (out / "Quintero_Zachariah").mkdir(parents=True)
    (out / "Quintero_Zachariah" / "RX1000004.txt").write_text("Patient Zachariah Quintero RX1000004")
    (out / "notes.txt").write_text("Patient Zachariah Quintero DOB 1970-01-01")
    # inside the folders deidflow writes itself: its QC folder holds only the report and sub-X/
    qc = out / "derivatives" / "deidflow" / "qc"
    qc.mkdir(parents=True)
    (qc / "Quintero.html").write_text("<p>Zachariah Quintero, RX1000004</p>")
    (qc.parent / "notes.txt").write_text("Patient Zachariah Quintero RX1000004")
    r = run_cli("run", str(demo_export), str(out), "--force", *NO_FACES)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    restricted = tmp_path / "shared_restricted"
    assert not (out / "notes.txt").exists() and not (out / "Quintero_Zachariah").exists()
    assert (restricted / "foreign" / "notes.txt").is_file()
    assert (restricted / "foreign" / "Quintero_Zachariah" / "RX1000004.txt").is_file()
    assert (restricted / "foreign" / "derivatives" / "deidflow" / "qc" / "Quintero.html").is_file()
    assert (restricted / "foreign" / "derivatives" / "deidflow" / "notes.txt").is_file()
    assert not any("Quintero" in p.as_posix() for p in out.rglob("*"))
    assert not [p for p in out.rglob("*") if p.is_file() and b"Quintero" in p.read_bytes()]
    dropped = next((out / "sourcedata").iterdir()) / "later.txt"
    dropped.write_text("added by hand")
    r = run_cli("run", str(demo_export), str(out), *NO_FACES, "--set", "bids.name=another name")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert not dropped.exists()
    assert (restricted / "foreign" / dropped.relative_to(out)).is_file()


def test_empty_and_unrecognised_input_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("run", str(empty), str(tmp_path / "rel"))
    _assert_refused(r, words="is empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("not an image")
    r = run_cli("run", str(junk), str(tmp_path / "rel"))
    _assert_refused(r, words="recognises")
    assert not (tmp_path / "rel").exists() and not (tmp_path / "rel_restricted").exists()


def test_output_inside_input_refused(demo_export, tmp_path):
    inp = tmp_path / "input"
    shutil.copytree(demo_export, inp)
    before = sorted(p.relative_to(inp) for p in inp.rglob("*"))
    r = run_cli("run", str(inp), str(inp / "release"), *NO_FACES)
    _assert_refused(r, words="must not be inside")
    assert sorted(p.relative_to(inp) for p in inp.rglob("*")) == before


# ------------------------------------------------------------------------------------------------
# Leaks: withhold, fail
# ------------------------------------------------------------------------------------------------
# Every demo subject in one job unit, so the unit's leak scan knows each subject's values.
ONE_UNIT = ("--set", "jobs.min_batches=1")


def _plant(inp: Path, what: str = "id") -> tuple[str, str]:
    """One patient's ID (Erika Mustermann's) in an attribute the profile keeps (Sequence Name,
    (0018,0024)) of ANOTHER patient's file, as a mis-filed comparison study would carry it; or
    (``what="name"``) her name written whole, as a report or a protocol note would (Manufacturer's
    Model Name, kept). The engine's residual sweep removes the file owner's own values; another
    patient's value is for the leak scan to find. Returns (the file owner's PatientID, the planted
    value)."""
    source = pydicom.dcmread(next(sorted(p for p in inp.iterdir() if p.name.startswith("MUSTERMANN"))[0]
                                  .rglob("*.dcm")))
    family, given = str(source.PatientName).split("^")[:2]
    planted = str(source.PatientID) if what == "id" else f"{given.title()} {family.title()}"
    for folder in sorted(p for p in inp.iterdir() if p.is_dir() and not p.name.startswith("MUSTERMANN")):
        files = sorted(folder.rglob("*.dcm"))
        if files:
            ds = pydicom.dcmread(files[0])
            if what == "id":
                ds.SequenceName = f"*tfl3d1_{planted}"
            else:
                ds.ManufacturerModelName = f"Avanto (comparison: {planted})"
            ds.save_as(files[0])
            return str(ds.PatientID), planted
    raise AssertionError("no second DICOM patient in the demo")


def test_other_units_patient_name_in_a_kept_description_withholds_the_subject(tmp_path):
    """Mueller's series comment names another patient ("compare prior of OKAFOR, CHIDI"), a
    mis-filed comparison study; each patient is a job unit of its own.  The unit scan searched the
    other units' IDs only, and the name was released with exit 0 (found by red-team 2).  Other
    subjects' names are searched in their multi-word forms (a single name word of thousands of
    patients would be found everywhere)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    inp = tmp_path / "input"
    inp.mkdir()
    for name, pid, comment in (("Okafor^Chidi", "MRN1111111", "follow-up"),
                               ("Mueller^Hans", "MRN2222222", "compare prior of OKAFOR, CHIDI")):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PatientName, ds.PatientID, ds.ImageComments = name, pid, comment
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.save_as(inp / f"{pid}.dcm")
    out = tmp_path / "rel"
    r = run_cli("run", str(inp), str(out), *NO_FACES, "--set", "jobs.files_per_job=0",
                "--set", "profile.options=[clean_descriptors]", "--set", "outputs.bids=false")
    assert r.returncode == 3, r.stderr[-3000:]
    subjects = _subjects(tmp_path / "rel_restricted")
    assert (out / "sourcedata" / "dicom" / subjects["MRN1111111"]).is_dir()
    assert not (out / "sourcedata" / "dicom" / subjects["MRN2222222"]).exists()
    assert b"OKAFOR" not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())


def _release_bytes(out: Path) -> dict[str, str]:
    """The release's files and their hashes, less the QC report (it tells the run's history)."""
    qc = out / "derivatives" / "deidflow" / "qc"
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*") if p.is_file() and qc not in p.parents}


@pytest.mark.parametrize("on_leak", ["withhold", "publish"])
def test_subject_published_earlier_is_withdrawn_when_a_later_delivery_adds_the_patient_it_names(tmp_path, on_leak):
    """Mueller's series comment names OKAFOR, CHIDI, who is not in the first delivery: nobody's
    value, Mueller is published (exit 0).  The second delivery adds Okafor.  Mueller's unit did
    not run again, so its scan never searched Okafor's name and the note stayed released with
    exit 0.  The dataset gate scans the subjects published earlier against the values of those
    added since: Mueller is taken out (audit: withdrawn.tsv), the run exits 3, and the release
    equals one made from both deliveries at once; the next run withholds Mueller from its unit."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    inp = tmp_path / "input"
    inp.mkdir()

    def deliver(name: str, pid: str, comment: str) -> None:
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PatientName, ds.PatientID, ds.ImageComments = name, pid, comment
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.save_as(inp / f"{pid}.dcm")

    args = (*NO_FACES, "--set", "jobs.files_per_job=0", "--set", "profile.options=[clean_descriptors]",
            "--set", "outputs.bids=false", "--set", f"verify.on_leak={on_leak}")
    deliver("Mueller^Hans", "MRN2222222", "compare prior of OKAFOR, CHIDI")
    out, restricted = tmp_path / "rel", tmp_path / "rel_restricted"
    r = run_cli("run", str(inp), str(out), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    mueller = _subjects(restricted)["MRN2222222"]
    assert (out / "sourcedata" / "dicom" / mueller).is_dir()
    deliver("Okafor^Chidi", "MRN1111111", "follow-up")
    r = run_cli("run", str(inp), str(out), *args)
    assert r.returncode == 3, r.stdout + r.stderr[-3000:]
    okafor = _subjects(restricted)["MRN1111111"]
    assert (out / "sourcedata" / "dicom" / okafor).is_dir()
    if on_leak == "publish":  # left in, and the run says so
        assert (out / "sourcedata" / "dicom" / mueller).is_dir()
        assert json.loads((restricted / "release-status.json").read_text())["published_with_leaks"] == [mueller]
        return
    assert not (out / "sourcedata" / "dicom" / mueller).exists(), "the earlier subject stayed released"
    assert b"OKAFOR" not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert f"{mueller} withheld" in r.stderr and "ImageComments" in r.stderr, r.stderr[-3000:]
    assert mueller in (restricted / "withdrawn.tsv").read_text()
    assert json.loads((restricted / "release-status.json").read_text())["withheld_subjects"] == [mueller]
    page = (out / "derivatives" / "deidflow" / "qc" / "report.html").read_text()
    released = re.search(r"<b[^>]*>(\d+)</b><span>files released</span>", page)
    qc = out / "derivatives" / "deidflow" / "qc"
    assert released and int(released.group(1)) == sum(1 for p in out.rglob("*") if p.is_file() and qc not in p.parents)
    from deidflow.qc.report import build
    per = build(out, restricted, on_leak=on_leak)["per"][mueller]["verify"]
    assert per["status"] == "leak" and any("ImageComments" in h["location"] for h in per["hits"])
    second = _release_bytes(out)
    r = run_cli("run", str(inp), str(out), *args)  # the next run: Mueller's unit runs again and withholds him
    assert r.returncode == 3 and f"{mueller} withheld" in r.stderr, r.stderr[-3000:]
    assert _release_bytes(out) == second
    once = tmp_path / "once"
    r = run_cli("run", str(inp), str(once), *args)
    assert r.returncode == 3 and _release_bytes(once) == second


def test_subject_published_earlier_is_scanned_once_for_each_added_subject(tmp_path, monkeypatch):
    """A clean rescan is recorded: the next run that changes something does not read the earlier
    subjects' files again for the same added subjects, only for those added since."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from deidflow.qc import leakscan
    inp = tmp_path / "input"
    inp.mkdir()
    for name, pid in (("Mueller^Hans", "MRN2222222"), ("Okafor^Chidi", "MRN1111111"), ("Nowak^Ewa", "MRN3333333")):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PatientName, ds.PatientID = name, pid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.save_as(tmp_path / f"{pid}.dcm")
    args = (*NO_FACES, "--set", "jobs.files_per_job=0", "--set", "outputs.bids=false")
    out, restricted = tmp_path / "rel", tmp_path / "rel_restricted"
    shutil.copy(tmp_path / "MRN2222222.dcm", inp)
    assert run_cli("run", str(inp), str(out), *args).returncode == 0
    shutil.copy(tmp_path / "MRN1111111.dcm", inp)
    assert run_cli("run", str(inp), str(out), *args).returncode == 0
    subjects = _subjects(restricted)
    mueller, okafor = subjects["MRN2222222"], subjects["MRN1111111"]
    later = restricted / "work" / mueller / leakscan.SEARCHED_LATER
    assert later.read_text().split() == [okafor] and later.stat().st_mode & 0o777 == 0o600
    scanned = []
    real = leakscan.scan_file
    monkeypatch.setattr(leakscan, "scan_file", lambda f, *a, **k: (scanned.append(f), real(f, *a, **k))[1])
    assert leakscan.late_subject_scan(out, restricted, [mueller, okafor]) == {} and scanned == []
    shutil.copy(tmp_path / "MRN3333333.dcm", inp)
    assert run_cli("run", str(inp), str(out), *args).returncode == 0
    nowak = _subjects(restricted)["MRN3333333"]
    assert later.read_text().split() == sorted([okafor, nowak])
    assert (restricted / "work" / okafor / leakscan.SEARCHED_LATER).read_text().split() == [nowak]


def test_planted_identifier_withholds_subject(demo_export, tmp_path):
    inp = tmp_path / "input"
    shutil.copytree(demo_export, inp)
    pid, planted = _plant(inp)
    out = tmp_path / "rel"
    r = run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES, *ONE_UNIT)
    assert r.returncode == 3, r.stderr[-3000:]
    restricted = tmp_path / "rel_restricted"
    subject = _subjects(restricted)[pid]
    others = set(_subjects(restricted).values()) - {subject}
    # withheld: nothing of it in the release, participants.tsv without it; the others are there
    assert not list(out.rglob(f"{subject}*"))
    assert subject not in (out / "participants.tsv").read_text()
    assert others and all((out / "sourcedata" / "dicom" / s).is_dir() for s in others)
    # terminal, quarantine.tsv, withheld.json name the attribute path, never the value
    assert f"{subject} withheld" in r.stderr and "SequenceName" in r.stderr, r.stderr
    assert planted not in r.stderr and planted not in r.stdout
    q = (restricted / "quarantine.tsv").read_text()
    assert f"subject {subject} withheld" in q and "SequenceName" in q
    assert planted not in "".join(line.split("\t", 1)[1] for line in q.splitlines()[1:])  # reasons: no value
    withheld = json.loads((restricted / "withheld.json").read_text())["withheld"]
    assert list(withheld) == [subject] and any("SequenceName" in h["location"] for h in withheld[subject])
    assert planted not in (restricted / "withheld.json").read_text()
    assert not (out / MARKER).exists()
    status = json.loads((restricted / "release-status.json").read_text())
    assert status["withheld_subjects"] == [subject]
    # (the QC report's leak-scan table shows the staged file names of the hits, which can carry
    # the value itself, e.g. a BIDS acq- entity made from the planted SequenceName: qc/report.py)
    # `deidflow verify` on the release: clean, but it says what was withheld (exit 3)
    v = run_cli("verify", str(out))
    assert v.returncode == 3 and f"{subject} withheld" in v.stdout, v.stdout + v.stderr
    # a run whose leak scan fails the run
    out2 = tmp_path / "rel2"
    r = run_cli("run", str(inp), str(out2), "--cores", "2", *NO_FACES, *ONE_UNIT, "--set", "verify.on_leak=fail")
    assert r.returncode == 3  # a failed job: the release is incomplete (README, exit statuses)
    assert "leak scan" in r.stderr
    assert (out2 / MARKER).exists()
    assert not list(out2.rglob(f"{subject}*"))


@pytest.mark.parametrize("what", ["id", "name"])
def test_identifier_of_a_subject_in_another_unit_withholds_subject(demo_export, tmp_path, what):
    """One job unit per subject: the unit holding the planted MRN or name knows only its own
    subjects' values from their identifier files, and every other subject's IDs and whole names
    from the inventory."""
    inp = tmp_path / "input"
    shutil.copytree(demo_export, inp)
    pid, planted = _plant(inp, what)
    out = tmp_path / "rel"
    r = run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES, "--set", "jobs.files_per_job=0")
    assert r.returncode == 3, r.stderr[-3000:]
    restricted = tmp_path / "rel_restricted"
    subject = _subjects(restricted)[pid]
    assert not list(out.rglob(f"{subject}*")) and f"{subject} withheld" in r.stderr
    assert planted not in r.stderr + r.stdout
    assert list(json.loads((restricted / "withheld.json").read_text())["withheld"]) == [subject]
    others = set(_subjects(restricted).values()) - {subject}
    assert others and all((out / "sourcedata" / "dicom" / s).is_dir() for s in others)


def test_on_leak_publish_warns(demo_export, tmp_path):
    inp = tmp_path / "input"
    shutil.copytree(demo_export, inp)
    pid, _ = _plant(inp)
    out = tmp_path / "rel"
    r = run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES, *ONE_UNIT, "--set", "verify.on_leak=publish")
    assert r.returncode == 3, r.stderr[-2000:]
    subject = _subjects(tmp_path / "rel_restricted")[pid]
    assert (out / "sourcedata" / "dicom" / subject).is_dir()
    assert "WARNING" in r.stderr and subject in r.stderr and "not de-identified" in r.stderr


# ------------------------------------------------------------------------------------------------
# Dataset-level files and the QC report
# ------------------------------------------------------------------------------------------------
def _dataset_gate_folders(tmp_path: Path, hits: list) -> tuple[Path, Path, Path, Path, Path]:
    """A staged participants.tsv, a staged QC report, the verify_dataset record with ``hits``."""
    staged, report_dir, release, restricted = (tmp_path / n for n in ("staged", "qc", "rel", "rel_restricted"))
    for d in (staged, report_dir, release, restricted / "work"):
        d.mkdir(parents=True)
    (staged / "participants.tsv").write_text("participant_id\tnote\nsub-A\tErika Mustermann\n")
    from deidflow.publish import REPORT_FILES
    for name in REPORT_FILES:
        (report_dir / name).write_text("<html>report</html>\n" if name == "report.html" else "checked\n")
    (restricted / "work" / "subjects.txt").write_text("sub-A\n")
    verify = restricted / "verify_dataset.json"
    verify.write_text(json.dumps({"files": 1, "hits": hits}))
    return staged, report_dir, release, restricted, verify


@pytest.mark.parametrize("on_leak", ["withhold", "publish"])
def test_dataset_level_leak_keeps_dataset_files_staged(tmp_path, on_leak):
    """A leak-scan hit in a staged dataset-level file keeps every dataset-level file out of the
    release (verify.on_leak withhold); the QC report, checked on its own, is published."""
    from deidflow.publish import REPORT_FILES, publish_dataset
    hit = {"file": "participants.tsv", "location": "line 2", "owner": "sub-A", "field": "PatientName"}
    staged, report_dir, release, restricted, verify = _dataset_gate_folders(tmp_path, [hit])
    (report_dir / "unchecked.html").write_text("not written by the dataset gate\n")
    c = publish_dataset(staged, release, restricted, restricted / "work" / "subjects.txt", restricted / "done.json",
                        verify=verify, report_dir=report_dir, on_leak=on_leak)
    qc = release / "derivatives" / "deidflow" / "qc"
    assert (qc / "report.html").read_text() == "<html>report</html>\n" and (report_dir / "report.html").exists()
    assert sorted(p.name for p in qc.iterdir()) == sorted(REPORT_FILES)  # only the report's own files
    record = json.loads((restricted / "done.json").read_text())
    if on_leak == "withhold":
        assert c["withheld"] == 1 and c["files"] == 0
        assert not (release / "participants.tsv").exists() and (staged / "participants.tsv").exists()
        assert record["withheld"] == ["participants.tsv"] and record["files"] == []
    else:
        assert c["withheld"] == 0 and (release / "participants.tsv").exists()


def test_dataset_gate_writes_no_temporary_file_into_the_release(tmp_path, monkeypatch):
    """The dataset-level files, the QC report and the RELEASE_INCOMPLETE marker are written
    through a temporary file outside the release and one rename: a reader of the release (the
    kill test's watcher, an rsync to the recipients) never sees a half-written ``.part`` file."""
    import deidflow.fsutil as fsutil
    from deidflow.publish import mark_incomplete, publish_dataset
    staged, report_dir, release, restricted, verify = _dataset_gate_folders(tmp_path, [])
    renames = []
    real = os.replace
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real(a, b))[1])
    mark_incomplete(release, restricted)
    publish_dataset(staged, release, restricted, restricted / "work" / "subjects.txt", restricted / "done.json",
                    verify=verify, report_dir=report_dir)
    into = [(a, b) for a, b in renames if release in b.parents]
    assert {b.relative_to(release).as_posix() for _a, b in into} >= {MARKER, "participants.tsv",
                                                                      "derivatives/deidflow/qc/report.html"}
    assert not [a for a, _b in into if release in a.parents], "a temporary file was made inside the release"
    assert sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()) == sorted(
        b.relative_to(release).as_posix() for _a, b in into)


def test_withheld_dataset_files_take_the_published_ones_out(tmp_path):
    """Dataset-level files withheld by the gate leave no earlier copy behind: the previous run's
    participants.tsv still listed a subject withdrawn since (its folders leave in the same job).
    The release is incomplete: the run's status and `deidflow verify` say so (exit 3)."""
    from deidflow.errors import EXIT_INCOMPLETE
    from deidflow.publish import finalize, publish_dataset, release_status
    hit = {"file": "participants.tsv", "location": "line 2", "owner": "sub-A", "field": "PatientName"}
    staged, report_dir, release, restricted, verify = _dataset_gate_folders(tmp_path, [hit])
    (release / "participants.tsv").write_text("participant_id\nsub-A\nsub-B\n")  # the previous run's
    (release / "sub-B" / "anat").mkdir(parents=True)
    (release / "sub-B" / "anat" / "sub-B_T1w.json").write_text("{}")
    publish_dataset(staged, release, restricted, restricted / "work" / "subjects.txt", restricted / "done" /
                    "publish_dataset.json", verify=verify, report_dir=report_dir, on_leak="withhold")
    assert not (release / "sub-B").exists()
    assert not [p for p in release.rglob("*") if p.is_file() and b"sub-B" in p.read_bytes()]
    assert (staged / "participants.tsv").exists()
    finalize(release, restricted, [])
    status = release_status(release, restricted)
    assert status["exit"] == EXIT_INCOMPLETE
    assert any("dataset-level" in line for line in status["lines"]), status["lines"]


def test_dataset_name_naming_a_patient_is_withheld(demo_export, tmp_path):
    """A data holder names the dataset after a patient (bids.name reaches dataset_description.json
    and README): the dataset gate finds it, keeps the dataset-level files out of the release, and
    the QC report (whose run record shows the settings) withholds that setting and is published.
    Exit 3, and the terminal says why; the value is printed nowhere."""
    patient = next(p for p in sorted(demo_export.iterdir()) if p.name.startswith("MUSTERMANN"))
    pid = str(pydicom.dcmread(next(patient.rglob("*.dcm")), stop_before_pixels=True).PatientID)
    out = tmp_path / "rel"
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", *NO_FACES, "--set", f"bids.name=Cohort {pid}")
    assert r.returncode == 3, r.stdout + r.stderr[-3000:]
    assert "LEAK in dataset" in r.stdout and "dataset-level file(s)" in r.stderr, r.stdout + r.stderr
    assert pid not in r.stdout + r.stderr
    assert not (out / "dataset_description.json").exists() and not (out / "README").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and pid.encode() in p.read_bytes()]
    page = (out / "derivatives" / "deidflow" / "qc" / "report.html").read_text()
    assert "value withheld" in page and not (out / MARKER).exists()
    released = re.search(r"<b[^>]*>(\d+)</b><span>files released</span>", page)
    qc = out / "derivatives" / "deidflow" / "qc"
    assert released and int(released.group(1)) == sum(1 for p in out.rglob("*") if p.is_file() and qc not in p.parents)
    assert "(+0 dataset files)" in r.stdout, r.stdout  # none published
    assert run_cli("verify", str(out)).returncode == 3


def test_dataset_level_names_are_foreign_unless_deidflow_writes_them(tmp_path):
    """A README or participants.tsv at the root of a folder used with --force is someone else's
    unless this run's bids_dataset job writes that file (with outputs.bids false it writes none):
    it leaves the release like any foreign file, never scanned as it is."""
    from deidflow.publish import publish_dataset
    staged, report_dir, release, restricted, verify = _dataset_gate_folders(tmp_path, [])
    (staged / "participants.tsv").unlink()
    for name in ("README", "participants.tsv"):
        (release / name).write_text("Patient Erika Mustermann, MRN 66448162\n")
    args = (staged, release, restricted, restricted / "work" / "subjects.txt", restricted / "done" / "pd.json")
    publish_dataset(*args, verify=verify, report_dir=report_dir)
    assert not (release / "README").exists() and not (release / "participants.tsv").exists()
    assert (restricted / "foreign" / "README").is_file() and (restricted / "foreign" / "participants.tsv").is_file()
    (restricted / "done" / "bids_dataset.json").write_text(json.dumps({"files": ["README"], "participants": 1}))
    (release / "README").write_text("# De-identified imaging dataset\n")  # an earlier run's, published
    publish_dataset(*args, verify=verify, report_dir=report_dir)
    assert (release / "README").is_file()


def test_dataset_gate_refuses_without_a_staged_report(tmp_path):
    from deidflow.errors import PublicError
    from deidflow.publish import publish_dataset
    staged, report_dir, release, restricted, verify = _dataset_gate_folders(tmp_path, [])
    (report_dir / "report.html").unlink()
    with pytest.raises(PublicError, match="QC report is not in the staging area"):
        publish_dataset(staged, release, restricted, restricted / "work" / "subjects.txt", restricted / "done.json",
                        verify=verify, report_dir=report_dir)
    assert not (release / "participants.tsv").exists()


def test_deleted_parts_of_the_release_come_back_unchanged(demo_export, tmp_path):
    """What is deleted from a finished release (the QC report, a dataset-level file, a subject's
    folder, the whole release with its restricted folder kept) is published again by the next
    run, byte for byte, and the run says so by its exit status only when something is withheld;
    before, a deleted release gave "Nothing to be done", exit 0 and an empty release."""
    out = tmp_path / "rel"
    restricted = tmp_path / "rel_restricted"
    assert run_cli("run", str(demo_export), str(out), "--cores", "2", *NO_FACES).returncode == 0
    final = hashes(out)
    qc = out / "derivatives" / "deidflow" / "qc"
    assert {"report.html", "files_per_modality.svg", "actions_per_attribute.svg", "subjects.tsv"} <= {
        p.name for p in qc.iterdir()}
    gate = restricted / "done" / "verify_dataset.json"
    scanned = gate.stat().st_mtime_ns
    # the report and participants.tsv: copied again from their staging areas, no new scan
    (qc / "report.html").unlink()
    (out / "participants.tsv").unlink()
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", *NO_FACES)
    assert r.returncode == 0, r.stderr[-3000:]
    assert hashes(out) == final and gate.stat().st_mtime_ns == scanned
    # one subject's folder: its unit runs again from its first stage
    subject = sorted(_subjects(restricted).values())[0]
    shutil.rmtree(out / "sourcedata" / "dicom" / subject)
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", *NO_FACES)
    assert r.returncode == 0, r.stderr[-3000:]
    assert hashes(out) == final
    # the whole release
    shutil.rmtree(out)
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", *NO_FACES)
    assert r.returncode == 0, r.stderr[-3000:]
    assert hashes(out) == final and not (out / MARKER).exists()
    # nothing deleted: nothing to do
    r = run_cli("run", str(demo_export), str(out), "--cores", "2", *NO_FACES)
    assert r.returncode == 0 and hashes(out) == final


# ------------------------------------------------------------------------------------------------
# Withdrawal
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("units", ["batches", "one per subject"])
def test_withdrawn_subject_leaves_release(demo_export, tmp_path, units):
    """DOE's ultrasound has burned-in text (a QC picture of the cleaned frame): the QC report,
    rendered while the withdrawn subject's folders are still in the release, must not show it,
    its pseudonym or its records (a unit of its own leaves a stale leak-scan record behind)."""
    inp = tmp_path / "input"
    shutil.copytree(demo_export, inp)
    out = tmp_path / "rel"
    restricted = tmp_path / "rel_restricted"
    per_unit = ("--set", "jobs.files_per_job=0") if units == "one per subject" else ()
    assert run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES, *per_unit).returncode == 0
    gone_folder = sorted(p for p in inp.iterdir() if p.name.startswith("DOE"))[0]
    pid = pydicom.dcmread(sorted(gone_folder.rglob("*.dcm"))[0], stop_before_pixels=True).PatientID
    subject = _subjects(restricted)[pid]
    assert (out / subject).is_dir() or (out / "sourcedata" / "dicom" / subject).is_dir()
    assert subject.encode() in (out / "derivatives" / "deidflow" / "qc" / "report.html").read_bytes()
    shutil.rmtree(gone_folder)
    r = run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES, *per_unit)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.rglob(f"*{subject}*")), "withdrawn subject still in the release"
    assert subject not in (out / "participants.tsv").read_text()
    named = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and subject.encode() in p.read_bytes()]
    assert not named, f"the withdrawn subject is named in {named}"
    assert "leak scan:   4 subjects" in r.stdout, r.stdout
    v = run_cli("verify", str(out))
    assert v.returncode == 0 and "deidflow verify: 4 subjects" in v.stdout, v.stdout  # not the withdrawn one
    with open(restricted / "mapping" / "patients.csv") as fh:
        rows = {row["id_new"]: row for row in csv.DictReader(fh)}
    assert rows[subject]["withdrawn"] and rows[subject]["id_old"] == pid  # kept, flagged with a date
    assert all(not r["withdrawn"] for s, r in rows.items() if s != subject)
    audit = (restricted / "withdrawn.tsv").read_text().splitlines()
    assert audit[0].split("\t") == ["date", "subject", "folders_removed"] and audit[1].split("\t")[1] == subject
    assert (restricted / "withdrawn.tsv").stat().st_mode & 0o777 == 0o600
    validator = Path(sys.executable).with_name("bids-validator-deno")
    if not validator.exists():
        pytest.skip("bids-validator-deno is not installed")
    v = subprocess.run([str(validator), str(out), "--json"], capture_output=True, text=True, timeout=600)
    issues = json.loads(v.stdout)["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    assert not errors, errors[:3]


# ------------------------------------------------------------------------------------------------
# Kill safety: a watcher samples the release every 50 ms while runs are killed at ten points
# ------------------------------------------------------------------------------------------------
class Watcher(threading.Thread):
    """Samples the release every 50 ms: every file must be one of the finished release's files,
    byte for byte (so: of a finished subject, defaced, leak-scanned), and a release that is not
    the finished one must carry the RELEASE_INCOMPLETE marker."""

    def __init__(self, release: Path, final: dict[str, str]):
        super().__init__(daemon=True)
        self.release, self.final = release, final
        self.stop = threading.Event()
        self.samples = 0
        self.bad: list[str] = []
        self._cache: dict[tuple, str] = {}

    def _hash(self, p: Path) -> str | None:
        try:
            st = p.stat()
            key = (str(p), st.st_ino, st.st_mtime_ns, st.st_size)
            if key not in self._cache:
                self._cache[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            return self._cache[key]
        except FileNotFoundError:
            return None                         # renamed away while sampled

    def run(self) -> None:
        while not self.stop.is_set():
            seen = {}
            for dirpath, _dirs, files in os.walk(self.release):
                for name in files:
                    p = Path(dirpath) / name
                    rel = p.relative_to(self.release).as_posix()
                    if name == MARKER:
                        seen[rel] = "marker"
                        continue
                    h = self._hash(p)
                    if h is None:
                        continue
                    seen[rel] = h
                    if self.final.get(rel) != h:
                        self.bad.append(f"sample {self.samples}: {rel} is not the finished file")
            files = {k: v for k, v in seen.items() if k != MARKER}
            if files and MARKER not in seen and files != self.final:
                self.bad.append(f"sample {self.samples}: unfinished release without {MARKER}")
            self.samples += 1
            time.sleep(0.05)


KILL_POINTS = [
    ("convert", signal.SIGKILL),          # after dicom
    ("face", signal.SIGKILL),             # after convert
    ("face-mid", signal.SIGKILL),         # inside face
    ("verify", signal.SIGKILL),           # after face, the leak scan starting
    ("publish", signal.SIGKILL),          # leak scan done
    ("publish-mid", signal.SIGKILL),      # during publishing (a unit's first folder moved)
    ("publish_dataset", signal.SIGKILL),  # units published, dataset files next
    ("face-mid", signal.SIGINT),
    ("verify", signal.SIGINT),
    ("publish-mid", signal.SIGINT),
    ("verify_dataset", signal.SIGINT),    # units published, the dataset scan and report under way
]


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory):
    """Two demo patients, one with the T1w head MRI the face stage defaces."""
    from deidflow.demo import make_demo_input
    full = tmp_path_factory.mktemp("kill") / "full"
    make_demo_input(full)
    inp = full.parent / "input"
    inp.mkdir()
    for d in sorted(full.iterdir()):
        if d.name.startswith(("Ødegård", "DOE")):
            shutil.copytree(d, inp / d.name)
    base = full.parent / "baseline"
    r = run_cli("run", str(inp), str(base), "--cores", "2", "--set", "jobs.files_per_job=0")
    assert r.returncode == 0, r.stderr[-3000:]
    final = hashes(base)
    assert any("_T1w.nii.gz" in k for k in final), "the demo head MRI did not reach BIDS"
    return inp, final


def _pause_point(point: str) -> str:
    """face-mid: the face job is killed while it works (after it started, before it is done)."""
    return "face" if point == "face-mid" else point


@pytest.mark.parametrize("point,sig", KILL_POINTS, ids=[f"{p}-{s.name}" for p, s in KILL_POINTS])
def test_killed_run_never_exposes_unfinished_subject(kill_input, tmp_path, point, sig):
    inp, final = kill_input
    out = tmp_path / "rel"
    flags = tmp_path / "flags"
    flags.mkdir()
    watcher = Watcher(out, final)
    watcher.start()
    args = [sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
            "--set", "jobs.files_per_job=0"]
    env = _env()
    if point != "face-mid":
        env["DEIDFLOW_TEST_PAUSE_AT"] = f"{_pause_point(point)}:{flags}"
    log = open(tmp_path / "run.log", "wb")  # a pipe nobody reads would block the run once full
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        if point == "face-mid":
            log_dir = tmp_path / "rel_restricted" / "logs" / "face"
            while time.time() < deadline and not any(log_dir.glob("*.log")) and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(1.0)                 # well inside the defacing of the head
        else:
            while time.time() < deadline and not (flags / _pause_point(point)).exists() and proc.poll() is None:
                time.sleep(0.05)
            assert (flags / _pause_point(point)).exists(), f"the run never reached {point}"
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        if sig == signal.SIGKILL:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # jobs of the killed group
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        assert (out / MARKER).exists(), "an interrupted run left no RELEASE_INCOMPLETE marker"
        r = run_cli("run", str(inp), str(out), "--cores", "2", "--set", "jobs.files_per_job=0")
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        watcher.stop.set()
        watcher.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert watcher.samples > 20
    assert not watcher.bad, watcher.bad[:5]
    assert hashes(out) == final
    assert not (out / MARKER).exists()
