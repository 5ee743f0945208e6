"""End-to-end: the Snakemake workflow through `deidflow run` on the generated demo patients."""
from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from deidflow.demo import make_demo_input, planted_identifiers

from .conftest import ROOT, TEST_KEY, identifier_in

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
# Runs that test something other than the release's content skip defacing the demo's head MRI
# (about 8 s a run on 2 cores); the fixture's run and those compared with it deface it.
NO_FACES = ("--set", "face.method=none")


def run_cli(*args: str, key: str | None = TEST_KEY, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    if key:
        env["DEIDFLOW_KEY"] = key
    return subprocess.run([sys.executable, "-m", "deidflow.cli", *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=600)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def searchable(p: Path) -> bytes:
    """What a leak could hide in: the content of a gzip file (its compressed bytes are noise in which
    a short value turns up by chance), a PNG without its compressed image samples (IDAT)."""
    blob = p.read_bytes()
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        pos, kept = 8, [blob[:8]]
        while pos + 8 <= len(blob):
            length, ctype = struct.unpack(">I4s", blob[pos:pos + 8])
            if ctype != b"IDAT":
                kept.append(blob[pos:pos + 12 + length])
            pos += 12 + length
        return b"".join(kept) + blob[pos:]
    return blob


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("wf")
    inp = base / "input"
    make_demo_input(inp)
    before = (tree_hashes(inp), {p: p.stat().st_mtime_ns for p in inp.rglob("*")})
    out = base / "release"
    r = run_cli("run", str(inp), str(out), "--cores", "2", "--set", "profile.options=[retain_long_modified_dates]")
    assert r.returncode == 0, r.stderr[-3000:]
    after = (tree_hashes(inp), {p: p.stat().st_mtime_ns for p in inp.rglob("*")})
    return {"input": inp, "out": out, "restricted": base / "release_restricted", "base": base, "stdout": r.stdout,
            "input_before": before, "input_after": after}


def test_release_layout(demo):
    out = demo["out"]
    subjects = sorted(p.name for p in (out / "sourcedata" / "dicom").iterdir())
    assert len(subjects) == 5 and all(s.startswith("sub-") for s in subjects)
    files = [p for p in out.rglob("*.dcm")]
    assert len(files) == len(list(demo["input"].rglob("*.dcm")))
    for f in files:
        rel = f.relative_to(out / "sourcedata" / "dicom").parts
        assert rel[0].startswith("sub-") and rel[1].startswith("ses-") and f.name[:4].isdigit()
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == rel[0]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_no_planted_identifier_in_release_or_snakemake_metadata(demo):
    ids = planted_identifiers(demo["input"])
    assert len(ids) > 100
    roots = [demo["out"], demo["restricted"] / ".snakemake"]
    for root in roots:
        for p in root.rglob("*"):
            name = p.relative_to(root).as_posix()
            blob = searchable(p) if p.is_file() else b""
            for v in ids:
                assert not identifier_in(v, blob, name), f"{v!r} found in {root.name}/{name}"


def test_restricted_outputs(demo):
    r = demo["restricted"]
    assert r.stat().st_mode & 0o777 == 0o700
    for sub in ("mapping", "audit", "manifests"):
        assert (r / sub).stat().st_mode & 0o777 == 0o700
    for f in [*(r / "mapping").rglob("*"), *(r / "audit").rglob("*"), r / "quarantine.tsv", r / "inventory.parquet"]:
        assert f.stat().st_mode & 0o777 == (0o700 if f.is_dir() else 0o600), f
    with open(r / "mapping" / "patients.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and all(row["id_new"].startswith("sub-") for row in rows)
    with open(r / "mapping" / "uids.csv") as fh:
        uids = list(csv.DictReader(fh))
    assert uids and all(u["id_new"].startswith("2.25.") for u in uids)
    assert (r / "quarantine.tsv").read_text() == "file\treason\n"
    run = json.loads((r / "run.json").read_text())
    assert run["key_fingerprint"] and TEST_KEY not in (r / "run.json").read_text()
    # The audit names attributes and actions, never values.
    ids = planted_identifiers(demo["input"])
    audit = "".join(p.read_text() for p in sorted((r / "audit").rglob("*.jsonl")))
    dicom_audit = "".join(p.read_text() for p in sorted((r / "audit").glob("sub-*.jsonl")))
    first = json.loads(dicom_audit.splitlines()[0])
    assert first["actions"]["PatientName"] == "P" and first["file"].startswith("sub-")
    assert not [v for v in ids if len(v) >= 6 and v in audit]


def test_uids_consistent_across_files_and_sequences(demo):
    released = {}
    refs = []
    for f in demo["out"].rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        released[ds.SOPInstanceUID] = ds.StudyInstanceUID
        for seq in ("ReferencedImageSequence", "SourceImageSequence"):
            for item in ds.get(seq, []):
                refs.append((item.ReferencedSOPInstanceUID, ds.StudyInstanceUID))
    assert refs, "the demo has references between instances"
    for ref, study in refs:
        assert ref in released and released[ref] == study



def test_second_run_does_nothing_and_same_key_gives_same_bytes(demo, tmp_path):
    again = run_cli("run", str(demo["input"]), str(demo["out"]), "--cores", "2",
                    "--set", "profile.options=[retain_long_modified_dates]")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    other = tmp_path / "release"
    r = run_cli("run", str(demo["input"]), str(other), "--cores", "1",
                "--set", "profile.options=[retain_long_modified_dates]")
    assert r.returncode == 0, r.stderr[-2000:]
    strip = lambda h: {k: v for k, v in h.items() if not k.endswith(".snakemake_timestamp")}  # noqa: E731
    assert strip(tree_hashes(other)) == strip(tree_hashes(demo["out"]))


def test_different_key_different_pseudonyms(demo, tmp_path):
    other = tmp_path / "release"
    r = run_cli("run", str(demo["input"]), str(other), "--cores", "2", *NO_FACES, key="another-key-0123456789abcdef")
    assert r.returncode == 0, r.stderr[-2000:]
    a = {p.name for p in (demo["out"] / "sourcedata" / "dicom").iterdir()}
    b = {p.name for p in (other / "sourcedata" / "dicom").iterdir()}
    assert len(a) == len(b) == 5 and not a & b


def test_refuses_without_key(demo, tmp_path):
    r = run_cli("run", str(demo["input"]), str(tmp_path / "rel"), key=None)
    assert r.returncode == 2 and "no secret key" in r.stderr
    assert not (tmp_path / "rel").exists()


def test_wrong_key_rejected_for_existing_release(demo):
    r = run_cli("run", str(demo["input"]), str(demo["out"]), "--cores", "1", key="wrong-key-0123456789abcdef")
    assert r.returncode != 0 and "fingerprint" in r.stdout + r.stderr


def test_bad_config_fails_before_any_job(demo, tmp_path):
    r = run_cli("run", str(demo["input"]), str(tmp_path / "rel"), "--set", "pseudonym.length=3")
    assert r.returncode == 2 and "pseudonym.length" in r.stderr
    assert not (tmp_path / "rel_restricted").exists()


def test_strict_fails_on_quarantine_and_lists_it(demo, tmp_path):
    """One demo patient (what is tested is the broken file beside it, not the tree's size)."""
    inp = tmp_path / "input"
    import shutil
    patient = next(p for p in sorted(demo["input"].iterdir()) if p.name.startswith("MÜLLER"))
    shutil.copytree(patient, inp / patient.name)
    (inp / "broken.dcm").write_bytes(b"\x00" * 10)
    out = tmp_path / "rel"
    r = run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES)
    assert r.returncode == 3  # EXIT_INCOMPLETE: a file was withheld
    q = (tmp_path / "rel_restricted" / "quarantine.tsv").read_text().splitlines()
    assert q[1].startswith("broken.dcm\t")
    r = run_cli("run", str(inp), str(out), "--cores", "2", *NO_FACES, "--strict")
    assert r.returncode != 0


def test_input_tree_unchanged(demo):
    """The fixture's full run (every stage, the head defaced) left every input file's bytes and
    every input path's mtime as they were (snapshots taken around that run)."""
    (hashes_before, stats_before), (hashes_after, stats_after) = demo["input_before"], demo["input_after"]
    assert hashes_before and hashes_after == hashes_before
    assert stats_after == stats_before


def test_snakemake_lint_clean(tmp_path):
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    inp = tmp_path / "in"
    make_demo_input(inp)
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--config", f"input={inp}",
                        f"output={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr


def test_dates_shift_keeps_intervals(demo):
    """retain_long_modified_dates: one offset per patient, so intervals between studies survive."""
    def study_dates(root: Path) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for f in root.rglob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            out.setdefault(str(ds.PatientID), set()).add(ds.StudyDate)
        return out
    before = [sorted(v) for v in study_dates(demo["input"]).values() if len(v) == 2]
    after = [sorted(v) for v in study_dates(demo["out"]).values() if len(v) == 2]
    day = lambda s: dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))  # noqa: E731
    assert len(before) == len(after) == 1
    (a0, a1), (b0, b1) = before[0], after[0]
    assert (day(a1) - day(a0)) == (day(b1) - day(b0))
    assert -365 <= (day(b0) - day(a0)).days <= -1


