"""The release gate's cost (issue 14): staging and publishing on the 30-patient real-header tree.

Every per-unit stage writes into <restricted>/staging/<unit>/ and a publish job per unit moves
each verified subject's folders into the release by rename. Printed: the run's wall time, the
seconds spent inside the publish jobs (their own records in restricted/done/publish*), and, with
``--baseline-src`` (a checkout of deidflow from before the gate, whose stages published into the
release themselves), the same run of that version, alternating, median of ``--reps`` pairs.
Target: publishing and staging <= 5 % of the run's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tables import table  # noqa: E402
from runs import deidflow_run  # noqa: E402
from trees import real_header_tree  # noqa: E402

SETTINGS = ("--set", "face.method=none")  # the face stage has its own benchmark


def run(src: Path, tree: Path, out: Path) -> float:
    """Wall seconds of ``deidflow run --cores 2`` with the package and workflow at ``src``."""
    return deidflow_run(tree, out, *SETTINGS, src=src, ok=(0, 3))


def publish_seconds(restricted: Path) -> float:
    """Seconds spent inside the publish jobs, from their own records."""
    done = restricted / "done"
    records = [*sorted((done / "publish").glob("*.json")), done / "publish_dataset.json"]
    return sum(json.loads(p.read_text()).get("seconds", 0.0) for p in records if p.exists())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=30)
    ap.add_argument("--studies", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline-src", help="a deidflow checkout from before the release gate")
    ap.add_argument("--work", default=os.environ.get("DEIDFLOW_BENCH_DIR", tempfile.gettempdir() + "/deidflow-bench"))
    args = ap.parse_args()
    source = ROOT.parent / "shared" / "data" / "dcm_qa_decubitus" / "In"
    if not source.is_dir():
        raise SystemExit(f"benchmark needs {source} (../shared/data beside the clone)")
    work = Path(args.work)
    tree = work / f"decubitus_{args.patients}x{args.studies}"
    n = real_header_tree(source, tree, args.patients, args.studies)
    scratch = Path(tempfile.mkdtemp(prefix="publish-", dir=work))
    new, old, inside = [], [], []
    try:
        for i in range(args.reps):
            pairs = [("new", ROOT)] + ([("old", Path(args.baseline_src))] if args.baseline_src else [])
            for name, src in (pairs if i % 2 == 0 else pairs[::-1]):
                out = scratch / f"{name}-{i}"
                dt = run(src, tree, out)
                (new if name == "new" else old).append(dt)
                if name == "new":
                    inside.append(publish_seconds(out.with_name(out.name + "_restricted")))
                shutil.rmtree(out)
                shutil.rmtree(out.with_name(out.name + "_restricted"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall, pub = statistics.median(new), statistics.median(inside)
    rows = [("measure", "seconds", "share of the run"),
            ("deidflow run --cores 2 (staging + publish)", f"{wall:.2f}", "100 %"),
            ("inside the publish jobs (rename per subject folder)", f"{pub:.3f}", f"{100 * pub / wall:.2f} % (target <= 5 %)")]
    if old:
        base = statistics.median(old)
        rows.append(("same run, version before the gate (baseline)", f"{base:.2f}",
                     f"gate costs {100 * (wall - base) / base:+.1f} % (target <= 5 %)"))
    table(f"7. Release gate: staging and publishing ({n} files, {args.patients} subjects; median of {args.reps})",
          rows)


if __name__ == "__main__":
    main()
