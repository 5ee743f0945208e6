"""Timing one ``deidflow run`` from the benchmarks (one implementation for every table)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

KEY = "benchmark-key-0123456789abcdef"


def deidflow_run(tree: Path, out: Path, *extra: str, src: Path | None = None,
                 ok: tuple[int, ...] = (0,)) -> float:
    """Wall seconds of ``deidflow run --cores 2`` (with the package and workflow at ``src`` when
    given); a run ending with a status not in ``ok`` stops the benchmark."""
    env = dict(os.environ, DEIDFLOW_KEY=KEY)
    if src is not None:
        env["PYTHONPATH"] = str(Path(src) / "src")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(tree), str(out), "--cores", "2", *extra],
                       env=env, cwd=src, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode not in ok:
        raise SystemExit(f"deidflow run failed:\n{r.stderr[-3000:]}")
    return dt
