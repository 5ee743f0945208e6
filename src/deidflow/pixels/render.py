"""8-bit renderings of one frame for text detection.

Burned-in text is drawn at or near the extremes of the stored range, and the header's window
(VOI LUT) often hides it (the window is chosen for anatomy; on the JSL test set it clips the
text entirely), so the window used here is the frame's own stored range.  Two tone curves
over that window are used: a shadow-lifting logarithm (dark text on dark, noisy backgrounds)
and its mirror, a highlight-lifting one (bright text on bright anatomy).  Colour frames are
reduced to the maximum over channels, which keeps coloured (yellow, green) text bright.
"""
from __future__ import annotations

import numpy as np

_GAIN = 50.0
_LUT_LOG = (np.log1p(np.linspace(0, 1, 1024) * _GAIN) / np.log1p(_GAIN) * 255).astype(np.uint8)
_LUT_ILOG = (255 - _LUT_LOG[::-1]).astype(np.uint8)
CURVES = ("shadows", "highlights")


def gray_of(frame: np.ndarray) -> np.ndarray:
    """Single-channel view of a frame for detection (max over colour channels)."""
    return frame.max(axis=-1) if frame.ndim == 3 else frame


def normalized(gray: np.ndarray, invert: bool = False) -> np.ndarray:
    """The frame scaled to 0..1023 over its own min..max (integer LUT index)."""
    g = gray.astype(np.float32, copy=False)
    lo, hi = float(g.min()), float(g.max())
    idx = np.zeros(g.shape, np.int16) if hi <= lo else ((g - lo) * (1023.0 / (hi - lo))).astype(np.int16)
    return 1023 - idx if invert else idx


def renderings(frame: np.ndarray, invert: bool = False) -> dict[str, np.ndarray]:
    """``{curve: uint8 image}`` for detection; ``invert`` for MONOCHROME1."""
    idx = normalized(gray_of(frame), invert)
    return {"shadows": _LUT_LOG[idx], "highlights": _LUT_ILOG[idx]}


def display(frame: np.ndarray, invert: bool = False) -> np.ndarray:
    """A plain linear 8-bit rendering (RGB frames as they are) for QC thumbnails."""
    if frame.ndim == 3 and frame.dtype == np.uint8:
        return frame
    if frame.ndim == 3:
        f = frame.astype(np.float32)
        lo, hi = float(f.min()), float(f.max())
        return np.zeros(frame.shape, np.uint8) if hi <= lo else ((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return (normalized(frame, invert) >> 2).astype(np.uint8)
