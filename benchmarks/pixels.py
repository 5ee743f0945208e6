"""Clean Pixel Data (`make bench`): the JSL pseudo-PHI set through ``pixels.clean: auto``, the
screen's cost on a text-free MR tree, and real text-free series.

JSL: for each policy the per-file table gives the ground-truth PHI boxes removed (>= 90 % of a
box's pixels changed), the files with a PHI box of which no pixel changed, and the share of
pixels outside every ground-truth box that changed.  Screening cost: the ``dicom`` stage
(``deidentify_unit``, one core) over the 30-patient real-header MR tree (2,100 frames, no text)
with ``pixels.clean: off`` and ``auto``, alternating, median of 3 pairs; the screen's own seconds
come from the facts files.  Speed:
the cleaner (two renderings, detection + recognition, write-back) with one ONNX/OpenCV thread,
against the baseline of the same files only decoded and written back by pydicom, and all_text
with every detected box read by the recognizer (what it did before only the boxes whose reading
decides something were read), both measured in the same run.  Real NIfTI / Analyze / MINC volumes:
the ``other`` stage's burned-in text screen against reading their voxels with nibabel.  The machine
is shared: repeat for stable numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
JSL = SHARED / "jsl_pseudo_phi"
KEY = "benchmark-key-0123456789abcdef"
SETTINGS = {"options": [], "private": "remove", "overrides": [], "pseudonym_length": 8,
            "date_offset_days": [-365, -1], "mapping_csv": "", "key_file": ""}
CLEAN_SERIES = ("dcm_qa_decubitus/In", "dcm_qa_ct_ge/In", "dcm_qa_xa30/In/5_anat-T1w_acq-tfl",
                "dcm_qa_xa30/In/6_anat-T1w_acq-tfl", "dcm_qa_ge/In")


def dicom_stage(tree: Path, scratch: Path, clean: str) -> tuple[float, dict]:
    """Seconds of the dicom stage over ``tree`` (inventory outside the timing) and the totals of
    the pixel facts (series, frames, screened frames, detector runs, screen seconds, boxes)."""
    from deidflow import inventory
    from deidflow.pseudonym import Pseudonymizer
    from deidflow.release import deidentify_unit
    os.environ["DEIDFLOW_KEY"] = KEY
    work = Path(tempfile.mkdtemp(dir=scratch))
    restricted = work / "restricted"
    restricted.mkdir(mode=0o700)
    inv = inventory.build(tree, Pseudonymizer(KEY.encode()))
    inventory.write(inv, restricted)
    settings = dict(SETTINGS, pixels={"clean": clean, "policy": "all_text"})
    t = time.perf_counter()
    for s in inv.subjects:
        mf = restricted / "manifests" / f"{s}.json"
        w = restricted / "w" / s
        deidentify_unit(mf, work / "release" / "sourcedata" / "dicom", restricted, w / "done.json", w / "u.csv",
                        w / "q.jsonl", settings)
    wall = time.perf_counter() - t
    tot = {"series": 0, "frames": 0, "screened_frames": 0, "sampled_frames": 0, "detector_runs": 0,
           "screen_seconds": 0.0, "boxes": 0, "text_found": 0}
    for f in (restricted / "pixels").glob("*.json"):
        for x in json.loads(f.read_text())["series"]:
            tot["series"] += 1
            tot["text_found"] += bool(x["text_found"])
            for k in ("frames", "screened_frames", "sampled_frames", "detector_runs", "screen_seconds", "boxes"):
                tot[k] += x[k]
    shutil.rmtree(work)
    return wall, tot


def bench_screen(scratch: Path, reps: int = 3) -> None:
    """The screen's share of the dicom stage on the 30-patient MR tree (no burned-in text)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trees import real_header_tree
    source = SHARED / "dcm_qa_decubitus" / "In"
    tree = Path(os.environ.get("DEIDFLOW_BENCH_DIR", tempfile.gettempdir() + "/deidflow-bench")) / "decubitus_30x1"
    n = real_header_tree(source, tree, 30, 1)
    for f in tree.rglob("*.dcm"):
        f.read_bytes()
    pairs, facts = [], {}
    for i in range(reps):
        times = {}
        for mode in (("off", "auto") if i % 2 == 0 else ("auto", "off")):
            times[mode], tot = dicom_stage(tree, scratch, mode)
            if mode == "auto":
                facts = tot
        pairs.append((times["off"], times["auto"]))
    off = statistics.median(a for a, _ in pairs)
    auto = statistics.median(b for _, b in pairs)
    print(f"\nScreening cost, dicom stage on one core ({n} files, 30 MR subjects, 2 series each, "
          f"no text; median of {reps} alternating pairs)")
    print(f"{'measure':58s} {'value':>12s}")
    rows = [("dicom stage, pixels.clean: off (baseline), s", f"{off:.2f}"),
            ("dicom stage, pixels.clean: auto, s", f"{auto:.2f}"),
            ("difference: share of the auto stage", f"{max(0.0, auto - off) / auto:.1%} (target <= 15%)"),
            ("screen's own seconds (facts files), last auto run", f"{facts['screen_seconds']:.2f}"),
            ("screen's share of the auto stage", f"{facts['screen_seconds'] / auto:.1%}"),
            ("series screened / with text found", f"{facts['series']} / {facts['text_found']}"),
            ("frames in screened series", f"{facts['frames']}"),
            ("frames compared (sample) / through the detector",
             f"{facts['sampled_frames']} / {facts['screened_frames']}"),
            ("frames screened per second, one core", f"{facts['frames'] / max(1e-9, facts['screen_seconds']):,.0f}"),
            ("boxes redacted (must be 0)", f"{facts['boxes']}"),
            ("each pair off/auto, s", "  ".join(f"{a:.1f}/{b:.1f}" for a, b in pairs))]
    for what, v in rows:
        print(f"{what:58s} {v:>12s}")


