"""Red-team round 6: operations II (concurrent runs, reruns over an existing release, user
configurations that keep identifying attributes, hostile releases). Each test failed on the code
before the fix it guards (docs/design-notes.md, "Red-team round 6: operations II")."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from .test_redteam5_ops import _dicom_patient, cli, start_paused

KEY = "rt6-key-0123456789abcdef0123456789abcdef"


def _run(inp: Path, out: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    return cli("run", str(inp), str(out), "--cores", "2", "--set", "face.method=none", *extra,
               DEIDFLOW_KEY=KEY, **env)


NAME, PID, BIRTH = "ZOLTANSKI^BARTHOLOMEW", "MRN884213", "19610423"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _released_values(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------------
# A user's keep override of an attribute that identifies the patient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_keep_override_of_the_patients_name_does_not_keep_the_name(tmp_path, engine):
    """`dicom.overrides: [{attribute: PatientName, action: keep}]` took the name out of the
    identifier model (a kept value is not a source), so neither the residual sweep nor the leak
    scan knew it: the name was released in PatientName and in every other kept value, exit 0."""
    from deidflow.dicom import Scrubber, SubjectContext
    from deidflow.dicomio import _deidentify_dataset, deidentify_file
    from deidflow.profile import build_plan
    from deidflow.pseudonym import Pseudonymizer
    from deidflow.qc.identifiers import IdentifierCollector
    src = _dicom_patient(tmp_path, "P", NAME, PID, BIRTH)[0]
    ds = pydicom.dcmread(src)
    ds.ImageComments = "ZOLTANSKI MRN884213"  # public text the profile removes anyway
    ds.StudyDescription = "CT head ZOLTANSKI"  # kept by a second override, swept
    ds.save_as(src, enforce_file_format=True)
    overrides = [{"attribute": "PatientName", "action": "keep"}, {"attribute": "(0010,0020)", "action": "keep"},
                 {"attribute": "PatientBirthDate", "action": "keep"},
                 {"attribute": "StudyDescription", "action": "keep"},
                 {"attribute": "StudyInstanceUID", "action": "keep"}]
    plan = build_plan([], "remove", overrides)
    collector = IdentifierCollector()
    scrubber = Scrubber(plan, SubjectContext(Pseudonymizer(KEY.encode()), "sub-T", -10, identifiers=collector))
    buf = io.BytesIO()
    {"stream": deidentify_file, "dataset": _deidentify_dataset}[engine](src, buf, scrubber)
    out = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert b"ZOLTANSKI" not in buf.getvalue() and b"MRN884213" not in buf.getvalue()
    assert "ZOLTANSKI" not in str(out.PatientName) and out.StudyDescription.startswith("CT head")
    # the birth date and the study UID (values the sweep does not rewrite) are searched by the leak scan
    values = {(kind, value) for kind, _field, value in collector.entries()}
    assert {("name", NAME), ("id", PID), ("date", BIRTH), ("uid", ds.StudyInstanceUID)} <= values, values


@pytest.mark.slow
@pytest.mark.workflow
def test_keep_overrides_cannot_release_the_patients_identity(tmp_path):
    """The same through `deidflow run --config`: name, MRN and birth date kept by override, with
    `dicom.private: keep`, were released (and the report listed the override's replace value)
    while the summary said "leak scan: no identifying value found", exit 0."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P1", NAME, PID, BIRTH, files=2)
    cfg = tmp_path / "keep.yaml"
    cfg.write_text("dicom:\n  private: keep\n  overrides:\n"
                   "    - {attribute: PatientName, action: keep}\n"
                   "    - {attribute: \"(0010,0020)\", action: keep}\n"
                   "    - {attribute: OtherPatientIDs, action: replace, value: MRN884213}\n")
    r = _run(inp, out, "--config", str(cfg))
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-1500:])
    released = _released_values(out)
    for value in (b"ZOLTANSKI", b"BARTHOLOMEW", PID.encode()):
        assert value not in released, value
    # a kept birth date cannot be swept out of a DA value: the subject is withheld
    cfg.write_text(cfg.read_text() + "    - {attribute: PatientBirthDate, action: keep}\n")
    r = _run(inp, out, "--config", str(cfg))
    assert r.returncode == 3, (r.stdout[-1500:], r.stderr[-1500:])
    assert "withheld from the release" in r.stderr and "PatientBirthDate" in r.stderr
    assert BIRTH.encode() not in _released_values(out)


