"""Red-team round 5: the operational side (key files, input paths, files that change under a run,
restricted folders). Each test failed on the code before the fix it guards (docs/design-notes.md,
"Red-team round 5: operations")."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

KEY = "rt5-key-0123456789abcdef0123456789abcdef"


def _limited(gib: int):
    """preexec_fn: cap the address space, so that a reader of /dev/zero fails in the child instead
    of taking the machine's memory (the old load_key read it until the OOM killer came)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))
    return limit


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    env.update(extra)
    return env


def cli(*args: str, timeout: int = 300, gib: int = 0, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deidflow.cli", *args], env=_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limited(gib) if gib else None)


# ------------------------------------------------------------------------------------------------
# Key files
# ------------------------------------------------------------------------------------------------
def _load_key_in_child(key_file: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom deidflow.pseudonym import load_key, MissingKeyError\n"
            "try:\n    load_key(sys.argv[1])\nexcept MissingKeyError as e:\n    print(e); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, key_file], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=30, preexec_fn=_limited(2))


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "large"])
def test_key_file_that_is_no_key_file_is_refused_without_reading_it_all(tmp_path, kind):
    """`--key-file /dev/zero` read until the machine ran out of memory (20 GB, then the OOM killer);
    a FIFO blocked the run forever (and every job would read it again); a 100 kB file became a key."""
    if kind == "fifo":
        path = tmp_path / "key.fifo"
        os.mkfifo(path)
    elif kind == "large":
        path = tmp_path / "photo.jpg"
        path.write_bytes(os.urandom(100_000))
    else:
        path = Path(kind)
    r = _load_key_in_child(str(path))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-1500:])
    assert ("not a regular file" if kind != "large" else "larger than") in r.stdout


def test_key_file_dev_zero_is_a_usage_error(tmp_path, demo_export):
    r = cli("run", str(demo_export), str(tmp_path / "rel"), "--key-file", "/dev/zero", "--dry-run",
            timeout=60, gib=4)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert r.stderr.startswith("deidflow: error: key file /dev/zero is not a regular file"), r.stderr[-800:]
    assert not (tmp_path / "rel").exists() and not (tmp_path / "rel_restricted").exists()


