"""The job fork server (deidflow.zygote): jobs run in its children with their own streams, folder,
environment and exit status, die with their job process, and fall back to running in their own
process when the server cannot be reached."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deidflow import zygote

from .conftest import ROOT


@pytest.fixture
def server():
    pid, path = zygote.start()
    yield path
    zygote.stop(pid, path)
    assert not os.path.exists(path)


def _job(args: list[str], cwd: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deidflow.jobs", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _strict_args(tmp: Path, quarantined: list[str]) -> list[str]:
    q = tmp / "quarantine.tsv"
    q.write_text("file\treason\n" + "".join(f"{f}\tbad\n" for f in quarantined))
    return ["strict", "--quarantine", str(q), "--output", "ok.txt", "--log", str(tmp / "job.log")]


def test_job_runs_in_a_server_child_with_its_folder_environment_and_status(server, tmp_path):
    env = dict(os.environ, **{zygote.ENV: server, "PYTHONPATH": str(ROOT / "src")})
    work = tmp_path / "cwd"
    work.mkdir()
    ok = _job(_strict_args(tmp_path, []), work, env)
    assert ok.wait(60) == 0
    assert (work / "ok.txt").read_text() == "no quarantined files\n"  # relative path: the job's folder
    failing = _job(_strict_args(tmp_path, ["a.dcm"]), work, env)
    out, err = failing.communicate(timeout=60)
    assert failing.returncode != 0
    assert "strict" in err  # the job's stderr reached the job process's stream
    assert "1 input file(s) quarantined" in (tmp_path / "job.log").read_text()


def test_job_falls_back_to_its_own_process_without_a_server(tmp_path):
    env = dict(os.environ, **{zygote.ENV: str(tmp_path / "no-such-socket")})
    work = tmp_path / "cwd"
    work.mkdir()
    assert _job(_strict_args(tmp_path, []), work, env).wait(60) == 0
    assert (work / "ok.txt").exists()


def test_killing_the_job_process_ends_the_job(server, tmp_path):
    """Snakemake kills a job by killing its process: the server's child must not go on."""
    fifo = tmp_path / "uids.list"
    os.mkfifo(fifo)
    qlist = tmp_path / "q.list"
    qlist.write_text("")
    env = dict(os.environ, **{zygote.ENV: server})
    out = tmp_path / "uids.csv"
    proc = _job(["mapping", "--uids-list", str(fifo), "--quarantine-list", str(qlist), "--uids", str(out),
                 "--quarantine", str(tmp_path / "q.tsv"), "--log", str(tmp_path / "m.log")], tmp_path, env)
    time.sleep(1.0)  # the child now blocks reading the FIFO
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(0.5)
    # Open the FIFO's write end without blocking forever: succeeds only if a reader is still there.
    opened = threading.Event()

    def writer():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        opened.set()
        os.close(fd)

    writer()
    assert not opened.is_set(), "the job went on after its process was killed"
    assert not out.exists()
