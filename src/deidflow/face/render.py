"""QC pictures of the face stage, drawn with numpy only (no GPU, no display) and written as PNG.

* :func:`front_view` — the skin surface seen from the front: a ray cast along the anterior axis
  that stops at the first voxel brighter than the skin threshold, shaded by depth and by the
  surface normal, so eyes, nose and mouth are recognisable before defacing and gone after.
* :func:`slices_view` — sagittal, coronal and axial mid-slices of the processed image with the
  removed region outlined in red.

Arrays are RAS-ordered (:class:`~deidflow.face.volume.Volume`); pixels are resampled to square
millimetres so anisotropic 2D series look like heads.
"""
from __future__ import annotations

import io

import numpy as np

OUTLINE = (255, 40, 40)
MAX_SIDE_PX = 320


def skin_threshold(data: np.ndarray) -> float:
    """Intensity above which a voxel counts as skin: a fraction of a robust maximum."""
    pos = data[data > 0]
    if pos.size == 0:
        return 1.0
    # ``pos`` is a copy: partitioned in place, the same order statistic at half the cost
    return 0.12 * float(np.percentile(pos, 99.5, overwrite_input=True))


def _square_pixels(img: np.ndarray, dy: float, dx: float, order: int) -> np.ndarray:
    """Resample a 2D array with pixel size (dy, dx) mm to about 1 mm square pixels, no larger
    than MAX_SIDE_PX."""
    from scipy import ndimage
    h, w = img.shape[:2]
    scale = min(1.0, MAX_SIDE_PX / max(h * dy, w * dx))
    zy, zx = dy * scale, dx * scale
    if np.isclose(zy, 1) and np.isclose(zx, 1):
        return img
    factors = (zy, zx) + (1,) * (img.ndim - 2)
    return ndimage.zoom(img, factors, order=order, mode="nearest", grid_mode=True)


def front_view(data: np.ndarray, zooms, threshold: float) -> np.ndarray:
    """Depth-shaded surface seen from the front (uint8 grey, superior up, patient's right on the
    viewer's left); ``data`` is RAS-ordered, ``zooms`` its voxel sizes."""
    from scipy import ndimage
    zx, zy, zz = (float(z) for z in zooms[:3])
    hit = data > threshold                      # (x, y, z); anterior = increasing y
    any_hit = hit.any(axis=1)
    # index of the most anterior hit along y, as depth from the front in mm
    first_from_front = np.argmax(hit[:, ::-1, :], axis=1)
    depth = first_from_front.astype(np.float32) * zy
    depth = np.where(any_hit, depth, np.nan)
    finite = depth[np.isfinite(depth)]
    if finite.size == 0:
        return np.zeros((16, 16), np.uint8)
    near, far = float(finite.min()), float(np.percentile(finite, 95, overwrite_input=True))
    d = np.where(np.isfinite(depth), depth, far + 30.0)
    d = ndimage.gaussian_filter(d, sigma=(1.0 / zx, 1.0 / zz))
    gx = np.gradient(d, zx, axis=0)
    gz = np.gradient(d, zz, axis=1)
    nrm = np.sqrt(gx ** 2 + gz ** 2 + 1.0)
    # surface normal towards the viewer is (-dD/dx, -dD/dz, 1); light from the front, a little above
    light = np.array([0.2, 0.4, 0.894])
    lam = np.clip((-gx * light[0] - gz * light[1] + light[2]) / nrm, 0, 1)
    fade = np.clip(1.0 - (d - near) / max(far - near + 20.0, 1.0), 0.15, 1.0)
    shade = np.where(any_hit, 0.15 + 0.85 * lam * fade, 0.0)
    img = (np.clip(shade, 0, 1) * 255).astype(np.uint8)    # (x, z)
    img = img[::-1, ::-1].T                                 # rows: superior→inferior; cols: R→L as seen from the front
    img = img[:, ::-1]                                      # viewer faces the patient: patient's right on viewer's left
    return _square_pixels(img, zz, zx, order=1)


def _window(slice_: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((slice_ - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, border_value=1)  # no line along the image border


def slices_view(data: np.ndarray, removed: np.ndarray, zooms, center=None) -> np.ndarray:
    """Three mid-slices (sagittal, coronal, axial) of RAS ``data`` side by side, RGB uint8, with the
    boundary of ``removed`` drawn in red."""
    zx, zy, zz = (float(z) for z in zooms[:3])
    cx, cy, cz = (np.array(data.shape) // 2) if center is None else center
    pos = data[data > 0]
    hi = float(np.percentile(pos, 99.5, overwrite_input=True)) if pos.size else 1.0
    panels = []
    # sagittal: rows S→I, cols A→P (anterior on the left); coronal: rows S→I, cols R→L as seen
    # from the front...; axial: rows A→P, cols R→L (radiological).
    views = [
        (data[cx, :, :], removed[cx, :, :], zy, zz),        # (y, z)
        (data[:, cy, :], removed[:, cy, :], zx, zz),        # (x, z)
        (data[:, :, cz], removed[:, :, cz], zx, zy),        # (x, y)
    ]
    for k, (img, rem, d0, d1) in enumerate(views):
        if k < 2:   # (h-axis, z) -> rows superior first, cols: anterior / patient right first
            img, rem = img[::-1, ::-1].T, rem[::-1, ::-1].T
            if k == 1:
                img, rem = img[:, ::-1], rem[:, ::-1]
            dy, dx = d1, d0
        else:       # (x, y) -> rows anterior first, cols patient right first
            img, rem = img[:, ::-1].T, rem[:, ::-1].T
            dy, dx = d1, d0
        grey = _window(img, 0.0, hi)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        rgb = _square_pixels(rgb, dy, dx, order=1)
        line = _square_pixels(_outline(rem).astype(np.uint8), dy, dx, order=0).astype(bool)
        line = _outline(_square_pixels(rem.astype(np.uint8), dy, dx, order=0).astype(bool)) | line
        rgb[line] = OUTLINE
        panels.append(rgb)
    h = max(p.shape[0] for p in panels)
    gap = np.zeros((h, 4, 3), np.uint8)
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    h = max(left.shape[0], right.shape[0])
    pad = [np.pad(x, ((0, h - x.shape[0]), (0, 0))) for x in (left, right)]
    return np.concatenate([pad[0], np.zeros((h, 4), np.uint8), pad[1]], axis=1)


def png_bytes(img: np.ndarray) -> bytes:
    """PNG encoding without time or version chunks (same pixels, same bytes)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