def test_incremental_release_processes_only_new_subjects(tmp_path):
    """Adding patients re-runs only their jobs (one job per subject here): earlier subjects'
    files are not rewritten and keep their pseudonyms; changing the profile re-runs everything.
    (Without defacing, 8 s a run: that a face job resumes to the bytes of an uninterrupted run is
    test_release_gate's and test_faults' kill tests'.)"""
    import shutil
    full = tmp_path / "full"
    make_demo_input(full)
    inp = tmp_path / "input"
    inp.mkdir()
    folders = sorted(full.iterdir())
    for d in folders[:3]:
        shutil.copytree(d, inp / d.name)
    out = tmp_path / "release"
    args = ("run", str(inp), str(out), "--cores", "2", *NO_FACES, "--set", "jobs.files_per_job=0")
    assert run_cli(*args).returncode == 0
    dicom = out / "sourcedata" / "dicom"
    before = {p: p.stat().st_mtime_ns for p in dicom.rglob("*.dcm")}
    old_subjects = {p.name for p in dicom.iterdir()}
    for d in folders[3:]:
        shutil.copytree(d, inp / d.name)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in dicom.iterdir()} > old_subjects
    assert {p: p.stat().st_mtime_ns for p in before} == before  # untouched
    complete = tmp_path / "complete"
    assert run_cli("run", str(full), str(complete), "--cores", "2", *NO_FACES,
                   "--set", "jobs.files_per_job=0").returncode == 0
    strip = lambda h: {k: v for k, v in h.items() if not k.endswith(".snakemake_timestamp")}  # noqa: E731
    assert strip(tree_hashes(out)) == strip(tree_hashes(complete))  # same as releasing all at once
    r = run_cli(*args[:-1], "jobs.files_per_job=0", "--set", "dicom.private=safe")
    # 3: the leak scan finds original UIDs in the Siemens CSA header that private=safe keeps, and
    # withholds those subjects (the rest is released)
    assert r.returncode in (0, 3), r.stdout[-2000:] + r.stderr[-2000:]
    assert all(p.stat().st_mtime_ns != t for p, t in before.items() if p.exists())  # profile change: all re-run


def test_no_face_job_without_a_face_method_and_relative_pythonpath(demo, tmp_path):
    """face.method none (no by_suffix method): no face job at all, and the summary says the faces
    were not treated; jobs (run in the restricted folder) import deidflow from a relative
    PYTHONPATH given to the CLI."""
    out = tmp_path / "release"
    env = {**os.environ, "DEIDFLOW_KEY": TEST_KEY, "PYTHONPATH": os.path.relpath(ROOT / "src", tmp_path)}
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(demo["input"]), str(out), "--cores", "2",
                        *NO_FACES], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    restricted = tmp_path / "release_restricted"
    assert not (restricted / "done" / "face").exists() and not (restricted / "logs" / "face").exists()
    assert "faces:       not treated" in r.stdout
    assert any((out / "sourcedata" / "dicom").iterdir())