# ------------------------------------------------------------------------------------------------
# Snakemake options that skip jobs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--touch"], ["-t"], ["--rerun-triggers", "mtime"], ["--until", "dicom"],
                                   ["--omit-from", "publish"], ["--allowed-rules", "dicom"],
                                   ["--consider-ancient", "dicom=manifest"], ["--drop-metadata"],
                                   ["--notemp"], ["--ignore-incomplete"], ["-n"], ["mapping/uids.csv"],
                                   ["--delete-all-output"], ["--list-rules"], ["--summary"], ["--cleanup-metadata", "x"]])
def test_snakemake_options_that_skip_jobs_are_refused(extra):
    """Options after `--` that make Snakemake take outputs for current or leave jobs out kept a
    release made under the last policy (see the workflow test below); those that make it do
    something else (`--delete-all-output` deleted the QC report from the release and uids.csv,
    `--list-rules`) ended with the last run's "release complete", exit 0."""
    from deidflow.cli import _check_snakemake_args
    from deidflow.errors import UsageError
    with pytest.raises(UsageError, match="after -- is not passed to Snakemake: (it skips jobs or takes outputs|"
                                         "deidflow run runs the workflow, nothing else)"):
        _check_snakemake_args(extra)


def test_snakemake_option_that_skips_jobs_is_a_usage_error(tmp_path):
    inp = tmp_path / "input"
    _dicom_patient(inp, "P", NAME, PID, BIRTH)
    out = tmp_path / "release"
    r = cli("run", str(inp), str(out), "--dry-run", "--", "--touch", DEIDFLOW_KEY=KEY)
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-800:])
    assert r.stderr.startswith("deidflow: error: --touch after -- is not passed to Snakemake"), r.stderr
    assert not out.exists() and not (tmp_path / "release_restricted").exists()
    # what deidflow's own messages suggest still passes
    r = cli("run", str(inp), str(out), "--dry-run", "--", "--forcerun", "dicom", "other", DEIDFLOW_KEY=KEY)
    assert r.returncode == 0, r.stderr[-800:]


