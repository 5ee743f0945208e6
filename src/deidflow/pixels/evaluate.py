"""Measure a redaction against ground-truth boxes (the JSL pseudo-PHI set's JSON files).

A ground-truth box counts as removed when at least 90 % of its pixels changed; over-redaction
is the share of pixels outside every ground-truth box that changed.  Boxes lying wholly
outside the image (a few JSL annotations do) cannot be in the pixels and are not counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REMOVED = 0.9


@dataclass
class FileScore:
    name: str
    boxes: int  # PHI (value) boxes inside the image
    removed: int
    outside_changed: float  # changed share of the pixels outside all ground-truth boxes
    changed_outside_share: float  # share of the changed pixels that lie outside ground truth
    skipped_boxes: int = 0  # annotated boxes wholly outside the image
    untouched: int = 0  # PHI boxes of which not one pixel changed


def ground_truth(json_path: Path) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """(PHI value boxes, all annotated boxes incl. keys) as inclusive [x0, y0, x1, y1]."""
    ann = json.loads(Path(json_path).read_text())["annotation"]
    values, every = [], []
    for a in ann:
        for part in ("key", "value"):
            b = a.get(part, {}).get("bbox")
            if b and b[2] > b[0] and b[3] > b[1]:
                every.append(tuple(b))
                if part == "value" and a["value"].get("text"):
                    values.append(tuple(b))
    return values, every


def changed_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per-pixel change of frames (``(rows, cols[, samples])``)."""
    d = before != after
    return d.any(axis=-1) if d.ndim == 3 else d


def score(name: str, changed: np.ndarray, values, every) -> FileScore:
    h, w = changed.shape
    gt = np.zeros_like(changed)
    for x0, y0, x1, y1 in every:
        gt[max(0, y0):y1 + 1, max(0, x0):x1 + 1] = True
    n = removed = skipped = untouched = 0
    for x0, y0, x1, y1 in values:
        sub = changed[max(0, y0):min(h, y1 + 1), max(0, x0):min(w, x1 + 1)]
        if sub.size == 0:
            skipped += 1
            continue
        n += 1
        removed += bool(sub.mean() >= REMOVED)
        untouched += not sub.any()
    outside = ~gt
    out_changed = changed & outside
    return FileScore(name, n, removed, float(out_changed.sum() / max(1, outside.sum())),
                     float(out_changed.sum() / max(1, changed.sum())), skipped, untouched)


def run_ground_truth_set(folder: Path, work: Path, settings: dict) -> tuple[list[FileScore], float]:
    """Clean every ``*.dcm`` of ``folder`` that has a ``.json`` of boxes beside it (copies in
    ``work``), score each against its boxes; also the seconds spent in the cleaner.  With
    ``clean: auto`` each file goes through the dicom job's series step (:mod:`.subject`: header
    rules, then the screen) as a series of its own."""
    import shutil
    import time

    import pydicom

    from .clean import PixelCleaner
    from .qc import SubjectPixelsQC
    from .subject import SubjectPixels
    cleaner = PixelCleaner(settings, thumbnails=False)
    auto = cleaner.mode == "auto"
    scores, spent = [], 0.0
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(folder).glob("*.dcm")):
        gt = src.with_suffix(".json")
        if not gt.is_file():
            continue
        dst = work / src.name
        shutil.copyfile(src, dst)
        header = pydicom.dcmread(src, stop_before_pixels=True)
        before = pydicom.dcmread(src).pixel_array
        t = time.perf_counter()
        if auto:
            subject = SubjectPixels(cleaner, "sub-EVAL", SubjectPixelsQC("sub-EVAL"))
            subject.add(src.name, f"sub-EVAL/ses-1/{src.stem}/0001.dcm", dst, header, {})
            subject.finish(work / "restricted")
        else:
            cleaner.process(dst, header)
        spent += time.perf_counter() - t
        after = pydicom.dcmread(dst).pixel_array
        values, every = ground_truth(gt)
        scores.append(score(src.name, changed_mask(before, after), values, every))
    return scores, spent


def table(scores: list[FileScore], title: str) -> str:
    """The per-file table and totals as text."""
    lines = [title, f"{'file':60s} {'removed':>9s} {'outside changed':>16s} {'of changes':>11s}"]
    for s in scores:
        lines.append(f"{s.name[:60]:60s} {s.removed:>4d}/{s.boxes:<4d} {100 * s.outside_changed:>15.2f}% "
                     f"{100 * s.changed_outside_share:>10.0f}%" + (f"  ({s.skipped_boxes} box(es) outside the image)"
                                                                   if s.skipped_boxes else ""))
    lines.append(summary(scores))
    return "\n".join(lines)


def summary(scores: list[FileScore]) -> str:
    boxes = sum(s.boxes for s in scores)
    removed = sum(s.removed for s in scores)
    mean_out = sum(s.outside_changed for s in scores) / max(1, len(scores))
    worst = max((s.outside_changed for s in scores), default=0.0)
    untouched = sum(1 for s in scores if s.untouched)
    return (f"recall {removed}/{boxes} = {removed / max(1, boxes):.3f}; files with a PHI box untouched: "
            f"{untouched}; changed outside ground truth: mean {100 * mean_out:.2f}%, worst file {100 * worst:.2f}%")
