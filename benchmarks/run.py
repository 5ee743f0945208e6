"""`make bench`: throughput and overhead of deidflow, each against a baseline measured in the same run.

Tables printed:
1. inventory files/s (one core) on >= 2,000 real-header files;
2. DICOM engine files/s (one core, default profile) vs plain pydicom read+write of the same files;
3. `deidflow run --cores 2` wall time vs the library's own time for the same work (Snakemake overhead);
4. dry-run DAG construction for 1,000 synthetic subjects.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from trees import real_header_tree, tiny_subject_tree  # noqa: E402

from deidflow import inventory  # noqa: E402
from deidflow.dicom import Scrubber, SubjectContext  # noqa: E402
from deidflow.dicomio import deidentify_file  # noqa: E402
from deidflow.profile import build_plan  # noqa: E402
from deidflow.pseudonym import Pseudonymizer  # noqa: E402
from deidflow.release import deidentify_subject  # noqa: E402

KEY = "benchmark-key-0123456789abcdef"


def table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def bench_inventory(tree: Path) -> tuple[float, float, int]:
    ps = Pseudonymizer(KEY.encode())
    for f in tree.rglob("*.dcm"):  # warm the page cache: we measure parsing, not the disk
        f.read_bytes()
    t = time.perf_counter()
    inv = inventory.build(tree, ps)
    dt = time.perf_counter() - t
    return len(inv.rows) / dt, dt, len(inv.rows)


def bench_engine(tree: Path, scratch: Path) -> tuple[float, float, int]:
    files = sorted(tree.rglob("*.dcm"))
    plan = build_plan()
    ps = Pseudonymizer(KEY.encode())
    sc = Scrubber(plan, SubjectContext(ps, "sub-bench000", -100))
    out = scratch / "engine.dcm"
    t = time.perf_counter()
    for f in files:
        with open(out, "wb") as fh:
            deidentify_file(f, fh, sc)
    engine = len(files) / (time.perf_counter() - t)
    t = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).save_as(out)
    baseline = len(files) / (time.perf_counter() - t)
    return engine, baseline, len(files)


def library_time(tree: Path, scratch: Path) -> tuple[float, list[float]]:
    """Inventory + per-subject de-identification in one process: (inventory s, [subject s])."""
    os.environ["DEIDFLOW_KEY"] = KEY
    restricted = scratch / "lib_restricted"
    restricted.mkdir(mode=0o700)
    t = time.perf_counter()
    inv = inventory.build(tree, Pseudonymizer(KEY.encode()))
    inventory.write(inv, restricted)
    t_inv = time.perf_counter() - t
    settings = {"options": [], "private": "remove", "overrides": [], "pseudonym_length": 8,
                "date_offset_days": [-365, -1], "mapping_csv": "", "key_file": ""}
    times = []
    for s in inv.subjects:
        t = time.perf_counter()
        deidentify_subject(restricted / "manifests" / f"{s}.json", scratch / "lib_release" / s, restricted,
                           restricted / "audit" / f"{s}.jsonl", restricted / "w" / s / "u.csv",
                           restricted / "w" / s / "q.tsv", settings)
        times.append(time.perf_counter() - t)
    return t_inv, times


def two_core_makespan(times: list[float]) -> float:
    """Longest-processing-time schedule of the subject jobs on 2 cores."""
    cores = [0.0, 0.0]
    for t in sorted(times, reverse=True):
        cores[cores.index(min(cores))] += t
    return max(cores)


def deidflow_run(tree: Path, out: Path, *extra: str) -> float:
    env = dict(os.environ, DEIDFLOW_KEY=KEY)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(tree), str(out), "--cores", "2", *extra],
                       env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"deidflow run failed:\n{r.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=30, help="fake patients in the real-header tree (70 files each)")
    ap.add_argument("--dag-subjects", type=int, default=1000)
    ap.add_argument("--work", default=os.environ.get("DEIDFLOW_BENCH_DIR", tempfile.gettempdir() + "/deidflow-bench"))
    args = ap.parse_args()
    work = Path(args.work)
    source = ROOT.parent / "shared" / "data" / "dcm_qa_decubitus" / "In"
    if not source.is_dir():
        raise SystemExit(f"benchmark needs {source} (../shared/data beside the clone)")
    tree = work / "decubitus_tree"
    n = real_header_tree(source, tree, args.patients)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        inv_rate, inv_s, inv_n = bench_inventory(tree)
        table(f"1. Inventory (one core, {inv_n} real-header files)",
              [("measure", "value", "target"), ("files/s", f"{inv_rate:,.0f}", ">= 2,000"),
               ("seconds", f"{inv_s:.2f}", "")])
        engine, base, nf = bench_engine(tree, scratch)
        table(f"2. DICOM engine vs plain pydicom (one core, {nf} files, default profile)",
              [("measure", "files/s"), ("deidflow engine", f"{engine:,.0f}"),
               ("pydicom dcmread+save_as", f"{base:,.0f}"), ("ratio engine/pydicom", f"{engine / base:.2f}x (target >= 1.0x)")])
        t_inv, subj = library_time(tree, scratch)
        ideal = t_inv + two_core_makespan(subj)
        wall = deidflow_run(tree, scratch / "release")
        overhead = max(0.0, wall - ideal) / wall
        table(f"3. deidflow run --cores 2 ({n} files, {len(subj)} subjects)",
              [("measure", "seconds"), ("library in one process (inventory + all subjects)", f"{t_inv + sum(subj):.2f}"),
               ("ideal on 2 cores (inventory + LPT makespan)", f"{ideal:.2f}"),
               ("deidflow run --cores 2 wall", f"{wall:.2f}"),
               ("Snakemake overhead share of wall", f"{overhead:.0%} (target <= 20%)")])
        tiny = work / f"tiny_{args.dag_subjects}"
        tiny_subject_tree(tiny, args.dag_subjects)
        first = deidflow_run(tiny, scratch / "dag_release", "--dry-run")
        second = deidflow_run(tiny, scratch / "dag_release", "--dry-run")
        table(f"4. Dry run, {args.dag_subjects} synthetic subjects",
              [("measure", "seconds", "target"), ("first dry run (inventory + DAG)", f"{first:.2f}", "<= 15"),
               ("repeat dry run (cached inventory)", f"{second:.2f}", "<= 15")])
        print(json.dumps({"inventory_files_per_s": round(inv_rate), "engine_files_per_s": round(engine),
                          "pydicom_files_per_s": round(base), "run_wall_s": round(wall, 2),
                          "ideal_s": round(ideal, 2), "overhead": round(overhead, 3),
                          "dry_run_first_s": round(first, 2), "dry_run_repeat_s": round(second, 2)}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