# ------------------------------------------------------------------------------------------------
# Small inputs
# ------------------------------------------------------------------------------------------------
def _dicom_patient(root: Path, folder: str, name: str, pid: str, birth: str, files: int = 1) -> list[Path]:
    """One CT series of ``files`` slices (pydicom's CT_small) for one patient, with its own UIDs."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    out = []
    for i in range(files):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[pid, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[pid, "series"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[pid, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = root / folder / f"IM_{i + 1:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _run(inp: Path, out: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    return cli("run", str(inp), str(out), "--cores", "2", "--set", "face.method=none", *extra,
               DEIDFLOW_KEY=KEY, **env)


# ------------------------------------------------------------------------------------------------
# One restricted folder, one release
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_restricted_folder_of_another_release_is_refused(tmp_path):
    """`--restricted` naming the restricted folder of another, existing release was accepted: the
    run marked every subject of that release withdrawn in its patients.csv (they were still
    published there) and dropped their date offsets from dates.csv."""
    a_in, b_in = tmp_path / "in_a", tmp_path / "in_b"
    _dicom_patient(a_in, "ZOLTANSKI_BARTHOLOMEW", "ZOLTANSKI^BARTHOLOMEW", "MRN884213", "19610423")
    _dicom_patient(b_in, "KOWALCZYK_WLADYSLAWA", "KOWALCZYK^WLADYSLAWA", "MRN551207", "19491102")
    a_out = tmp_path / "release_a"
    r = _run(a_in, a_out)
    assert r.returncode == 0, r.stderr[-2000:]
    restricted = tmp_path / "release_a_restricted"
    before = {p: (restricted / p).read_bytes() for p in ("mapping/patients.csv", "mapping/dates.csv")}
    b_out = tmp_path / "release_b"
    r = _run(b_in, b_out, "--restricted", str(restricted))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"deidflow: error: restricted folder {restricted} belongs to the release {a_out}")
    assert not b_out.exists()
    assert {p: (restricted / p).read_bytes() for p in before} == before
    # a release moved together with its restricted folder still runs
    moved = tmp_path / "moved"
    a_out.rename(moved)
    restricted.rename(tmp_path / "moved_restricted")
    r = _run(a_in, moved)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Input files that change while the run works
# ------------------------------------------------------------------------------------------------
def start_paused(inp: Path, out: Path, point: str, flags: Path, *extra: str, cores: str = "2",
                 **popen) -> subprocess.Popen:
    """Start ``deidflow run`` paused at the first job of stage ``point`` and return once it got
    there (the flag file ``flags/point`` exists; unlinking it lets the job go on)."""
    import time
    env = _env(DEIDFLOW_KEY=KEY, DEIDFLOW_TEST_PAUSE_AT=f"{point}:{flags}")
    args = [sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", cores,
            "--set", "face.method=none", *extra]
    p = subprocess.Popen(args, env=env, cwd=ROOT, **popen)
    deadline = time.monotonic() + 300
    while not (flags / point).exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not (flags / point).exists():
        p.kill()
        raise AssertionError(f"the run never reached {point}")
    return p


def _paused_run(inp: Path, out: Path, point: str, flags: Path, change) -> subprocess.CompletedProcess:
    """Run until the first job of stage ``point`` starts, call ``change()``, let the run finish."""
    flags.mkdir()
    with open(flags.parent / f"{point}.log", "w+") as log:
        p = start_paused(inp, out, point, flags, "--set", "jobs.min_batches=1", stdout=log, stderr=subprocess.STDOUT)
        try:
            change()
            (flags / point).unlink()
            p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        log.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, log.read(), "")


def _nifti(path: Path, fill: int) -> None:
    import nibabel as nib
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), fill, np.int16), np.eye(4)), path)


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.parametrize("stage,how", [("dicom", "symlink"), ("dicom", "replaced"), ("other", "symlink"),
                                       ("other", "folder-symlink")])
def test_input_file_swapped_after_the_inventory_is_quarantined(tmp_path, stage, how):
    """The inventory refuses symbolic links and records each file's size and time, but the jobs
    opened the manifest's path as it was when they ran: a file replaced after the inventory by a
    link to another patient's file outside the input (or by another patient's file, or a folder of
    its path by a link) was released under the first patient's pseudonym."""
    inp, outside = tmp_path / "input", tmp_path / "outside"
    dcm = _dicom_patient(inp, "ZOLTANSKI_BARTHOLOMEW", "ZOLTANSKI^BARTHOLOMEW", "MRN884213", "19610423", files=2)
    other = _dicom_patient(outside, "KOWALCZYK", "KOWALCZYK^WLADYSLAWA", "MRN551207", "19491102")[0]
    nii = inp / "ZOLTANSKI_BARTHOLOMEW" / "nifti" / "t1.nii"
    _nifti(nii, 1)
    _nifti(outside / "nifti" / "t1.nii", 7)

    def change() -> None:
        target = dcm[1] if stage == "dicom" else nii
        if how == "folder-symlink":
            target.parent.rename(tmp_path / "moved-away")
            target.parent.symlink_to(outside / "nifti")
        elif how == "symlink":
            target.unlink()
            target.symlink_to(other if stage == "dicom" else outside / "nifti" / "t1.nii")
        else:
            target.write_bytes(other.read_bytes())

    out = tmp_path / "release"
    r = _paused_run(inp, out, stage, tmp_path / "flags", change)
    assert r.returncode == 3, r.stdout[-3000:]
    quarantine = (tmp_path / "release_restricted" / "quarantine.tsv").read_text()
    swapped = (dcm[1] if stage == "dicom" else nii).relative_to(inp).as_posix()
    assert f"{swapped}\tchanged since the inventory" in quarantine, quarantine
    released = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sum(p.endswith(".dcm") for p in released) == (1 if stage == "dicom" else 2), released
    assert sum(p.endswith((".nii", ".nii.gz")) and p.startswith("sourcedata/nifti") for p in released) == \
        (1 if stage == "dicom" else 0), released
    assert not any(b"MRN551207" in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_other_format_file_rewritten_while_it_is_read_is_quarantined(tmp_path, monkeypatch):
    """The other-formats job checked a file against its inventory row before reading it, not after
    (the dicom job checks both): a NIfTI rewritten during its scrub was staged for release."""
    from deidflow.formats import ScrubContext, get, stage
    from deidflow.pseudonym import Pseudonymizer
    inp, staged = tmp_path / "input", tmp_path / "stage"
    nii = inp / "P" / "t1.nii"
    _nifti(nii, 1)
    st = nii.stat()
    entry = {"relpath": "P/t1.nii", "format": "nifti1", "out_relpath": "anat/t1.nii", "src_id": "s1",
             "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    real = get("nifti1")

    class Rewriting:
        def scrub(self, src, dst, ctx):
            res = real.scrub(src, dst, ctx)
            _nifti(nii, 7)  # another image at the same path, written while the job read it
            return res

    monkeypatch.setattr(stage, "get", lambda fmt: Rewriting())
    bad, audit = [], []
    ctx = ScrubContext(subject="sub-x", pseudo=Pseudonymizer(KEY.encode()), date_offset=0)
    ok = stage._one(entry, inp, staged, ctx, bad, audit, {}, "sourcedata/nifti", "sub-x")
    assert not ok and bad and "changed since the inventory" in bad[0][1], bad
    assert not [p for p in staged.rglob("*") if p.is_file()] and audit == []


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_sigterm_is_an_interruption_not_a_bug(tmp_path):
    """SIGTERM (kill, SLURM's time limit, systemd, docker stop): Snakemake's scheduler replaces
    deidflow's handler with its own graceful stop, and the run exited with status 1 ("internal
    error") after a summary claiming every subject withheld and faces "not treated: face.method
    none". It is an interruption: status 130, the resume message, and the same command finishes."""
    import signal
    import time
    inp = tmp_path / "input"
    _dicom_patient(inp, "ZOLTANSKI_BARTHOLOMEW", "ZOLTANSKI^BARTHOLOMEW", "MRN884213", "19610423")
    flags, out = tmp_path / "flags", tmp_path / "release"
    flags.mkdir()
    p = start_paused(inp, out, "dicom", flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        (flags / "dicom").unlink()  # the running job finishes (Snakemake's graceful stop)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, stdout[-1500:], stderr[-1500:])
    assert "interrupted" in stderr and "withheld" not in stdout, (stdout[-1500:], stderr[-1500:])
    assert (out / "RELEASE_INCOMPLETE").exists()
    r = _run(inp, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "RELEASE_INCOMPLETE").exists()


# ------------------------------------------------------------------------------------------------
# A full disk is an output error wherever pydicom reports it
# ------------------------------------------------------------------------------------------------
def _pydicom_style_enospc() -> OSError:
    """What pydicom raises when a write fails: a new OSError naming the tag, without errno, raised
    from the system's error (pydicom.tag.tag_in_exception)."""
    import errno
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise OSError(f"With tag (7FE0,0010) got exception: {exc}") from exc
    except OSError as wrapped:
        return wrapped


def test_output_error_of_sees_through_pydicom_rewrapping():
    from deidflow.errors import output_error_of, public_reason
    wrapped = _pydicom_style_enospc()
    assert wrapped.errno is None and output_error_of(wrapped).strerror == "No space left on device"
    assert public_reason(wrapped) == "cannot write output: No space left on device"
    assert output_error_of(OSError(2, "No such file or directory")) is None


def test_full_disk_while_cleaning_pixels_fails_the_job_not_the_file(tmp_path, demo_export, monkeypatch):
    """The burned-in-text capture of the demo, cleaned on a full disk: pydicom's rewrapped ENOSPC
    (errno None) was read as a property of the file, which was withheld for good ("pixel data could
    not be cleaned: None") while its subject was published; the rerun after freeing space kept it
    out. The job must fail instead, so that the rerun cleans and releases it."""
    import pydicom
    from deidflow.dicom import Scrubber, SubjectContext
    from deidflow.profile import build_plan
    from deidflow.pseudonym import Pseudonymizer
    from deidflow.release import OutputError, _subject, pixel_cleaner
    capture = next(demo_export.glob("DOE_*/*/*Report_capture/*.dcm"))
    st = capture.stat()
    entry = {"relpath": capture.relative_to(demo_export).as_posix(), "out_relpath": "ses-1/US2-x/0001.dcm",
             "src_id": "s1", "format": "dicom", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    save_as = pydicom.Dataset.save_as

    def full_disk(self, filename, *args, **kwargs):
        if ".tmp-pixels-" in str(filename):
            raise _pydicom_style_enospc()
        return save_as(self, filename, *args, **kwargs)
    monkeypatch.setattr(pydicom.Dataset, "save_as", full_disk)
    pseudo = Pseudonymizer(KEY.encode())
    release, restricted = tmp_path / "release" / "sourcedata" / "dicom", tmp_path / "restricted"
    scrubber = Scrubber(build_plan([], "remove", []), SubjectContext(pseudo, "sub-TEST", -10, {}))
    with pytest.raises(OutputError, match="No space left on device"):
        _subject({"subject": "sub-TEST", "files": [entry]}, demo_export, release, restricted, scrubber,
                 pixel_cleaner({"pixels": {"clean": "auto", "policy": "all_text"}}, pseudo))
    assert not (release / "sub-TEST").exists()


# ------------------------------------------------------------------------------------------------
# One hostile file must not fail its whole job unit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ts", ["1.2.840.113619.5.2",          # GE's private implicit big endian
                                "1.2.840.10008.1.1",           # a SOP class, not a transfer syntax
                                "1.2.840.10008.1.2.99"])       # unknown under the DICOM root
def test_private_or_unknown_transfer_syntax_is_quarantined_not_a_job_crash(tmp_path, ts):
    """A file whose file meta names a private or unknown transfer syntax passed the inventory, and
    the dicom job died on it (pydicom's UID.is_compressed raises ValueError): every subject of
    its job unit (up to a thousand files) stayed out of the release on every rerun."""
    from deidflow import dicomio, inventory
    from deidflow.dicom import Scrubber, SubjectContext
    from deidflow.profile import build_plan
    from deidflow.pseudonym import Pseudonymizer
    path = _dicom_patient(tmp_path / "in", "P", "QUIMBY^PERCIVAL", "QMB77123", "19700101")[0]
    explicit = b"1.2.840.10008.1.2.1\x00"  # pydicom refuses to write another: patch the bytes
    data = path.read_bytes()
    assert data.count(explicit) == 1
    path.write_bytes(data.replace(explicit, ts.encode().ljust(len(explicit), b"\x00")))
    with pytest.raises(dicomio.DicomError, match="transfer syntax"):
        inventory.read_dicom_header(path)
    scrubber = Scrubber(build_plan([], "remove", []), SubjectContext(Pseudonymizer(KEY.encode()), "sub-T", -10, {}))
    with pytest.raises(dicomio.DicomError, match="transfer syntax"):
        dicomio.deidentify_path(path, tmp_path / "out" / "0001.dcm", scrubber)
    assert not (tmp_path / "out" / "0001.dcm").exists()


# ------------------------------------------------------------------------------------------------
# Snakemake options after -- that would undo what deidflow checked
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--directory", "{out}"], ["--config", "key=SECRET0123456789abcdef"],
                                   ["--configfile", "{out}.yaml"], ["--snakefile", "Snakefile"]])