def bench_clean_series(scratch: Path) -> None:
    """Real MR/CT series without text: screened, nothing found, nothing redacted."""
    from deidflow.pixels.clean import PixelCleaner
    from deidflow.pixels.qc import SubjectPixelsQC
    from deidflow.pixels.subject import SubjectPixels
    print("\nReal text-free series (../shared/data), pixels.clean: auto")
    print(f"{'folder':36s} {'series':>6s} {'frames':>7s} {'detector':>8s} {'text':>5s} {'boxes':>6s} {'s':>6s}")
    for rel in CLEAN_SERIES:
        folder = SHARED / rel
        if not folder.is_dir():
            continue
        work = Path(tempfile.mkdtemp(dir=scratch))
        cleaner = PixelCleaner({"clean": "auto"}, thumbnails=False)
        sp = SubjectPixels(cleaner, "sub-B", SubjectPixelsQC("sub-B"))
        series: dict[str, list] = {}
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                h = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:
                continue
            if "Rows" in h and "SeriesInstanceUID" in h:
                series.setdefault(h.SeriesInstanceUID, []).append((f, h))
        staged = []
        for k, (uid, members) in enumerate(sorted(series.items())):
            members.sort(key=lambda m: int(m[1].get("InstanceNumber") or 0))
            for i, (f, h) in enumerate(members):
                dst = work / f"{k}_{i}.dcm"
                shutil.copyfile(f, dst)
                staged.append((str(f), f"sub-B/ses-1/S{k}/{i:04d}.dcm", dst, h))
        t = time.perf_counter()
        for src, name, dst, h in staged:
            sp.add(src, name, dst, h, {})
        sp.finish(work / "restricted")
        dt = time.perf_counter() - t
        facts = sp.series
        print(f"{rel[:36]:36s} {len(facts):>6d} {sum(x['frames'] for x in facts):>7d} "
              f"{sum(x['screened_frames'] for x in facts):>8d} {sum(bool(x['text_found']) for x in facts):>5d} "
              f"{sum(x['boxes'] for x in facts):>6d} {dt:>6.2f}")
        shutil.rmtree(work)


REAL_VOLUMES = ("mricron/chris_t1.nii.gz", "dcm_qa_xa30/Ref/5_anat-T1w_acq-tfl.nii",
                "dcm_qa_ge/Ref/Ax_fMRI_HB3_48sl_int_asc_14.nii", "dcm_qa_ge/Ref/Ax_DWI_TENSOR_R2_1.nii",
                "analyze_spm99/canonical/single_subj_T1.hdr", "nibabel/minc2-4d-d.mnc")


def bench_volumes() -> None:
    """Real volumes the ``other`` stage releases, screened for burned-in text
    (:func:`deidflow.pixels.volumes.text_in_volume`, one thread), against the baseline of
    reading their voxels with nibabel; best of 3 each (the OCR models loaded before)."""
    import nibabel as nib
    import numpy as np
    from deidflow.pixels import ocr
    from deidflow.pixels.volumes import text_in_volume
    ocr.engine(1)
    print("\nBurned-in text screen of real NIfTI / Analyze / MINC volumes, one thread (best of 3)")
    print(f"{'volume':46s} {'shape':>18s} {'read s':>7s} {'screen s':>9s} {'text':>5s}")
    for rel in REAL_VOLUMES:
        path = SHARED / rel
        if not path.is_file():
            continue
        read, spent, where = [], [], None
        for _ in range(3):
            t = time.perf_counter()
            img = nib.load(str(path))
            np.asanyarray(img.dataobj)
            read.append(time.perf_counter() - t)
            t = time.perf_counter()
            where = text_in_volume(path)
            spent.append(time.perf_counter() - t)
        shape = "x".join(str(d) for d in img.shape)
        print(f"{rel[-46:]:46s} {shape:>18s} {min(read):>7.2f} {min(spent):>9.2f} {'yes' if where else 'no':>5s}")


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
        for policy in ("identifiers_only", "all_text"):
            clean._READ_CACHE.clear()  # time each policy with its own OCR
            scores, spent = run_ground_truth_set(JSL, Path(tmp) / policy, {"clean": "auto", "policy": policy})
            print(table(scores, f"\nJSL pseudo-PHI, pixels.clean = auto (screen, then clean), "
                                f"pixels.policy = {policy}"))
            rows.append((f"screen + cleaner, auto, {policy}", len(scores), spent))
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
    with tempfile.TemporaryDirectory() as tmp:
        bench_screen(Path(tmp))
        bench_clean_series(Path(tmp))
    bench_volumes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
