"""Shared fixtures. Real data lives in ../shared/data: missing in CI is an error, elsewhere a skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
TEST_KEY = "deidflow-test-key-0123456789abcdef"


def require_shared(*parts: str) -> Path:
    """Path under ../shared/data; fails in CI (CI=true) and skips elsewhere when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        msg = f"real test data {path} is missing (../shared/data must sit beside the clone)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared_data():
    return require_shared


@pytest.fixture(scope="session")
def demo_patients(tmp_path_factory) -> tuple[Path, list]:
    """The demo's raw export (``make_demo_input``) and its patients (``DemoPatient``), made once
    per test session."""
    from deidflow.demo import make_demo_input
    inp = tmp_path_factory.mktemp("demo-export") / "input"
    return inp, make_demo_input(inp)


@pytest.fixture(scope="session")
def demo_export(demo_patients) -> Path:
    """The demo's raw export, shared by the test modules that only read it: a test that adds or
    changes files makes its own."""
    return demo_patients[0]


@pytest.fixture(scope="session")
def demo_release(demo_export, tmp_path_factory) -> dict:
    """``deidflow run`` of ``demo_export`` with the default configuration, TEST_KEY and 2 cores
    (every stage, the head MRI defaced), run once per session for the test modules that only read
    its release and restricted folder (test_bids_workflow, test_qc_leakscan): a test that changes
    them works on a copy."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("demo-release") / "release"
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(demo_export), str(out), "--cores", "2"],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"out": out, "restricted": out.with_name("release_restricted"), "stdout": r.stdout}


@pytest.fixture(scope="session")
def demo_command(tmp_path_factory) -> dict:
    """``deidflow demo --dest <tmp>/d --cores 2`` run once per session on a pseudo-terminal, as a
    user types it (ephemeral key, no $DEIDFLOW_KEY): its exit status, everything it printed and
    its folders. Shared by the tests that only look at that run (its terminal output, its release
    through the BIDS validator)."""
    import pty
    import sys
    base = tmp_path_factory.mktemp("demo-command")
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    env["PYTHONPATH"] = str(ROOT / "src")
    env["COLUMNS"] = "120"
    argv = [sys.executable, "-m", "deidflow.cli", "demo", "--dest", str(base / "d"), "--cores", "2"]
    chunks = []
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(base)
        os.execve(sys.executable, argv, env)
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    return {"base": base, "dest": base / "d", "env": env, "exit": os.waitstatus_to_exitcode(status),
            "text": b"".join(chunks).decode("utf-8", "replace")}


@pytest.fixture
def key_env(monkeypatch):
    """A fixed secret key in $DEIDFLOW_KEY."""
    monkeypatch.setenv("DEIDFLOW_KEY", TEST_KEY)
    return TEST_KEY.encode()


def identifier_in(value: str, blob: bytes, name: str = "") -> bool:
    """Whether ``value`` occurs in ``blob`` (UTF-8 or Latin-1) or in the path ``name``. Values
    shorter than 6 characters count only as whole tokens ("MARY" is inside "PRIMARY")."""
    import re
    if len(value) < 6:
        token = r"(?<![A-Za-z0-9]){}(?![A-Za-z0-9])"
        if name and re.search(token.format(re.escape(value)), name):
            return True
    elif value in name:
        return True
    for enc in ("utf-8", "latin-1"):
        try:
            b = value.encode(enc)
        except UnicodeEncodeError:
            continue
        if len(value) < 6:
            if re.search(rb"(?<![A-Za-z0-9])" + re.escape(b) + rb"(?![A-Za-z0-9])", blob):
                return True
        elif b in blob:
            return True
    return False


def assert_finished(r, out) -> None:
    """A run that finished: exit 0, or 3 only because input files were quarantined (an unknown
    format, a truncated file) — no subject withheld, no RELEASE_INCOMPLETE marker."""
    import json as _json
    out = Path(out)
    assert r.returncode in (0, 3), (r.stdout or "")[-2000:] + (r.stderr or "")[-3000:]
    assert not (out / "RELEASE_INCOMPLETE").exists(), (r.stdout or "")[-2000:] + (r.stderr or "")[-3000:]
    if r.returncode == 3:
        restricted = out.with_name(out.name + "_restricted")
        withheld = _json.loads((restricted / "withheld.json").read_text())
        assert not withheld["withheld"] and not withheld["published_with_leaks"], withheld
        quarantined = (restricted / "quarantine.tsv").read_text().splitlines()[1:]
        assert quarantined, "exit 3 with nothing quarantined or withheld"


def debian_program(program: str, package: str, what: str, *also: str) -> str:
    """``program`` on PATH, installed from Debian's ``package`` (and the packages ``also``) with
    apt-get when missing (root on a Debian machine); ``what`` names the test in the message when it
    cannot be had: a failure in CI, a skip elsewhere. The suite runs in several pytest-xdist
    workers, so the installs take turns under one lock (apt-get and dpkg refuse a second
    process)."""
    import fcntl
    import shutil
    import subprocess
    import tempfile

    def unavailable(reason: str):
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{what} cannot run: {reason}")
        pytest.skip(f"{what} cannot run: {reason}")

    exe = shutil.which(program)
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable(f"Debian's {package} is not installed and this is not a root Debian machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(os.path.join(tempfile.gettempdir(), "deidflow-tests-apt.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shutil.which(program):  # another worker may have installed it meanwhile
            for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package, *also]):
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode:
                    unavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return shutil.which(program) or unavailable(f"{program} not on PATH after installing {package}")