@pytest.mark.slow
@pytest.mark.workflow
def test_changed_policy_is_applied_even_with_rerun_triggers_mtime(tmp_path):
    """`dicom.private: keep`, then the default policy with `-- --rerun-triggers mtime` (a common
    Snakemake speed-up): "Nothing to be done", "release complete", exit 0, and every released
    file still held the private elements the configuration now removes."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P", NAME, PID, BIRTH)
    assert _run(inp, out, "--set", "dicom.private=keep").returncode == 0
    dcm = next(out.glob("sourcedata/dicom/sub-*/*/*/*.dcm"))
    assert any(e.tag.is_private for e in pydicom.dcmread(dcm))
    r = _run(inp, out, "--", "--rerun-triggers", "mtime")
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    r = _run(inp, out)
    assert r.returncode == 0, r.stderr[-1500:]
    dcm = next(out.glob("sourcedata/dicom/sub-*/*/*/*.dcm"))
    assert not any(e.tag.is_private for e in pydicom.dcmread(dcm))


# ------------------------------------------------------------------------------------------------
# Two runs on one release
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_second_run_on_a_release_in_use_is_refused_whatever_its_restricted_folder(tmp_path):
    """The lock was the restricted folder's only: a second run on the same release with another
    `--restricted` (with `--force`, or at the start while the release was still empty) ran to
    "release complete" beside the first, publishing into the same folders and taking the
    RELEASE_INCOMPLETE marker away while the first was still publishing."""
    inp, out, flags = tmp_path / "input", tmp_path / "release", tmp_path / "flags"
    _dicom_patient(inp, "P", NAME, PID, BIRTH)
    flags.mkdir()
    p = start_paused(inp, out, "publish", flags, cores="1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        other = tmp_path / "other_restricted"
        for extra in (["--force"], ["--force", "--dry-run"]):
            r = cli("run", str(inp), str(out), "--cores", "1", "--set", "face.method=none",
                    "--restricted", str(other), *extra, DEIDFLOW_KEY="another-key-0123456789abcdef0123")
            assert r.returncode == 2, (extra, r.returncode, r.stdout[-1500:], r.stderr[-1500:])
            assert r.stderr.startswith(f"deidflow: error: another deidflow run is using {out}"), r.stderr
        assert (out / "RELEASE_INCOMPLETE").exists()
        (flags / "publish").unlink()
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, (stdout[-1500:], stderr[-1500:])
    assert len([d for d in out.iterdir() if d.name.startswith("sub-")]) == 1
    assert not (tmp_path / "other_restricted" / "foreign").exists()


# ------------------------------------------------------------------------------------------------
# What is added to or changed in a published subject folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_files_and_links_put_into_published_subject_folders_are_taken_out(tmp_path):
    """A file added inside a published subject's folder was found by `deidflow verify`, but a
    rerun said "Nothing to be done", "release complete"; a symbolic link there to the restricted
    mappings was read by neither (`verify`: "no identifying value found", exit 0), and `zip -r` or
    `cp -rL` of the release ships the mapping table. A published file edited with its time kept
    (`touch -r`) stayed too, and so did an edited participants.tsv or README."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P", NAME, PID, BIRTH, files=2)
    assert _run(inp, out).returncode == 0
    clean = _files(out)
    restricted = tmp_path / "release_restricted"
    sub = next(d for d in out.iterdir() if d.name.startswith("sub-"))
    link = next(out.glob("sourcedata/dicom/sub-*/*")) / "mapping"
    link.symlink_to(restricted / "mapping")
    v = cli("verify", str(out))
    assert v.returncode == 3, (v.returncode, v.stdout[-1500:])
    assert f"NOT A FILE: {link.relative_to(out)}" in v.stdout
    # a FIFO blocked `deidflow verify` for ever, a link to /dev/zero would read without end
    os.mkfifo(sub / "pipe.json")
    (sub / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(out / "notes.txt")
    v = cli("verify", str(out), timeout=120)
    assert v.returncode == 3 and v.stdout.count("NOT A FILE") == 4, v.stdout[-1500:]
    (sub / "notes.txt").write_text("Bartholomew Zoltanski MRN884213\n")
    sidecar = next(sub.rglob("*.json"))
    st = sidecar.stat()
    sidecar.write_bytes(sidecar.read_bytes().replace(b"{", b'{"Note": "seen 19610423",', 1))
    os.utime(sidecar, ns=(st.st_atime_ns, st.st_mtime_ns))
    # dataset-level files edited in place stayed as well
    with open(out / "participants.tsv", "a") as fh:
        fh.write("sub-x\tZOLTANSKI\n")
    with open(out / "README", "a") as fh:
        fh.write("Contact: Bartholomew Zoltanski\n")
    r = _run(inp, out)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-1500:])
    assert "Nothing to be done" not in r.stdout
    assert _files(out) == clean
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    moved = (restricted / "foreign" / "moved.tsv").read_text()
    assert "notes.txt" in moved and "\tsourcedata/dicom/" in moved and "pipe.json" in moved, moved
    assert (restricted / "foreign" / link.relative_to(out)).is_symlink()
    assert cli("verify", str(out)).returncode == 0
    r = _run(inp, out)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout, r.stdout[-1500:]


