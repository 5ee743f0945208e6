"""``quickshear`` defacing (Schimke & Hale, 2011): a plane tangent to the brain mask's convex
hull, seen from the side, and shifted by a margin, cuts off everything in front of and below it.

The brain mask comes from deepbet (:mod:`deidflow.face.deepbet_strip`). Works in millimetres, so
voxel size and anisotropic 2D series do not change the cut's geometry."""
from __future__ import annotations

import numpy as np

from .volume import Volume

MARGIN_MM = 10.0


def _lower_hull(points: np.ndarray) -> np.ndarray:
    """Lower convex hull (monotone chain) of 2D points sorted by x then y."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append((float(p[0]), float(p[1])))
    return np.array(hull)


def shear_mask(brain: np.ndarray, zooms, margin_mm: float = MARGIN_MM) -> np.ndarray:
    """Boolean RAS mask of the region in front of and below the quickshear plane.

    The brain is projected onto the sagittal (y = anterior, z = superior) plane; the cut line is
    the edge of the lower hull of that outline which faces the face (the one whose outward normal
    points most towards anterior-inferior), moved ``margin_mm`` away from the brain.
    """
    if not brain.any():
        raise ValueError("empty brain mask: cannot place the quickshear plane")
    zy, zz = float(zooms[1]), float(zooms[2])
    proj = brain.any(axis=0)                                   # (y, z)
    ys, zs = np.nonzero(proj)
    # points in mm with x := -y: the face (anterior-inferior) side of the brain is on the lower hull
    pts = np.unique(np.stack([-(ys * zy), zs * zz], axis=1), axis=0)
    hull = _lower_hull(pts)
    best, best_score = None, -np.inf
    for (x1, z1), (x2, z2) in zip(hull[:-1], hull[1:]):
        d = np.array([x2 - x1, z2 - z1])
        n = np.array([d[1], -d[0]]) / np.linalg.norm(d)      # lower hull: outward normal points down
        # in (x = -y, z) coordinates anterior-inferior is (-1, -1): pick the edge facing it
        score = float(n @ (np.array([-1.0, -1.0]) / np.sqrt(2)))
        if score > best_score:
            best, best_score = (np.array([x1, z1]), n), score
    p0, n = best
    ny, nz = brain.shape[1], brain.shape[2]
    yy, zz_ = np.meshgrid(np.arange(ny) * zy, np.arange(nz) * zz, indexing="ij")
    dist = (-yy - p0[0]) * n[0] + (zz_ - p0[1]) * n[1]        # signed distance, > 0 outside the hull edge
    cut2d = dist > margin_mm
    return np.broadcast_to(cut2d[None, :, :], brain.shape).copy()


class Quickshear:
    """Defacing by the quickshear plane of the deepbet brain mask."""

    name = "quickshear"
    methods = ("deface",)

    def removal_mask(self, vol: Volume) -> np.ndarray:
        from .ants_deface import check_orientation
        from .deepbet_strip import brain_mask
        check_orientation(vol.data, vol.affine)   # the plane is cut on the side the header calls the front
        return shear_mask(brain_mask(vol), vol.zooms)
