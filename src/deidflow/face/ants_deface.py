"""``ants`` defacing: register pydeface's head template to the subject and remove its face mask.

The template (``mean_reg2mean.nii.gz``) and face mask (``facemask.nii.gz``, 0 on the face) are the
data files of the MIT-licensed ``pydeface`` wheel, read with :mod:`importlib.resources`; pydeface's
code (which needs FSL) is never imported. Registration is ANTs' affine (rigid + scale + shear,
centre-of-mass initialisation, Mattes mutual information) between 4 mm copies of the two images,
single-threaded with a fixed seed so the same input always gives the same mask; the face mask is
then resampled onto the subject's own grid.

The removed region is the warped face mask, extended to the front: in every anterior-posterior
column that the mask touches, everything in front of the mask's deepest voxel goes too, so a nose
or chin that the affine fit left outside the template's mask cannot survive.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .volume import Volume

REG_MM = 4.0
SEED = 20240917


def _ants():
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # deterministic; 4 mm images are small
    import ants
    ants.config.set_ants_deterministic(True, SEED)
    return ants


def to_ants(ants, data: np.ndarray, affine: np.ndarray):
    """An ANTs image (LPS physical space) of a RAS-ordered array with a NIfTI (RAS) affine."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ (affine[:3, :3] / zooms)
    origin = flip @ affine[:3, 3]
    return ants.from_numpy(np.asarray(data, dtype=np.float32), origin=tuple(float(v) for v in origin),
                           spacing=tuple(float(v) for v in zooms), direction=direction)


@lru_cache(maxsize=1)
def _template():
    """(template at REG_MM, face mask at full resolution) as ANTs images, read once per process."""
    from importlib.resources import as_file, files
    ants = _ants()
    data = files("pydeface") / "data"
    with as_file(data / "mean_reg2mean.nii.gz") as t, as_file(data / "facemask.nii.gz") as m:
        tpl = ants.image_read(str(t)).astype("float32")
        face = ants.image_read(str(m)).astype("float32")
    small = ants.resample_image(tpl, (REG_MM,) * 3, use_voxels=False, interp_type=0)
    return small, face


def template_files_present() -> bool:
    """Whether pydeface's data files are installed (found without importing pydeface)."""
    import importlib.util
    spec = importlib.util.find_spec("pydeface")
    if spec is None or not spec.submodule_search_locations:
        return False
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return (data / "mean_reg2mean.nii.gz").is_file() and (data / "facemask.nii.gz").is_file()


def register(vol: Volume):
    """The affine transform file(s) mapping the template onto ``vol`` (ANTs forward transforms)."""
    ants = _ants()
    tpl_small, _ = _template()
    sub = to_ants(ants, vol.data, vol.affine)
    spacing = tuple(max(REG_MM, float(z)) for z in vol.zooms)
    sub_small = ants.resample_image(sub, spacing, use_voxels=False, interp_type=0)
    reg = ants.registration(fixed=sub_small, moving=tpl_small, type_of_transform="Affine",
                            aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=0.25,
                            aff_iterations=(200, 100, 50), aff_shrink_factors=(4, 2, 1),
                            aff_smoothing_sigmas=(2, 1, 0))
    return sub, reg["fwdtransforms"]


def face_mask(vol: Volume) -> np.ndarray:
    """Boolean RAS mask of the face region of ``vol`` (True = remove)."""
    ants = _ants()
    sub, transforms = register(vol)
    _, face = _template()
    try:
        warped = ants.apply_transforms(fixed=sub, moving=face, transformlist=transforms,
                                       interpolator="linear", defaultvalue=1.0)
    finally:
        for t in transforms:
            try:
                os.unlink(t)
            except OSError:
                pass
    region = warped.numpy() < 0.5
    return extend_to_front(region)


def extend_to_front(region: np.ndarray) -> np.ndarray:
    """Also remove everything anterior to the region's deepest voxel in each (x, z) column."""
    if not region.any():
        return region
    ny = region.shape[1]
    touched = region.any(axis=1)                          # (x, z)
    deepest = np.argmax(region, axis=1)                   # smallest y (most posterior) per column
    y = np.arange(ny)[None, :, None]
    return region | (touched[:, None, :] & (y >= deepest[:, None, :]))


class AntsDeface:
    """Defacing by template registration (no torch)."""

    name = "ants"
    methods = ("deface",)

    def removal_mask(self, vol: Volume) -> np.ndarray:
        return face_mask(vol)