def test_links_at_the_top_of_the_release_are_foreign(tmp_path):
    """`sub-zz -> <restricted>` counted as a subject folder (`is_dir` follows links) and a
    `derivatives` link was taken for deidflow's own: neither is a folder a stage wrote."""
    from deidflow.publish import foreign_entries, release_subjects
    release, elsewhere = tmp_path / "release", tmp_path / "restricted"
    (release / "sub-a").mkdir(parents=True)
    (elsewhere / "mapping").mkdir(parents=True)
    (release / "sub-zz").symlink_to(elsewhere)
    (release / "derivatives").symlink_to(elsewhere)
    assert release_subjects(release) == {"sub-a"}
    assert sorted(p.name for p in foreign_entries(release)) == ["derivatives", "sub-zz"]


def test_verify_lists_links_and_special_files(tmp_path):
    from deidflow.qc.leakscan import not_plain_entries
    (tmp_path / "sub-a" / "anat").mkdir(parents=True)
    (tmp_path / "sub-a" / "anat" / "x.json").write_text("{}")
    (tmp_path / "sub-a" / "anat" / "l").symlink_to("/etc")
    os.mkfifo(tmp_path / "sub-a" / "f")
    assert not_plain_entries(tmp_path) == ["sub-a/anat/l", "sub-a/f"]


def test_publish_records_what_it_published(tmp_path):
    from deidflow.publish import folder_listing
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.nii").write_bytes(b"12345")
    listing = folder_listing(tmp_path / "a")
    assert listing["b"] == ["d"] and listing["b/x.nii"][:2] == ["f", 5]
    assert json.loads(json.dumps(listing)) == listing


