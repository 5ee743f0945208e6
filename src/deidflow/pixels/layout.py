"""Geometry of redaction boxes: padding, merging detections, grouping lines into text blocks."""
from __future__ import annotations

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

PAD = 0.3  # of the line height, on every side (all_text)
PAD_LINE = 0.1  # identifiers_only: the detector's boxes already reach ~0.4 heights beyond the ink


def pad(box: Box, shape: tuple[int, int], frac: float = PAD) -> Box:
    """``box`` grown by ``frac`` of its height (at least one pixel) on every side, clipped."""
    x0, y0, x1, y1 = box
    p = max(1, round((y1 - y0) * frac))
    return max(0, x0 - p), max(0, y0 - p), min(shape[1], x1 + p), min(shape[0], y1 + p)


def clip(box: Box, shape: tuple[int, int]) -> Box | None:
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(shape[1], box[2]), min(shape[0], box[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def area(b: Box) -> int:
    return max(0, b[2] - b[0]) * max(0, b[3] - b[1])


def intersection(a: Box, b: Box) -> int:
    return area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def same_text(a: Box, b: Box) -> bool:
    """Two detections of one text (from two renderings): they overlap by half the smaller box."""
    inter = intersection(a, b)
    return inter > 0 and inter >= 0.5 * min(area(a), area(b))


def _near(a: Box, ha: int, b: Box, hb: int) -> bool:
    """Parts of one text block (``ha``, ``hb``: their line heights): lines of similar height
    stacked with a gap under one line height and overlapping horizontally (or left-aligned),
    or on one line with a gap under two heights."""
    h = max(ha, hb)
    if h > 2 * min(ha, hb):
        return False
    vgap = max(a[1], b[1]) - min(a[3], b[3])
    hgap = max(a[0], b[0]) - min(a[2], b[2])
    if vgap <= 0.9 * h and (hgap < 0 or abs(a[0] - b[0]) <= h):
        return True
    vover = min(a[3], b[3]) - max(a[1], b[1])
    return vover > 0.5 * min(ha, hb) and hgap <= 2 * h


def blocks(boxes: list[Box]) -> list[Box]:
    """Merge text lines into blocks (the rectangle of each group of neighbouring lines).

    With ``all_text`` the whole block is blanked: the gaps between the lines of an annotation
    block carry no image information worth keeping, and a value wrapped onto a second line,
    or drawn a little off the detected line, is still covered."""
    groups = [(tuple(b), b[3] - b[1]) for b in boxes]
    changed = True
    while changed:
        changed = False
        out: list[tuple[Box, int]] = []
        for box, h in groups:
            for k, (obox, oh) in enumerate(out):
                if _near(box, h, obox, oh):
                    out[k] = (union(box, obox), max(h, oh))
                    changed = True
                    break
            else:
                out.append((box, h))
        groups = out
    return sorted(box for box, _ in groups)
