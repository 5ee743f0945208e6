"""``ants`` defacing: register a head template to the subject once, remove the template's face region.

The template data (``data/face_template.npz``, built by ``tools/face_template.py`` from the
MIT-licensed ``pydeface`` wheel's average head and face mask) hold an about 3 mm copy of the
template and the removed region on its 1 mm grid: pydeface's face mask, plus a box over both eyes
(lids and lashes) and both brows, everything in front of that, minus the template brain dilated by
6 mm (docs/face.md).

:class:`HeadRegistration` is the reusable part: :meth:`HeadRegistration.fit` registers the template
to one head (ANTs affine, Mattes mutual information, 6 mm then 3 mm, initialised at the centres of
mass, stopped when the metric stops improving; one thread and a fixed seed, so the same head always
gives the same transform) and :meth:`HeadRegistration.mask_for` gives the removed region on any
voxel grid of that head — a 3D volume, a stack of 2D slices, another series in the same frame of
reference — by looking each voxel up in template space (nearest neighbour; outside the template's
field of view the region continues as at its edge, so a nose or chin beyond it goes too). One
registration per head, however many series or grids share it::

    reg = HeadRegistration.fit(data, affine, modality="MR")   # or "CT"
    removed = reg.mask_for(shape, affine)                      # bool, in that grid's voxel order
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .volume import Volume, reference_volume

REG_MM = 3.0                  # the finest registration level; the coarser one is twice that
SEED = 20240917
SAMPLING = 0.1                # share of the voxels the metric samples (regular grid, seeded perturbation)
CONVERGENCE = "[100x50,1e-5,5]"   # iterations per level, early stop: metric change < 1e-5 over 5 iterations
TEMPLATE_FILE = "face_template.npz"
CT_WINDOW_HU = (-200.0, 300.0)   # soft tissue to thin bone: skin, fat, muscle, skull (air and dense bone clipped)
_LPS = np.diag([-1.0, -1.0, 1.0])


def _ants():
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # deterministic; 3 mm images are small
    import ants
    ants.config.set_ants_deterministic(True, SEED)
    return ants


def to_ants(ants, data: np.ndarray, affine: np.ndarray):
    """An ANTs image (LPS physical space) of an array with a NIfTI (RAS) affine, in any voxel order."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    direction = _LPS @ (affine[:3, :3] / zooms)
    origin = _LPS @ affine[:3, 3]
    return ants.from_numpy(np.asarray(data, dtype=np.float32), origin=tuple(float(v) for v in origin),
                           spacing=tuple(float(v) for v in zooms), direction=direction)


@dataclass(frozen=True)
class Template:
    image: np.ndarray            # about 3 mm, uint8
    image_affine: np.ndarray
    removal: np.ndarray          # uint8 0/1 on the 1 mm grid
    removal_affine: np.ndarray
    landmarks: dict[str, np.ndarray]   # template RAS mm
    eye_brow_box: np.ndarray           # (8, 3) corners, template RAS mm


@lru_cache(maxsize=1)
def template() -> Template:
    """The template data, read once per process (about 20 ms)."""
    from importlib.resources import files
    with (files("deidflow") / "data" / TEMPLATE_FILE).open("rb") as fh:
        z = np.load(fh)
        shape = tuple(int(v) for v in z["removal_shape"])
        removal = np.unpackbits(z["removal"])[: int(np.prod(shape))].reshape(shape)
        marks = {str(n): np.asarray(p, float) for n, p in zip(z["landmark_names"], z["landmarks"])}
        return Template(z["template"], z["template_affine"], removal, z["removal_affine"], marks, z["eye_brow_box"])


def template_files_present() -> bool:
    """Whether the template data file is installed (found without reading it)."""
    from importlib.resources import files
    return (files("deidflow") / "data" / TEMPLATE_FILE).is_file()


