"""``ants`` defacing: register a head template to the subject once, remove the template's face region.

The template data (``data/face_template.npz``, built by ``tools/face_template.py`` from the
MIT-licensed ``pydeface`` wheel's average head and face mask) hold an about 3 mm copy of the
template and the removed region on its 1 mm grid: pydeface's face mask, plus a box over both eyes
(lids and lashes) and both brows, everything in front of that, minus the template brain dilated by
6 mm (docs/face.md).

:class:`HeadRegistration` is the reusable part: :meth:`HeadRegistration.fit` registers the template
to one head (ANTs affine, Mattes mutual information, 8 mm then 4 mm, initialised at the centres of
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

REG_MM = 4.0                  # the finest registration level; the coarser one is twice that
SEED = 20240917
SAMPLING = 0.1                # share of the voxels the metric samples (regular grid, seeded perturbation)
BINS = 32                     # joint histogram bins of the Mattes mutual information
CONVERGENCE = "[100x50,1e-5,5]"   # iterations per level, early stop: metric change < 1e-5 over 5 iterations
TEMPLATE_FILE = "face_template.npz"
CT_WINDOW_HU = (-200.0, 300.0)   # soft tissue to thin bone: skin, fat, muscle, skull (air and dense bone clipped)
_LPS = np.diag([-1.0, -1.0, 1.0])
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _lib():
    """ANTs' compiled library (the ``ants.lib`` extension of antspyx) without the Python package
    around it: ``import ants`` also imports its plotting, learning and statistics modules
    (matplotlib, statsmodels, scikit-learn: 1.4 s of every face job), none of which defacing uses."""
    import importlib.machinery
    import importlib.util
    import sys
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # deterministic; 4 mm images are small
    if "ants.lib" in sys.modules:
        return sys.modules["ants.lib"]
    spec = importlib.util.find_spec("ants")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "lib" + suffix)
            if os.path.isfile(path):
                lib_spec = importlib.util.spec_from_file_location("ants.lib", path)
                lib = importlib.util.module_from_spec(lib_spec)
                sys.modules["ants.lib"] = lib   # a later ``import ants`` uses this one, never a second copy
                lib_spec.loader.exec_module(lib)
                return lib
    raise ImportError("antspyx is not installed (the 'ants' face backend needs it)")


class _Image:
    """An ITK float image of an array with a NIfTI (RAS) affine, in LPS physical space as ITK
    wants it, in any voxel order; keeps the array alive as long as the image."""

    def __init__(self, lib, data: np.ndarray, affine: np.ndarray):
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        self.data = np.asarray(data, dtype=np.float32).T.copy(order="C")   # ITK's index order: x fastest
        self.pointer = lib.fromNumpyF3(self.data, self.data.shape[::-1])
        lib.setOrigin(self.pointer, [float(v) for v in _LPS @ affine[:3, 3]])
        lib.setSpacing(self.pointer, [float(v) for v in zooms])
        lib.setDirection(self.pointer, _LPS @ (affine[:3, :3] / zooms))
        self.ref = lib.ptrstr(self.pointer)


def affine_registration(fixed: tuple[np.ndarray, np.ndarray], moving: tuple[np.ndarray, np.ndarray], *,
                        sampling: float, convergence: str, shrink: str, smoothing: str, step: float = 0.25,
                        seed: int = SEED, bins: int = BINS) -> np.ndarray:
    """ANTs affine registration of ``moving`` to ``fixed`` ((data, RAS affine) each), Mattes mutual
    information (``bins`` histogram bins) on a regular grid of ``sampling`` of the voxels, levels ``shrink``/``smoothing``
    (ANTs syntax, e.g. "2x1", "1x0vox"), each stopped as ``convergence`` says, initialised by
    matching the centres of mass. Returns the 4x4 RAS matrix mapping fixed (subject) millimetres to
    moving (template) millimetres."""
    lib = _lib()
    fx, mv = _Image(lib, *fixed), _Image(lib, *moving)
    with tempfile.TemporaryDirectory(prefix="deidflow-reg-") as tmp:
        prefix = os.path.join(tmp, "r")
        args = ["--dimensionality", "3", "--float", "1", "--initial-moving-transform", f"[{fx.ref},{mv.ref},1]",
                "--metric", f"MI[{fx.ref},{mv.ref},1,{bins},Regular,{sampling}]", "--transform", f"Affine[{step}]",
                "--convergence", convergence, "--shrink-factors", shrink, "--smoothing-sigmas", smoothing,
                "--use-histogram-matching", "0", "--collapse-output-transforms", "1",
                "--random-seed", str(seed), "--output", prefix]
        if lib.antsRegistration(args) != 0:
            raise RuntimeError("ANTs registration failed")
        tx = lib.readTransformF3(prefix + "0GenericAffine.mat", 3, "float")
        params = np.asarray(lib.getTransformParameters(tx), float)
        center = np.asarray(lib.getTransformFixedParameters(tx), float)
    # ITK affine: p_moving = A (p_fixed - c) + c + t, in LPS; as a 4x4 matrix in RAS
    lin, trans = params[:9].reshape(3, 3), params[9:12]
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = lin, center + trans - lin @ center
    return _FLIP @ lps @ _FLIP


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
        tpl = template()
        ras = reference_volume(_preprocess(data, modality), np.asarray(affine, float))  # any storage order: one result
        check_orientation(ras.data, ras.affine)
        small = downsample(ras.data, ras.affine)
        to_template = affine_registration(small, (tpl.image.astype(np.float32), tpl.image_affine),
                                          sampling=SAMPLING, convergence=CONVERGENCE, shrink="2x1",
                                          smoothing="1x0vox")
        return cls(to_template, modality.upper())

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


# ---------------------------------------------------------------------------------------------- orientation check
# The header's orientation decides where the face is looked for: a head whose affine lies (a voxel
# axis flipped or two axes swapped in a NIfTI, Analyze or DICOM header) was registered to a wrong
# local optimum, "defaced" at the back or top of the head (13-25 % of the voxels removed, so the
# plausibility check passed) and released with its face (red-team 6). The head is therefore also
# matched to the template turned in each of the 23 other axis-aligned orientations; when one of them
# fits as well as or better than the header's, the header is not believed.
SCREEN_MM = 6.0               # voxel size of the screen (subject and template)
SCREEN_MARGIN = 0.01          # the header's orientation must win the screen by this much ...
CONFIRM_MM = 8.0              # ... else the best candidates are registered (quickly) and compared
CONFIRM_CANDIDATES = 3
CONFIRM_CONVERGENCE = "[40,1e-5,5]"
CONFIRM_MARGIN = 0.005


class OrientationMismatch(RuntimeError):
    """The header's orientation does not match the head (one-line reason, no values)."""


