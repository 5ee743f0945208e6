"""Where the ink of a detected text line is: redaction boxes cut to the text's own rows.

The detector's boxes reach about half a line height above and below the letters (DBNet grows
its text kernels), so a blanked box changes about twice the pixels the text covers.  With
``identifiers_only`` only the identifying lines are blanked and the rest of the image is meant
to stay, so each box is cut to the rows its letters occupy: burned-in text is drawn at (or very
near) an extreme of the frame's range, so within the box the pixels at the box's brightest
level (or its darkest) form horizontal bands, one per text line.  A polarity counts only when
its pixels really form such bands (together at most :data:`COVER` of the box's height, with
few pixels of that level outside them); bands touching the box's top or bottom edge are
neighbouring lines cut by the box, not this box's text.  Each band is kept with a margin (a
little above the capitals, more below for descenders).  Whenever the evidence is not clear
— no band, every band on an edge, a textured background at the text's level — the whole box
is kept: cutting is an optimisation, never a risk.  Boxes are never widened and never cut
horizontally.
"""
from __future__ import annotations

import numpy as np

from .layout import Box

LEVEL = 0.02  # pixels within this share of the box's range of its extreme are "at that level"
ROW_SHARE = 0.15  # a row belongs to a band when it holds this share of the busiest row's pixels
COVER = 0.7  # bands together cover at most this share of the box height
STRAY = 0.1  # pixels at the level outside the bands: at most this share of those inside
TOP, TOP_MIN = 0.10, 1  # margin above a band: share of its height, at least this many pixels
BOTTOM, BOTTOM_MIN = 0.25, 2  # below (descenders, commas)


def text_rows(gray: np.ndarray, box: Box) -> list[Box]:
    """``box`` cut to the bands of rows its text occupies (``gray``: the frame on one scale,
    e.g. :func:`deidflow.pixels.render.normalized`); ``[box]`` when that is not clear."""
    x0, y0, x1, y1 = box
    region = gray[y0:y1, x0:x1]
    if region.size == 0:
        return [box]
    lo, hi = float(region.min()), float(region.max())
    if hi - lo < 1:
        return [box]
    tol = LEVEL * (hi - lo)
    h = region.shape[0]
    spans: list[tuple[int, int]] = []
    for mask in (region >= hi - tol, region <= lo + tol):
        found = _bands(mask)
        if found:
            spans += found
    inner = [(a, z) for a, z in spans if a > 0 and z < h]
    if not inner:
        return [box]  # no band of its own: the box's text was not told apart from the background
    tallest = max(z - a for a, z in inner)
    spans = inner + [(a, z) for a, z in spans if (a == 0 or z == h) and z - a > tallest]
    merged: list[list[int]] = []
    for a, z in sorted(spans):
        n = z - a
        a, z = max(0, a - max(TOP_MIN, round(TOP * n))), min(h, z + max(BOTTOM_MIN, round(BOTTOM * n)))
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], z)
        else:
            merged.append([a, z])
    return [(x0, y0 + a, x1, y0 + z) for a, z in merged]


def _bands(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """Row bands (start, stop) of ``mask`` when its pixels form text-line bands, else None."""
    rows = mask.sum(axis=1)
    peak = int(rows.max())
    if peak < 3:
        return None
    busy = rows >= max(2, ROW_SHARE * peak)
    runs: list[list[int]] = []
    for i in np.flatnonzero(busy):
        if runs and i - runs[-1][1] <= 1:  # a one-row gap stays inside a line
            runs[-1][1] = int(i) + 1
        else:
            runs.append([int(i), int(i) + 1])
    inside = sum(int(rows[a:z].sum()) for a, z in runs)
    if sum(z - a for a, z in runs) > COVER * mask.shape[0] or int(rows.sum()) - inside > STRAY * inside:
        return None
    return [(a, z) for a, z in runs]


NEAR_V, NEAR_H = 1.0, 2.0  # a stray glyph lies within these many line heights of a found line
MAX_GLYPH_AREA = 0.5  # stray glyphs together cover at most this share of the found lines' area
GLYPH_H, GLYPH_W = 1.5, 3.0  # and is at most this tall and wide (in line heights)
GLYPH_PAD = 0.5  # margin around a stray glyph, in line heights of the found text


def stray_glyphs(gray: np.ndarray, lines: list[Box]) -> list[Box]:
    """Letters and short lines at the ink level of the text found that the detector missed next
    to it (a one-letter value after its label, a small line above a block): glyph-sized connected
    pieces of pixels at the level of the found lines' ink (their brightest or darkest level,
    whichever forms text bands), within a line height above or below or two beside a found line;
    none when they would cover more than MAX_GLYPH_AREA of the found lines' area (the ink level is
    then shared with the image).  ``lines``: the
    detector's line boxes in frame pixels; returns boxes around each such piece with a margin of
    GLYPH_PAD line heights."""
    import cv2
    if not lines:
        return []
    levels: list[tuple[float, float]] = []
    heights = []
    for x0, y0, x1, y1 in lines:
        region = gray[y0:y1, x0:x1]
        if region.size == 0:
            continue
        lo, hi = float(region.min()), float(region.max())
        if hi - lo < 1:
            continue
        tol = LEVEL * (hi - lo)
        for mask, rng in ((region >= hi - tol, (hi - tol, hi)), (region <= lo + tol, (lo, lo + tol))):
            bands = _bands(mask)
            if bands:
                levels.append(rng)
                heights += [z - a for a, z in bands]
    if not levels or not heights:
        return []
    line_h = float(np.median(heights))
    ink = np.zeros(gray.shape, np.uint8)
    for a, z in set(levels):
        ink |= ((gray >= a) & (gray <= z)).astype(np.uint8)
    n, _, st, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    glyphs = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in st[i])
        if h <= GLYPH_H * line_h and w <= GLYPH_W * line_h and area >= 2 and h >= 2:
            glyphs.append((x, y, x + w, y + h))
    taken = [g for g in glyphs
             if any(_near(g, b, max(1, b[3] - b[1])) for b in lines)
             and not any(b[0] <= g[0] and g[2] <= b[2] and b[1] <= g[1] and g[3] <= b[3] for b in lines)]
    # pixels at the ink level all over the image (bright bone, a dark background) are not text:
    # then nothing is added (the glyphs found would be anatomy as often as letters)
    if sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in taken) > MAX_GLYPH_AREA * sum(
            (x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in lines):
        return []
    m = max(1, round(GLYPH_PAD * line_h))  # as much margin as a found line gets
    H, W = gray.shape
    return [(max(0, x0 - m), max(0, y0 - m), min(W, x1 + m), min(H, y1 + m)) for x0, y0, x1, y1 in taken]


def _near(box: Box, anchor: Box, lh: int) -> bool:
    dv = max(anchor[1] - box[3], box[1] - anchor[3], 0)
    dh = max(anchor[0] - box[2], box[0] - anchor[2], 0)
    return dv <= NEAR_V * lh and dh <= NEAR_H * lh