# ------------------------------------------------------------------------------------------------
# Restricted records are append-only
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_withdrawal_keeps_the_subjects_date_offset_and_uid_map(tmp_path):
    """patients.csv keeps a withdrawn subject's row (flagged), but dates.csv and uids.csv were
    rebuilt from the current input: a subject leaving the input took its day offset and the map of
    every UID already shared with it out of the restricted folder."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P1", NAME, PID, BIRTH, files=2)
    _dicom_patient(inp, "P2", "KOWALCZYK^WLADYSLAWA", "MRN551207", "19491102")
    assert _run(inp, out).returncode == 0
    mapping = tmp_path / "release_restricted" / "mapping"
    before = {name: (mapping / name).read_text().splitlines() for name in ("dates.csv", "uids.csv")}
    assert len(before["dates.csv"]) == 3 and len(before["uids.csv"]) > 4
    import shutil
    shutil.rmtree(inp / "P2")
    r = _run(inp, out)
    assert r.returncode == 0, r.stderr[-1500:]
    assert len([d for d in out.iterdir() if d.name.startswith("sub-")]) == 1
    for name, lines in before.items():
        assert (mapping / name).read_text().splitlines() == lines, name
    assert oct((mapping / "uids.csv").stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------------------------------------
# deidflow verify with the wrong restricted folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_verify_with_another_releases_restricted_folder_is_not_a_clean_bill(tmp_path):
    """`deidflow verify A --restricted B_restricted` searched A for B's patients' values and said
    "no identifying value found", exit 0, over a file holding A's patient's name."""
    a_in, b_in = tmp_path / "in_a", tmp_path / "in_b"
    _dicom_patient(a_in, "P", NAME, PID, BIRTH)
    _dicom_patient(b_in, "Q", "QUIMBY^PERCIVAL", "QMB77123", "19700101")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a_in, a).returncode == 0 and _run(b_in, b).returncode == 0
    sub = next(d for d in a.iterdir() if d.name.startswith("sub-"))
    (sub / "notes.txt").write_text("Bartholomew Zoltanski\n")
    assert cli("verify", str(a)).returncode == 3
    v = cli("verify", str(a), "--restricted", str(tmp_path / "b_restricted"))
    assert v.returncode == 3 and f"UNKNOWN SUBJECT: {sub.name}" in v.stdout, (v.returncode, v.stdout[-1500:])
    # a copy of a release (the folder about to be uploaded) is verified with the original's restricted folder
    import shutil
    shutil.copytree(b, tmp_path / "upload")
    assert cli("verify", str(tmp_path / "upload"), "--restricted", str(tmp_path / "b_restricted")).returncode == 0


def test_release_lock_falls_back_to_a_lock_file_where_flock_needs_write_access(tmp_path, monkeypatch):
    """On NFS, flock() is emulated with POSIX locks, which refuse a descriptor opened read-only
    (EBADF): the release lock then takes a hidden lock file beside the release."""
    import errno
    from deidflow import cli as cli_mod

    def nfs_flock(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(cli_mod.fcntl, "flock", nfs_flock)
    release = tmp_path / "release"
    fd = cli_mod._lock_release(release, create=True)
    try:
        lock = tmp_path / ".release.deidflow-lock"
        assert fd is not None and lock.is_file() and release.is_dir()
        code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(7)\n")
        assert subprocess.run([sys.executable, "-c", code, str(lock)]).returncode == 7
    finally:
        os.close(fd)


def test_profile_with_a_broken_config_is_a_usage_error(tmp_path):
    """`--profile DIR` whose config.yaml is not YAML reached Snakemake, and the run ended with exit
    status 1 ("the workflow stopped before its jobs ran": a bug, by the README's table)."""
    from deidflow.cli import _check_profile
    from deidflow.errors import UsageError
    (tmp_path / "config.yaml").write_text("cores: [\n")
    with pytest.raises(UsageError, match="config.yaml is not valid YAML at line 2"):
        _check_profile(str(tmp_path))
    (tmp_path / "config.yaml").write_text("- cores\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        _check_profile(str(tmp_path))
    (tmp_path / "config.yaml").write_text("cores: 2\n")
    assert _check_profile(str(tmp_path)) == str(tmp_path.resolve())


def test_append_only_records_survive_a_line_cut_short(tmp_path):
    """withdrawn.tsv, foreign/moved.tsv and the copy-publish progress were appended with a plain
    write: after a crash that cut a line short (a full disk), the next line ran on from it,
    corrupting both records. A new file is made restricted whatever the umask."""
    from deidflow.fsutil import append_line
    record = tmp_path / "withdrawn.tsv"
    old = os.umask(0)
    try:
        append_line(record, "date\tsubject\tfolders_removed")
    finally:
        os.umask(old)
    assert record.stat().st_mode & 0o777 == 0o600
    with open(record, "a") as fh:
        fh.write("2026-12-07\tsub-a\tsub-")  # the crash
    append_line(record, "2026-12-07\tsub-a\tsub-a sourcedata/dicom/sub-a")
    assert record.read_text().splitlines() == ["date\tsubject\tfolders_removed", "2026-12-07\tsub-a\tsub-",
                                               "2026-12-07\tsub-a\tsub-a sourcedata/dicom/sub-a"]


def test_face_selection_that_can_select_nothing_is_refused():
    """`face.select.min_extent_mm: 600` (a typo for 60) was accepted: no volume can be at least 600 mm
    along every axis and at most `max_extent_mm` (300), so every head was released with its face
    ("no 3D coverage of a face")."""
    from deidflow.settings import ConfigError, deep_update, load_defaults, parse_set, validate
    cfg = deep_update(load_defaults(), parse_set(["face.select.min_extent_mm=600"]))
    with pytest.raises(ConfigError, match="min_extent_mm: 600 is not below face.select.max_extent_mm"):
        validate(cfg)
    validate(deep_update(load_defaults(), parse_set(["face.select.min_extent_mm=80"])))


def test_key_file_inside_the_release_is_refused(tmp_path):
    """`--key-file release/project.key` (kept "with the data") was accepted: the shared folder held
    the key until the run's dataset step moved it into `<restricted>/foreign/`, and the next run
    then said "no such file"."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P", NAME, PID, BIRTH)
    out.mkdir()
    key = out / "project.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    r = cli("run", str(inp), str(out), "--key-file", str(key), "--force", "--dry-run")
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-800:])
    assert r.stderr.startswith(f"deidflow: error: key file {key} is inside the release {out}"), r.stderr
