"""QC thumbnails of a redacted frame: before (restricted: it shows the burned-in PHI) and after
(released: the redacted frame with the boxes outlined)."""
from __future__ import annotations

import io

import numpy as np

MAX_SIDE = 384


def png(frame8: np.ndarray, boxes, colour=(255, 0, 0)) -> bytes:
    """PNG bytes of a uint8 frame (grey or RGB) with ``boxes`` outlined, at most MAX_SIDE wide/high."""
    from PIL import Image, ImageDraw
    img = Image.fromarray(frame8).convert("RGB")
    draw = ImageDraw.Draw(img)
    w = max(1, round(max(img.size) / MAX_SIDE))
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=w)
    s = MAX_SIDE / max(img.size)
    if s < 1:
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