def _rotations() -> list[np.ndarray]:
    """The 24 proper axis-aligned rotations, the identity first (a head is left-right symmetric, so
    the 24 mirrored ones look the same)."""
    import itertools
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return sorted(out, key=lambda m: not np.allclose(m, np.eye(3)))


@lru_cache(maxsize=4)
def _screen_template(mm: float):
    from scipy import ndimage

    from . import render
    tpl = template()
    data, aff = downsample(tpl.image.astype(np.float32), tpl.image_affine, mm)
    inside = ndimage.binary_dilation(data > np.percentile(data, 40), iterations=1)
    pts = _tissue_points(data, aff, render.skin_threshold(data))
    return data, aff, inside, pts.min(axis=0), pts.max(axis=0)


def _tissue_points(data: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
    ijk = np.argwhere(data > threshold)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def nmi(a: np.ndarray, b: np.ndarray, bins: int = 24) -> float:
    """Normalised mutual information (H(a) + H(b)) / H(a, b) of two samples."""
    h, _, _ = np.histogram2d(a, b, bins=bins)
    p = h / max(h.sum(), 1.0)

    def ent(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())
    joint = ent(p)
    return (ent(p.sum(axis=1)) + ent(p.sum(axis=0))) / joint if joint > 0 else 0.0


def _turned(affine: np.ndarray, shape, rot: np.ndarray) -> np.ndarray:
    """``affine`` turned by ``rot`` about the centre of the grid (the head as if stored that way)."""
    c = affine[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = rot @ affine[:3, :3]
    out[:3, 3] = rot @ (affine[:3, 3] - c) + c
    return out


def orientation_problem(data: np.ndarray, affine: np.ndarray) -> str | None:
    """Why the head in ``data`` (RAS-ordered, T1-like contrast as the backends see it) does not lie
    as ``affine`` says, or None. Screen: for each of the 24 axis-aligned orientations, the template
    is placed on the head's tissue by its bounding box (left-right and front-back extents, the
    vertex; no registration) and the fit scored by normalised mutual information at 6 mm. When the
    header's orientation does not win by SCREEN_MARGIN, it and the best three others are registered
    (8 mm, up to 40 iterations) and compared again: another orientation fitting as well withholds."""
    from scipy import ndimage

    from . import render
    tdata, taff, inside, tlo, thi = _screen_template(SCREEN_MM)
    small, saff = downsample(np.asarray(data, np.float32), np.asarray(affine, float), SCREEN_MM)
    pts = _tissue_points(small, saff, render.skin_threshold(small))
    if len(pts) < 100:
        return None          # no head to orient (the plausibility check withholds an empty image)
    t_anchor = np.array([(tlo[0] + thi[0]) / 2, (tlo[1] + thi[1]) / 2, thi[2]])
    rots = _rotations()
    scores = []
    for rot in rots:
        p = pts @ rot.T
        lo, hi = p.min(axis=0), p.max(axis=0)
        scale = (thi - tlo) / np.maximum(hi - lo, 1.0)
        scale[2] = np.sqrt(scale[0] * scale[1])       # the scan may stop anywhere below: match the vertex
        anchor = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2]])
        to_subject = np.eye(4)                          # template mm -> subject mm
        to_subject[:3, :3] = rot.T @ np.diag(1 / scale)
        to_subject[:3, 3] = rot.T @ (anchor - t_anchor / scale)
        m = np.linalg.inv(saff) @ to_subject @ taff
        warped = ndimage.affine_transform(small, m[:3, :3], offset=m[:3, 3], output_shape=tdata.shape, order=1)
        scores.append(nmi(warped[inside], tdata[inside]))
    best_other = int(np.argmax(scores[1:])) + 1
    if scores[0] >= scores[best_other] + SCREEN_MARGIN:
        return None
    cdata, caff = downsample(tdata, taff, CONFIRM_MM) if CONFIRM_MM > SCREEN_MM else (tdata, taff)
    cin = ndimage.binary_dilation(cdata > np.percentile(cdata, 40), iterations=1)
    fixed, faff = downsample(np.asarray(data, np.float32), np.asarray(affine, float), CONFIRM_MM)

    def confirm(rot):
        turned = _turned(faff, fixed.shape, rot)
        to_t = affine_registration((fixed, turned), (cdata, caff), sampling=0.5, convergence=CONFIRM_CONVERGENCE,
                                   shrink="1", smoothing="0vox")
        m = np.linalg.inv(turned) @ np.linalg.inv(to_t) @ caff
        warped = ndimage.affine_transform(fixed, m[:3, :3], offset=m[:3, 3], output_shape=cdata.shape, order=1)
        return nmi(warped[cin], cdata[cin])
    order = [k for k in np.argsort(scores)[::-1] if k != 0][:CONFIRM_CANDIDATES]
    own = confirm(rots[0])
    others = [confirm(rots[k]) for k in order]
    if own >= max(others) + CONFIRM_MARGIN:
        return None
    return ("the orientation in the header does not match the head (it fits the template better turned "
            "by a multiple of 90 degrees): the face would be looked for in the wrong place")


def check_orientation(data: np.ndarray, affine: np.ndarray) -> None:
    """Raise :class:`OrientationMismatch` when :func:`orientation_problem` finds one: every deface
    backend that trusts the header (``ants``, ``quickshear``, ``external`` mri_deface) calls it."""
    problem = orientation_problem(data, affine)
    if problem:
        raise OrientationMismatch(problem)
