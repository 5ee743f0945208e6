"""Faults: killed runs resume to identical bytes, the input is never written, the key never leaks,
and a full or read-only release fails the job cleanly and recovers."""
from __future__ import annotations

import hashlib
import os
import random
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
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cli(*args: str, key: str = TEST_KEY, **kw) -> subprocess.Popen:
    env = dict(os.environ, DEIDFLOW_KEY=key)
    return subprocess.Popen([sys.executable, "-m", "deidflow.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def run(*args: str, key: str = TEST_KEY) -> subprocess.CompletedProcess:
    p = cli(*args, key=key)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def tree_state(root: Path, with_meta: bool = False) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.name.endswith(".snakemake_timestamp"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        if with_meta:
            st = p.lstat()
            out[rel + "#meta"] = f"{st.st_mode:o}:{st.st_mtime_ns}"
    return out


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        msg = f"cannot mount ({' '.join(args)}): {r.stderr.strip()} — these fault tests need root"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def reference(demo_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "release"
    r = run("run", str(demo_export), str(out), "--cores", "2", "--set", "jobs.files_per_job=0")
    assert r.returncode == 0, r.stderr[-2000:]
    return tree_state(out)


def test_kill_and_resume_gives_identical_release(demo_export, reference, tmp_path):
    """SIGKILL the whole run at 5 random moments; each time, nothing partial is visible in the
    release, and running again completes with bytes identical to an uninterrupted run."""
    rng = random.Random(20261125)
    out = tmp_path / "release"
    kills = 0
    for attempt in range(5):
        p = cli("run", str(demo_export), str(out), "--cores", "2", "--set", "jobs.files_per_job=0")
        time.sleep(rng.uniform(0.3, 2.5))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.communicate()
        if out.exists():  # whatever is visible must be complete
            for f in out.rglob("*"):
                assert not f.name.startswith((".tmp-", ".staging-", ".trash-")), f
                if f.suffix == ".dcm":
                    pydicom.dcmread(f)
    assert kills >= 3, "the random delays should interrupt most runs"
    r = run("run", str(demo_export), str(out), "--cores", "2", "--set", "jobs.files_per_job=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_state(out) == reference


def test_input_read_only_and_unchanged(demo_export, reference, tmp_path):
    """The input is bind-mounted read-only: the run succeeds and the tree is bit-for-bit unchanged."""
    ro = tmp_path / "ro_input"
    ro.mkdir()
    before = tree_state(demo_export, with_meta=True)
    mount("--bind", str(demo_export), str(ro))
    try:
        mount("-o", "remount,bind,ro", str(ro))
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        r = run("run", str(ro), str(tmp_path / "release"), "--cores", "2", "--set", "jobs.files_per_job=0")
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    assert tree_state(demo_export, with_meta=True) == before
    assert tree_state(tmp_path / "release") == reference


def test_key_never_written_or_shown(demo_export, tmp_path):
    key = "KEYMARKER-" + "7f3a9c" * 6
    out = tmp_path / "release"
    seen: list[str] = []
    p = cli("run", str(demo_export), str(out), "--cores", "2", key=key)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    stdout, stderr = p.communicate(timeout=600)
    stop.set()
    t.join()
    assert p.returncode == 0, stderr[-2000:]
    assert len(seen) > 3 and not any(key in s for s in seen), "key visible in the process list"
    assert key not in stdout + stderr
    restricted = tmp_path / "release_restricted"
    for root in (out, restricted, ROOT / ".snakemake"):
        for f in root.rglob("*") if root.exists() else ():
            if f.is_file():
                assert key.encode() not in f.read_bytes(), f
    assert restricted.stat().st_mode & 0o777 == 0o700
    for f in restricted.rglob("*"):
        if f.is_file() and ".snakemake" not in f.parts:
            assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"


def test_full_release_disk_fails_cleanly_and_recovers(demo_export, reference, tmp_path):
    """The release sits on a 300 KB file system: the job fails with a clear message, no partial
    file is left in the release, and after making room a rerun completes identically."""
    out_fs = tmp_path / "smallfs"
    out_fs.mkdir()
    mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(out_fs))
    try:
        out = out_fs / "release"
        restricted = tmp_path / "restricted"
        r = run("run", str(demo_export), str(out), "--restricted", str(restricted), "--cores", "2",
                "--set", "jobs.files_per_job=0")
        assert r.returncode != 0
        assert "No space left on device" in r.stdout + r.stderr
        for f in out.rglob("*") if out.exists() else ():
            assert not f.name.startswith((".tmp-", ".staging-", ".trash-")), f
            if f.suffix == ".dcm":
                pydicom.dcmread(f)
        quarantine = restricted / "quarantine.tsv"
        assert not quarantine.exists() or quarantine.read_text() == "file\treason\n"
        subprocess.run(["mount", "-o", "remount,size=20m", str(out_fs)], check=True)
        r = run("run", str(demo_export), str(out), "--restricted", str(restricted), "--cores", "2",
                "--set", "jobs.files_per_job=0")
        assert r.returncode == 0, r.stderr[-2000:]
        assert tree_state(out) == reference
    finally:
        subprocess.run(["umount", str(out_fs)], check=False)


def test_read_only_release_fails_cleanly(demo_export, tmp_path):
    out_fs = tmp_path / "rofs"
    out_fs.mkdir()
    mount("-t", "tmpfs", "-o", "size=20m", "tmpfs", str(out_fs))
    try:
        (out_fs / "release").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(out_fs)], check=True)
        r = run("run", str(demo_export), str(out_fs / "release"), "--restricted", str(tmp_path / "r"),
                "--cores", "2")
        assert r.returncode != 0
        assert "Read-only file system" in r.stdout + r.stderr
    finally:
        subprocess.run(["umount", str(out_fs)], check=False)


def test_restricted_folders_lock_their_own_folders_not_shared_temp(tmp_path):
    """A job run by hand with ``--log /tmp/job.log`` locks nothing shared: a sticky folder (like
    /tmp) keeps its mode; any other folder deidflow writes restricted files into becomes 0700."""
    from deidflow.fsutil import make_restricted_dir
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    make_restricted_dir(shared)
    assert shared.stat().st_mode & 0o7777 == 0o1777
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    make_restricted_dir(own / "logs")
    make_restricted_dir(own)
    assert own.stat().st_mode & 0o777 == 0o700 and (own / "logs").stat().st_mode & 0o777 == 0o700