def downsample(data: np.ndarray, affine: np.ndarray, mm: float = REG_MM) -> tuple[np.ndarray, np.ndarray]:
    """Block means of ``data`` to voxels of about ``mm`` (an axis already that coarse is kept), and
    their affine; cheap and free of aliasing, in the array's own voxel order."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    k = [max(1, int(round(mm / float(z)))) for z in zooms]
    n = [s // f * f for s, f in zip(data.shape[:3], k)]
    if min(n) == 0:
        k, n = [1, 1, 1], list(data.shape[:3])
    blocks = data[: n[0], : n[1], : n[2]].reshape(n[0] // k[0], k[0], n[1] // k[1], k[1], n[2] // k[2], k[2])
    small = blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    scale = np.eye(4)
    for i, f in enumerate(k):
        scale[i, i], scale[i, 3] = f, (f - 1) / 2
    return small, affine @ scale


def _preprocess(data: np.ndarray, modality: str) -> np.ndarray:
    """The intensities the registration sees: CT clipped to a soft-tissue/bone window (air and dense
    bone dominate its range otherwise), MR as it is (mutual information needs no more)."""
    data = np.array(data, dtype=np.float32)       # a copy: the caller's array is never changed
    if modality.upper() == "CT":
        return np.clip(data, *CT_WINDOW_HU) - CT_WINDOW_HU[0]
    return data


def _affine_registration(ants, fixed, moving) -> tuple[np.ndarray, np.ndarray]:
    """ANTs affine registration of ``moving`` (template) to ``fixed`` (subject), both about 3 mm:
    initialised by matching the centres of mass, Mattes mutual information on a regular grid of
    ``SAMPLING`` of the voxels, two levels (shrink 2: 6 mm, then 3 mm), each stopped when the metric
    improved by less than ``CONVERGENCE`` over its last iterations. Returns ITK's parameters
    (3x3 matrix, translation) and centre, in LPS millimetres."""
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments
    fx, mv = get_pointer_string(fixed), get_pointer_string(moving)
    with tempfile.TemporaryDirectory(prefix="deidflow-reg-") as tmp:
        prefix = os.path.join(tmp, "r")
        args = ["--dimensionality", "3", "--float", "1", "--initial-moving-transform", f"[{fx},{mv},1]",
                "--metric", f"MI[{fx},{mv},1,32,Regular,{SAMPLING}]", "--transform", "Affine[0.25]",
                "--convergence", CONVERGENCE, "--shrink-factors", "2x1", "--smoothing-sigmas", "1x0vox",
                "--use-histogram-matching", "0", "--collapse-output-transforms", "1",
                "--random-seed", str(SEED), "--output", prefix]
        if get_lib_fn("antsRegistration")(process_arguments(args)) != 0:
            raise RuntimeError("ANTs registration failed")
        tx = ants.read_transform(prefix + "0GenericAffine.mat")
        return np.asarray(tx.parameters, float), np.asarray(tx.fixed_parameters, float)


@dataclass(frozen=True)
class HeadRegistration:
    """The template registered to one head: ``to_template`` maps subject RAS mm to template RAS mm."""

    to_template: np.ndarray
    modality: str = "MR"

    @classmethod
    def fit(cls, data: np.ndarray, affine: np.ndarray, modality: str = "MR") -> "HeadRegistration":
        """Register the template to the head in ``data`` (3D — of 4D data the first volume — in any
        voxel order and orientation; ``affine`` maps voxels to RAS mm; real values, Hounsfield units
        for ``modality="CT"``). The same head stored in another voxel order gives the same result."""
        ants = _ants()
        tpl = template()
        ras = reference_volume(_preprocess(data, modality), np.asarray(affine, float))  # any storage order: one result
        small, small_aff = downsample(ras.data, ras.affine)
        fixed = to_ants(ants, small, small_aff)
        moving = to_ants(ants, tpl.image.astype(np.float32), tpl.image_affine)
        params, center = _affine_registration(ants, fixed, moving)
        # ITK affine: p_moving = A (p_fixed - c) + c + t, in LPS; as a 4x4 matrix in RAS
        lin, trans = params[:9].reshape(3, 3), params[9:12]
        lps = np.eye(4)
        lps[:3, :3], lps[:3, 3] = lin, center + trans - lin @ center
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return cls(flip @ lps @ flip, modality.upper())

    def to_subject(self, points: np.ndarray) -> np.ndarray:
        """Template RAS mm points (n, 3) in the subject's RAS mm."""
        inv = np.linalg.inv(self.to_template)
        pts = np.asarray(points, float)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def mask_for(self, shape, affine: np.ndarray) -> np.ndarray:
        """The removed region on the voxel grid ``shape`` (first three axes) / ``affine`` (voxels
        to RAS mm, any order, oblique allowed), as a bool array in that grid's voxel order."""
        from scipy import ndimage
        tpl = template()
        shape = tuple(int(s) for s in shape[:3]) + (1,) * max(0, 3 - len(shape))
        m = np.linalg.inv(tpl.removal_affine) @ self.to_template @ np.asarray(affine, float)
        out = ndimage.affine_transform(tpl.removal, m[:3, :3], offset=m[:3, 3], output_shape=shape,
                                       output=np.uint8, order=0, mode="nearest")
        return out.astype(bool)

    def eye_brow_box(self) -> np.ndarray:
        """The 8 corners of the template's eye/brow region in subject RAS mm (the coverage check)."""
        return self.to_subject(template().eye_brow_box)


def face_mask(vol: Volume, modality: str = "MR") -> np.ndarray:
    """Boolean RAS mask of the face region of ``vol`` (True = remove)."""
    return HeadRegistration.fit(vol.data, vol.affine, modality).mask_for(vol.data.shape, vol.affine)


class AntsDeface:
    """Defacing by template registration (no torch)."""

    name = "ants"
    methods = ("deface",)

    def removal_mask(self, vol: Volume, modality: str = "MR") -> np.ndarray:
        return face_mask(vol, modality)

    def registration(self, data: np.ndarray, affine: np.ndarray, modality: str = "MR") -> HeadRegistration:
        """The reusable registration of one head (see :class:`HeadRegistration`)."""
        return HeadRegistration.fit(data, affine, modality)
