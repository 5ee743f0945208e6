"""Red-team round 5: the operational side (key files, input paths, files that change under a run,
restricted folders). Each test failed on the code before the fix it guards (docs/design-notes.md,
"Red-team round 5: operations")."""
from __future__ import annotations

import os
import resource
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