def test_snakemake_options_deidflow_owns_are_refused_after_the_double_dash(tmp_path, extra):
    """`deidflow run IN OUT -- --directory OUT` made Snakemake write .snakemake/ and its log into the
    release folder, then stopped with status 1 ("internal error"); `-- --config key=…` bypassed the
    schema check and wrote the value into Snakemake's log. Refused before anything is written."""
    inp = tmp_path / "input"
    _dicom_patient(inp, "P", "QUIMBY^PERCIVAL", "QMB77123", "19700101")
    out = tmp_path / "release"
    r = cli("run", str(inp), str(out), "--dry-run", "--", *(a.format(out=out) for a in extra), DEIDFLOW_KEY=KEY)
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-800:])
    assert r.stderr.startswith(f"deidflow: error: {extra[0]} after -- is not passed to Snakemake"), r.stderr
    assert not out.exists() and not (tmp_path / "release_restricted").exists()


# ------------------------------------------------------------------------------------------------
# Keys across runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_other_key_is_refused_even_without_the_fingerprint_file(tmp_path):
    """Only restricted/key_fingerprint was checked: with that one file gone (cleaned up, not copied
    back) a run with another key re-pseudonymized the release under new labels and withdrew every
    earlier subject, though run.json still named the first key's fingerprint."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P", "QUIMBY^PERCIVAL", "QMB77123", "19700101")
    r = _run(inp, out)
    assert r.returncode == 0, r.stderr[-2000:]
    restricted = tmp_path / "release_restricted"
    (restricted / "key_fingerprint").unlink()
    patients = (restricted / "mapping" / "patients.csv").read_bytes()
    released = sorted(p.name for p in out.iterdir())
    r = cli("run", str(inp), str(out), "--cores", "2", "--set", "face.method=none",
            DEIDFLOW_KEY="another-key-0123456789abcdef0123456789")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "was made with the key whose fingerprint is" in r.stderr
    assert (restricted / "mapping" / "patients.csv").read_bytes() == patients
    assert sorted(p.name for p in out.iterdir()) == released
    r = _run(inp, out)  # the original key still works, and the marker comes back
    assert r.returncode == 0, r.stderr[-2000:]
    assert (restricted / "key_fingerprint").is_file()


# ------------------------------------------------------------------------------------------------
# Subject folders no run wrote
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.workflow
def test_subject_folders_dropped_into_a_release_are_scanned_and_taken_out(tmp_path):
    """`sub-X/` folders of no current subject (another release's subject, a withdrawn one restored
    from a backup) were read by nobody: `deidflow verify` said "no identifying value found" (exit 0)
    over a file named and filled with a patient's name, and the next run said "Nothing to be done"
    and "release complete" with the folders still in the release."""
    inp, out = tmp_path / "input", tmp_path / "release"
    _dicom_patient(inp, "P", "QUIMBY^PERCIVAL", "QMB77123", "19700101")
    r = _run(inp, out)
    assert r.returncode == 0, r.stderr[-2000:]
    planted = [out / "sub-zz" / "anat", out / "sourcedata" / "dicom" / "sub-zz",
               out / "derivatives" / "deidflow" / "qc" / "sub-zz"]
    for d in planted:  # one at a time: each is found
        d.mkdir(parents=True)
        (d / "QUIMBY_PERCIVAL.txt").write_text("Percival Quimby QMB77123\n")
        v = cli("verify", str(out), DEIDFLOW_KEY=KEY)
        assert v.returncode == 3 and "LEAK" in v.stdout + v.stderr, (d, v.returncode, v.stdout[-800:])
        shutil.rmtree(d)
    for d in planted:
        d.mkdir(parents=True)
        (d / "QUIMBY_PERCIVAL.txt").write_text("Percival Quimby QMB77123\n")
    r = _run(inp, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any(d.exists() for d in planted), [d for d in planted if d.exists()]
    assert cli("verify", str(out), DEIDFLOW_KEY=KEY).returncode == 0


# ------------------------------------------------------------------------------------------------
# The demo deletes only what a demo made
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["input", "release", "release_restricted"])
def test_demo_never_deletes_folders_it_did_not_make(tmp_path, what):
    """`deidflow demo --dest DIR` removed DIR/input, DIR/release and DIR/release_restricted
    whatever they were: `--dest /data` deleted a real export, a release and its mappings."""
    real = tmp_path / what / "MUELLER_HANS" / "scan.dcm"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real export")
    r = cli("demo", "--dest", str(tmp_path), "--set", "face.method=none", timeout=600)
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-800:])
    assert r.stderr.startswith(f"deidflow: error: demo: {tmp_path / what} exists and no earlier demo made it")
    assert real.read_bytes() == b"a real export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [what]


def test_an_earlier_demo_is_recognised(tmp_path):
    from deidflow.cli import DEMO_MARK, _made_by_demo
    assert not _made_by_demo(tmp_path)
    (tmp_path / "release_restricted").mkdir()
    (tmp_path / "release_restricted" / "run.json").write_text('{"command": ["deidflow", "run", "a", "b"]}')
    assert not _made_by_demo(tmp_path)
    (tmp_path / "release_restricted" / "run.json").write_text('{"command": ["deidflow", "demo", "--dest", "x"]}')
    assert _made_by_demo(tmp_path)  # a demo made before the mark existed
    (tmp_path / "release_restricted" / "run.json").unlink()
    (tmp_path / DEMO_MARK).write_text("")
    assert _made_by_demo(tmp_path)


def test_restricted_folder_that_is_someone_elses_is_refused(tmp_path):
    """`--restricted /work` (a shared, non-empty folder) was accepted: the run would force it to
    mode 0700, locking its other users out, and write its mappings and logs among their files."""
    inp = tmp_path / "input"
    _dicom_patient(inp, "P", "QUIMBY^PERCIVAL", "QMB77123", "19700101")
    shared = tmp_path / "shared"
    (shared / "project").mkdir(parents=True)
    os.chmod(shared, 0o755)
    r = cli("run", str(inp), str(tmp_path / "release"), "--restricted", str(shared), "--dry-run", DEIDFLOW_KEY=KEY)
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-800:])
    assert r.stderr.startswith(f"deidflow: error: restricted folder {shared} is not empty and no deidflow run wrote it")
    assert shared.stat().st_mode & 0o777 == 0o755 and [p.name for p in shared.iterdir()] == ["project"]
