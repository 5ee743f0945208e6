"""Image geometry for the face stage: every backend works on a RAS-oriented 3D reference volume;
masks go back to the image's own voxel order (any orientation, oblique affines included), and
are applied to every volume of a 4D image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_RAS = np.array([[0, 1], [1, 1], [2, 1]])


@dataclass(frozen=True)
class Volume:
    """A 3D reference volume in RAS voxel order.

    ``data`` is float32 (real values after scaling), ``affine`` maps its voxel indices to RAS mm
    (it may still be oblique: only axis order and direction are normalised). ``native_ornt`` is
    the orientation of the image it came from (nibabel ``io_orientation``) and ``native_shape``
    that image's 3D shape.
    """

    data: np.ndarray
    affine: np.ndarray
    native_ornt: np.ndarray
    native_shape: tuple[int, int, int]

    @property
    def zooms(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def to_native(self, mask: np.ndarray) -> np.ndarray:
        """A RAS-ordered 3D array back in the original image's voxel order."""
        from nibabel.orientations import apply_orientation, ornt_transform
        out = apply_orientation(mask, ornt_transform(_RAS, self.native_ornt))
        assert out.shape == self.native_shape
        return np.ascontiguousarray(out)


def reference_volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    """The RAS reference volume of an image's real-valued ``data`` (3D, or 4D: its first volume;
    a 2D slice counts as a 3D image of one slice)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[..., None]
    ref = data if data.ndim == 3 else data.reshape(data.shape[:3] + (-1,))[..., 0]
    ornt = io_orientation(affine)
    to_ras = ornt_transform(ornt, _RAS)
    ras = np.ascontiguousarray(apply_orientation(ref, to_ras), dtype=np.float32)
    ras_affine = affine @ inv_ornt_aff(to_ras, ref.shape)
    return Volume(np.nan_to_num(ras, copy=False), ras_affine, ornt, tuple(ref.shape))


def head_mask(vol: Volume) -> np.ndarray:
    """Voxels of the head (tissue above the background noise), holes filled, in RAS order.

    Used by QC renders and by the quickshear backend's plausibility check; a simple threshold at
    a fraction of a robust maximum is enough for MRI, whose background is dark."""
    from scipy import ndimage
    d = vol.data
    hi = float(np.percentile(d[d > 0], 99.5, overwrite_input=True)) if np.any(d > 0) else 0.0
    if hi <= 0:
        return np.zeros(d.shape, bool)
    m = d > 0.1 * hi
    m = ndimage.binary_opening(m, iterations=1)
    labels, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        m = labels == sizes.argmax()
    return m


# Head CT for the registration backends: Hounsfield units mapped to a T1-like contrast (air dark,
# fat bright, soft tissue and brain mid-grey, bone dark), so that the MRI template registers on it
# and the skin threshold of the QC renders and the plausibility check (a fraction of the robust
# maximum) falls at about -370 HU, between air and skin.
CT_HU = (-1000.0, -400.0, -200.0, -100.0, -20.0, 20.0, 90.0, 300.0, 3000.0)
CT_T1_LIKE = (0.0, 0.0, 0.9, 1.0, 0.55, 0.6, 0.6, 0.15, 0.1)
CT_AIR_HU = -1000.0


def for_backend(vol: Volume, modality: str) -> Volume:
    """The volume the backends see: CT in T1-like contrast (:data:`CT_HU` → :data:`CT_T1_LIKE`),
    anything else as it is."""
    if modality.upper() != "CT":
        return vol
    data = np.interp(vol.data, CT_HU, CT_T1_LIKE).astype(np.float32)
    return Volume(data, vol.affine, vol.native_ornt, vol.native_shape)


def removed_value(modality: str) -> float:
    """The real value of removed voxels: 0 (MRI background), air for CT."""
    return CT_AIR_HU if modality.upper() == "CT" else 0.0


HEAD_CROP_MM = 250.0   # a field of view longer than this (head to foot) is cut to its top for registration


def head_part(vol: Volume, threshold: float) -> int:
    """First RAS slice (along S) of the part of ``vol`` a head template should be registered to:
    0 for a head-sized field of view; for a longer one (neck, trunk, whole body) the top
    :data:`HEAD_CROP_MM` of the tissue, so that the template meets the head and not the body."""
    tissue = (vol.data > threshold).any(axis=(0, 1))
    if not tissue.any():
        return 0
    zs = np.flatnonzero(tissue)
    dz = float(vol.zooms[2])
    if (zs[-1] - zs[0] + 1) * dz <= HEAD_CROP_MM + 20.0:
        return 0
    return max(0, int(zs[-1] - round(HEAD_CROP_MM / dz)))


def crop(vol: Volume, z0: int) -> Volume:
    """The slices from ``z0`` up (RAS), with the affine that keeps them in place."""
    if z0 == 0:
        return vol
    affine = vol.affine.copy()
    affine[:3, 3] = affine[:3, 3] + z0 * affine[:3, 2]
    return Volume(np.ascontiguousarray(vol.data[:, :, z0:]), affine, vol.native_ornt, vol.native_shape)
