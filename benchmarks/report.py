"""`make bench`: the QC report's build time against the run that writes it, at growing dataset sizes.

For the 30-patient real-header tree (2,100 Siemens MR files, benchmarks/trees.py) and trees of
1,000 and 5,000 one-file subjects, one header-path ``deidflow run --cores 2`` (no BIDS, no
defacing: the run the report is largest against) is timed, then the report is rebuilt from that
run's folders: gathering the facts, rendering both pages, the pre-write self-check (the leak scan
of the page, ``leakscan.text_hits``) and the whole ``write_report`` (median of ``--reps``).  Target:
the whole report is at most 10 % of the run at every size (issue 21; 5 % on the 30-patient tree,
issue 19), and the page stays usable (paged tables, detail sections only for subjects with a
finding beyond 200 subjects).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tables import table  # noqa: E402
from runs import deidflow_run  # noqa: E402
from trees import real_header_tree, tiny_subject_tree  # noqa: E402

from deidflow.qc import leakscan, report  # noqa: E402

HEADER_PATH = ("--set", "outputs.bids=false", "--set", "face.method=none")


def run(tree: Path, out: Path) -> float:
    return deidflow_run(tree, out, *HEADER_PATH, ok=(0, 3))


def report_times(release: Path, restricted: Path, reps: int) -> dict[str, float]:
    """Median seconds of gathering and rendering (``reps`` times), and of the self-check and the
    whole ``write_report`` (once each: the self-check is the slow part at thousands of subjects)."""
    qc = release / report.QC_SUBDIR
    gather, render = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        facts = report.build(release, restricted)
        t1 = time.perf_counter()
        page, svgs = report.render(facts)
        gather.append(t1 - t0)
        render.append(time.perf_counter() - t1)
    t2 = time.perf_counter()
    report._check_public(restricted, facts, {"report.html": page, **svgs}, leakscan.dataset_matcher(restricted))
    t3 = time.perf_counter()
    report.write_report(release, restricted, qc / "report.html",
                        f"{qc / 'files_per_modality.svg'},{qc / 'actions_per_attribute.svg'}",
                        qc / "subjects.tsv", restricted / "qc" / "report-full.html")
    t4 = time.perf_counter()
    return {"gather": statistics.median(gather), "render": statistics.median(render), "self-check": t3 - t2,
            "write_report": t4 - t3, "bytes": len(page.encode())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=30, help="patients of the real-header tree (70 files each)")
    ap.add_argument("--subjects", type=int, nargs="*", default=[1000, 5000], help="one-file subject trees")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default=os.environ.get("DEIDFLOW_BENCH_DIR", tempfile.gettempdir() + "/deidflow-bench"))
    args = ap.parse_args()
    work = Path(args.work)
    source = ROOT.parent / "shared" / "data" / "dcm_qa_decubitus" / "In"
    trees = []
    if args.patients and source.is_dir():
        tree = work / f"decubitus_{args.patients}x1"
        n = real_header_tree(source, tree, args.patients, 1)
        trees.append((f"{args.patients} patients, {n:,} real-header files", tree))
    elif args.patients:
        print(f"(skipped the real-header tree: {source} is missing)")
    for n in args.subjects:
        tree = work / f"tiny_{n}"
        tiny_subject_tree(tree, n)
        trees.append((f"{n:,} one-file subjects", tree))
    rows = [("tree", "run s", "gather s", "render s", "self-check s", "write_report s", "report / run", "page MB",
             "target")]
    title = (f"8. QC report build vs the header-path run (deidflow run --cores 2, no BIDS, no defacing; "
             f"gather and render median of {args.reps})")
    scratch = Path(tempfile.mkdtemp(prefix="report-", dir=work))
    try:
        for label, tree in trees:
            out = scratch / tree.name / "release"
            wall = run(tree, out)
            t = report_times(out, out.with_name("release_restricted"), args.reps)
            target = "<= 5 %" if "real-header" in label else "<= 10 %"
            rows.append((label, f"{wall:.1f}", f"{t['gather']:.2f}", f"{t['render']:.2f}", f"{t['self-check']:.2f}",
                         f"{t['write_report']:.2f}", f"{t['write_report'] / wall:.1%}", f"{t['bytes'] / 1e6:.1f}",
                         target))
            print(" | ".join(rows[-1]), flush=True)  # each size as it finishes (the big ones take a while)
            shutil.rmtree(out.parent, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table(title, rows)


if __name__ == "__main__":
    main()
