"""Timing one ``deidflow run`` from the benchmarks (one implementation for every table)."""
from __future__ import annotations

import os
import threading
import subprocess
import sys
import time
from pathlib import Path

KEY = "benchmark-key-0123456789abcdef"


LAST_CPU: list[float] = [0.0]  # CPU seconds (user + system, every process) of the last deidflow_run


def _sample_cpu(proc: subprocess.Popen, cpu: dict[tuple[int, float], float]) -> None:
    """CPU seconds of ``proc`` and every descendant, sampled every 0.2 s until it ends (the jobs
    the fork server starts are reaped by nobody, so the parent's rusage never sees them; a
    process's last 0.2 s may be missed)."""
    import psutil
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                c = p.cpu_times()
                cpu[p.pid, p.create_time()] = c.user + c.system
            except psutil.Error:
                pass
        time.sleep(0.2)


def deidflow_run(tree: Path, out: Path, *extra: str, src: Path | None = None,
                 ok: tuple[int, ...] = (0,)) -> float:
    """Wall seconds of ``deidflow run --cores 2`` (with the package and workflow at ``src`` when
    given; its CPU seconds go to ``LAST_CPU``); a run ending with a status not in ``ok`` stops the
    benchmark."""
    env = dict(os.environ, DEIDFLOW_KEY=KEY)
    if src is not None:
        env["PYTHONPATH"] = str(Path(src) / "src")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "deidflow.cli", "run", str(tree), str(out), "--cores", "2", *extra],
                            env=env, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu: dict[tuple[int, float], float] = {}
    sampler = threading.Thread(target=_sample_cpu, args=(proc, cpu), daemon=True)
    sampler.start()
    stderr = proc.communicate()[1]
    dt = time.perf_counter() - t
    sampler.join()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, None, stderr)
    LAST_CPU[0] = sum(cpu.values())
    if r.returncode not in ok:
        raise SystemExit(f"deidflow run failed:\n{r.stderr[-3000:]}")
    return dt
