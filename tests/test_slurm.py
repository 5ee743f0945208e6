"""SLURM integration: a one-node SLURM on localhost (Debian's slurm-wlm and munge, installed here if
missing), the demo through `deidflow run --profile profiles/slurm`, and a release byte-identical to a
local run with the same key.  Fails with the reason in CI, skips with it elsewhere."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


from .conftest import ROOT, TEST_KEY, debian_program

pytestmark = [pytest.mark.workflow, pytest.mark.slow, pytest.mark.slurm]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SLURM_CONF = Path("/etc/slurm/slurm.conf")


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"SLURM test cannot run: {reason}")
    pytest.skip(f"SLURM test cannot run: {reason}")


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode:
        _unavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r


def _install() -> None:
    for tool in ("slurmctld", "slurmd", "sbatch"):
        debian_program(tool, "slurm-wlm", "SLURM test", "munge")
    debian_program("munged", "munge", "SLURM test")


def _conf(state: Path, host: str) -> str:
    return f"""ClusterName=deidflowtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={state}/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
MpiDefault=none
NodeName={host} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start munged, slurmctld and slurmd for one node; stop them and restore /etc/slurm after."""
    _install()
    state = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (state / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    backup = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_conf(state, host))
    started: list[Path] = []
    munge_pid = None
    try:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _sh("mungekey", "--create")
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
        if _sh("munge", "-n", check=False).returncode:  # no munged running yet
            _sh("munged", "--force", "--pid-file", str(state / "munged.pid"))
            munge_pid = state / "munged.pid"
        _sh("slurmctld", "-f", str(SLURM_CONF))
        started.append(state / "slurmctld.pid")
        _sh("slurmd", "-f", str(SLURM_CONF))
        started.append(state / "slurmd.pid")
        for _ in range(60):
            info = _sh("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if info in ("idle", "mixed"):
                break
            time.sleep(0.5)
        else:
            _unavailable(f"node did not become idle (sinfo: {info!r}); see {state}/slurmd.log")
        yield state
    finally:
        for pidfile in [*started, *([munge_pid] if munge_pid else [])]:
            try:
                os.kill(int(pidfile.read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        if backup is None:
            SLURM_CONF.unlink(missing_ok=True)
        else:
            SLURM_CONF.write_bytes(backup)




def _run(inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    if "--profile" in extra:
        if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
            _unavailable("the SLURM executor plugin is not installed (run make install)")
    return subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
                           "--set", "jobs.files_per_job=0", *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".snakemake_timestamp"}


def test_demo_through_slurm_matches_local_run(slurm, demo_export, tmp_path):
    inp = demo_export
    local = _run(inp, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    t = time.perf_counter()
    r = _run(inp, tmp_path / "cluster", "--profile", str(ROOT / "profiles" / "slurm"), "--", "--restart-times", "0")
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    subjects = sorted(p.name for p in (tmp_path / "cluster" / "sourcedata" / "dicom").iterdir())
    jobs = [ln for ln in (slurm / "jobcomp.log").read_text().splitlines() if "JobState=COMPLETED" in ln]
    assert len(jobs) >= len(subjects) == 5, f"{len(jobs)} SLURM jobs for {len(subjects)} subjects"
    assert _hashes(tmp_path / "cluster") == _hashes(tmp_path / "local")
    assert elapsed < 300


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice (PyYAML keeps the last one silently)."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").iterdir()))
def test_profiles_parse_without_duplicate_keys(profile):
    cfg = yaml.load((ROOT / "profiles" / profile / "config.yaml").read_text(), Loader=_StrictLoader)
    assert isinstance(cfg, dict) and cfg


def test_per_unit_rules_scale_memory_and_runtime_with_attempts():
    """Every rule of the per-unit group asks for attempt-scaled memory and runtime from config
    `resources.*` (a retried job killed for its limits gets more), the same locally and on SLURM."""
    import re
    rules = {}
    for f in sorted((ROOT / "rules").glob("*.smk")):
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", f.read_text(), re.S | re.M):
            rules[m.group(1)] = m.group(2)
    unit = {name: body for name, body in rules.items() if re.search(r'group:\s*"unit"', body)}
    assert {"dicom", "other", "convert", "face", "verify"} <= set(unit)
    for name, body in unit.items():
        for res in ("mem_mb", "runtime"):
            assert re.search(rf'{res}=attempt_scaled\(config\["resources"\]\["{name}_\w+"\]\)', body), (name, res)
    assert "set-resources" not in (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
