"""`make bench`, start-up tricks: what each one saves on whole runs, faces on and off.

Each variant is a whole ``deidflow run --cores 2`` in alternating rounds (the same tree, fresh output
folders, page cache warm):

* ``no zygote``  — ``DEIDFLOW_NO_ZYGOTE=1``: every job starts a fresh interpreter (no fork server);
* ``all tricks, again`` — the same code as ``all tricks``: how far two identical variants drift
  apart on this machine (a trick whose gain is within that is not measurable).

A trick stays when it pays >= 5 % of the run's wall time (docs/design-notes.md, which also lists the
tricks removed: the forked inventory, the private SLURM plugin folder, ``os._exit`` at the end of
the console script). Figures are medians of the rounds; the load average is printed, since the
machine may be shared.

    python benchmarks/startup.py [--rounds 3] [--faces-tree PATH] [--header-tree PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tables import table  # noqa: E402
from trees import real_header_tree  # noqa: E402

KEY = "benchmark-key-0123456789abcdef"
HEADER_PATH = ["--set", "outputs.bids=false", "--set", "face.method=none", "--set", "pixels.clean=off"]

RUN_ALL = "import sys; from deidflow.cli import console_main; sys.argv = ['deidflow'] + sys.argv[1:]; console_main()"
VARIANTS = {  # name -> (python code, extra environment)
    "all tricks": (RUN_ALL, {}),
    "no zygote": (RUN_ALL, {"DEIDFLOW_NO_ZYGOTE": "1"}),
    "all tricks, again": (RUN_ALL, {}),
}


def one_run(code: str, extra_env: dict, tree: Path, scratch: Path, args: list[str]) -> float:
    work = Path(tempfile.mkdtemp(dir=scratch))
    env = dict(os.environ, DEIDFLOW_KEY=KEY, **extra_env)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, "run", str(tree), str(work / "release"), "--cores", "2", *args],
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    if r.returncode not in (0, 3):
        raise SystemExit(f"run failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall


def measure(tree: Path, scratch: Path, args: list[str], rounds: int) -> dict[str, list[float]]:
    for f in tree.rglob("*.dcm"):
        f.read_bytes()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            code, env = VARIANTS[name]
            times[name].append(one_run(code, env, tree, scratch, args))
    return times


def rows_of(times: dict[str, list[float]]) -> list[tuple]:
    base = statistics.median(times["all tricks"])
    rows = [("variant", "median s", "gain of the trick", "runs")]
    for name, ts in times.items():
        med = statistics.median(ts)
        gain = "" if name == "all tricks" else f"{(med - base) / med:+.1%} of wall"
        rows.append((name, f"{med:.1f}", gain, " ".join(f"{t:.1f}" for t in ts)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--patients", type=int, default=6, help="patients of the generated tree (one study each)")
    ap.add_argument("--faces-patients", type=int, default=2, help="patients of the faces-on tree")
    ap.add_argument("--only-header", action="store_true", help="only the faces-off table")
    ap.add_argument("--work", default=os.environ.get("DEIDFLOW_BENCH_DIR", tempfile.gettempdir() + "/deidflow-bench"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = ROOT.parent / "shared" / "data" / "dcm_qa_decubitus" / "In"
    scratch = Path(tempfile.mkdtemp(prefix="startup-", dir=work))
    try:
        for label, patients, extra in (("faces off: header path", args.patients, HEADER_PATH),
                                       ("faces on: default run", args.faces_patients, [])
                                       )[: 1 if args.only_header else 2]:
            tree = work / f"decubitus_{patients}x1"
            n = real_header_tree(source, tree, patients, 1)
            load = os.getloadavg()[0]
            times = measure(tree, scratch, extra, args.rounds)
            table(f"Start-up tricks, {label} ({n} files, {patients} patients, --cores 2, {args.rounds} alternating "
                  f"rounds; load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
                  rows_of(times))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
