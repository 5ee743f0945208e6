"""Timing one ``deidflow run`` from the benchmarks (one implementation for every table)."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

KEY = "benchmark-key-0123456789abcdef"


LAST_CPU: list[float] = [0.0]  # CPU seconds (user + system, every process) of the last deidflow_run


def deidflow_run(tree: Path, out: Path, *extra: str, src: Path | None = None,
                 ok: tuple[int, ...] = (0,)) -> float:
    """Wall seconds of ``deidflow run --cores 2`` (with the package and workflow at ``src`` when
    given; its CPU seconds go to ``LAST_CPU``); a run ending with a status not in ``ok`` stops the
    benchmark."""
    env = dict(os.environ, DEIDFLOW_KEY=KEY)
    if src is not None:
        env["PYTHONPATH"] = str(Path(src) / "src")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(tree), str(out), "--cores", "2", *extra],
                       env=env, cwd=src, capture_output=True, text=True)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU[0] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if r.returncode not in ok:
        raise SystemExit(f"deidflow run failed:\n{r.stderr[-3000:]}")
    return dt
