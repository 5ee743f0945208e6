"""Clean Pixel Data on the JSL pseudo-PHI set (`make bench`): quality and images/s on one core.

For each policy the per-file table gives the ground-truth PHI boxes removed (>= 90 % of a box's
pixels changed) and the share of pixels outside every ground-truth box that changed.  Speed:
the cleaner (two renderings, detection + recognition, write-back) with one ONNX/OpenCV thread,
against the baseline of the same files only decoded and written back by pydicom, and all_text
with every detected box read by the recognizer (what it did before only the boxes whose reading
decides something were read), both measured in the same run.  The machine is shared: repeat for stable numbers.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
JSL = ROOT.parent / "shared" / "data" / "jsl_pseudo_phi"


def baseline(files: list[Path], scratch: Path) -> float:
    """Seconds to decode every file's pixels and write the file back with pydicom."""
    t = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.pixel_array  # noqa: B018 - the decode is what is measured
        ds.save_as(scratch / f.name)
    return time.perf_counter() - t


def main() -> int:
    if not JSL.is_dir():
        print(f"pixels benchmark skipped: {JSL} is missing")
        return 0
    from deidflow.pixels import clean
    from deidflow.pixels.evaluate import run_ground_truth_set, table
    files = sorted(JSL.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline(files, Path(tmp))
        rows = []
        for policy in ("all_text", "identifiers_only"):
            clean._READ_CACHE.clear()  # time each policy with its own OCR
            scores, spent = run_ground_truth_set(JSL, Path(tmp) / policy, {"clean": "always", "policy": policy})
            print(table(scores, f"\nJSL pseudo-PHI, pixels.policy = {policy} (pixels.clean = always)"))
            rows.append((f"cleaner, {policy}", len(scores), spent))
        # the same run's baseline for all_text: every detected box also read by the recognizer
        # (as before recognition was limited to the boxes whose reading decides something)
        clean._READ_CACHE.clear()
        lazy = clean.PixelCleaner._read
        clean.PixelCleaner._read = lambda self, frame, invert, shape, text=True: lazy(self, frame, invert, shape, True)
        try:
            scores, spent = run_ground_truth_set(JSL, Path(tmp) / "all_read", {"clean": "always", "policy": "all_text"})
        finally:
            clean.PixelCleaner._read = lazy
        rows.insert(0, ("cleaner, all_text, every box read", len(scores), spent))
    print("\nClean Pixel Data throughput, one core (ONNX and OpenCV with 1 thread)")
    print(f"{'what':36s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
    print(f"{'pydicom decode + write (baseline)':36s} {len(files):>7d} {base:>8.2f} {len(files) / base:>9.2f}")
    for what, n, spent in rows:
        print(f"{what:36s} {n:>7d} {spent:>8.2f} {n / spent:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
