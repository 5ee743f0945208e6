"""Burned-in text in volumes without a DICOM header (NIfTI, Analyze, MGH, MINC, PAR/REC).

A NIfTI converted from a screen capture, a scanner's 3D reformat with its annotation, or a
volume someone drew a label into carries the text in its voxels, and the ``other`` stage
releases voxels as they are.  The volume is screened like a DICOM series
(:func:`.screen.screen_frames`: sampled slices, slices whose statistics stand out, edges that stay
in place from slice to slice or appear on one slice only):

* every slice of the slice axis (the third spatial axis, where converters put the acquired
  frames), over every volume of a 4D image; MINC's spatial axes are its ``*space`` dimensions,
  wherever the file puts time (:func:`_axes`);
* for a single 3D volume, also the slices along the other two axes (a reformat or a label drawn
  onto a sagittal view); for a 4D image, those of its volumes' voxelwise maximum and minimum;
* each slice is read as stored and upside down, mirrored, and both (:data:`.screen.VIEWS`):
  the voxel order says nothing certain about which way up the text was drawn (dcm2niix stores
  rows bottom-up), and the recognizer reads only upright text.

Values are stretched to 16 bits over each volume's range, robust to a few extreme voxels
(:func:`_stretched`) before the screen looks; nothing is written.  Text found, or a volume that
cannot be read (or holds more than MAX_VOXELS), withholds the file (:func:`text_in_volume`'s
callers): deidflow does not rewrite voxels of these formats to blank text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import screen

MIN_SIDE = 8  # a slice narrower than this cannot show a line of text
# A reading counts with at least this many letters or digits (DICOM: screen.MIN_CHARS, 3): text
# found here withholds the file instead of blanking a box, and anatomy read four ways up gives the
# recognizer more chances (the vertebrae of a real head at 0.6 of its brightness read as "188").
MIN_CHARS = 4
# A volume larger than this (4D: a third of it, with its voxelwise maximum and minimum) is not
# screened but withheld: 2 bytes a voxel held while screening (512 MB here), plus one chunk.
MAX_VOXELS = 1 << 28
CHUNK_VOXELS = 1 << 24  # voxels read and stretched at a time (float64: 128 MB)
TAIL, SPREAD_LIMIT, BULK = 5e-4, 16.0, (0.1, 0.75)  # robust stretch (see _stretched)


class VolumeUnreadable(ValueError):
    """The volume's voxels cannot be read to screen them (the message says why, without values)."""


@dataclass(frozen=True)
class Where:
    """Where text was found: voxel axis the slices were cut across, slice, volume (4D), or
    ``over`` the volumes' voxelwise maximum or minimum (4D, the other two axes)."""

    axis: int
    slice: int
    volume: int
    over: str = ""

    def __str__(self) -> str:
        vol = f" of the {self.over} over volumes" if self.over else f" of volume {self.volume}" if self.volume else ""
        return f"slice {self.slice} across voxel axis {self.axis}{vol}"


class _Slices:
    """One 3D block's slices across ``axis``, each as a 2-D frame (rows: the next voxel axis)."""

    invert = False

    def __init__(self, block: np.ndarray, axis: int):
        self.block, self.axis, self.n = block, axis, block.shape[axis]

    def frame(self, k: int) -> np.ndarray:
        return self.block[(slice(None),) * self.axis + (k,)].swapaxes(0, 1)  # a view: (b, a[, channels])


def _real(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A chunk of voxels as float64 (RGB as a last axis of 3, complex by magnitude, NaN as 0), with
    the masks of its +inf and -inf voxels (None when every value is finite)."""
    if a.dtype.names:  # RGB/RGBA NIfTI: a structured dtype
        a = np.stack([a[name] for name in a.dtype.names[:3]], axis=-1)
    if np.iscomplexobj(a):
        a = np.abs(a)
    a = np.asarray(a, np.float64)
    finite = np.isfinite(a)
    if finite.all():
        return a, None, None
    return np.where(finite, a, 0.0), np.isposinf(a), np.isneginf(a)


def _range(values: np.ndarray, size: int) -> tuple[float, float, np.ndarray]:
    """(lowest, highest, a sample of about 1,000,000 per ``size`` voxels) of a chunk's values."""
    if not values.size:
        return np.inf, -np.inf, values.ravel()
    # a copy: the strided view of a ravelled (Fortran-order: copied) chunk would keep all of it
    return float(values.min()), float(values.max()), values.ravel()[::max(1, size // 1_000_000)].copy()


def _stretch(values: np.ndarray, top, bottom, lo: float, hi: float, q: tuple[float, float]) -> np.ndarray:
    """A chunk's values as uint16 over the volume's range (see _stretched)."""
    out = np.zeros(values.shape, np.uint16)
    if hi > lo:
        q0, q1 = q
        if (q1 - q0) * SPREAD_LIMIT >= hi - lo or q1 <= q0:
            out[...] = (values - lo) * (65535.0 / (hi - lo))
        else:
            out[...] = np.interp(values, [lo, q0, q1, hi], [0.0, 65535.0 * BULK[0], 65535.0 * BULK[1], 65535.0])
    if top is not None:
        out[top], out[bottom] = 65535, 0
    return out


def _stretched(read, n: int, step: int, size: int) -> np.ndarray:
    """A volume of voxels (RGB as a last axis of 3) as uint16 over its own range, ``read(k0, k1)``
    giving its slices k0:k1 of the third axis, ``step`` slices at a time (a volume read in more
    than one step is read twice: its range first, then its values), ``size`` voxels in all.

    Complex voxels count by magnitude.  Infinities stand above and below every finite value,
    NaN counts as 0.  When a few voxels stretch the range so far that the bulk of the voxels
    (between the TAIL and 1 - TAIL quantiles) would share less than 1/SPREAD_LIMIT of it (one
    voxel at 3e38, text at -1e30 under a background of 0, a bright corner of 1e6), those
    quantiles are mapped to BULK of the output range and the tails on either side to the rest,
    so that no value the bulk of the volume holds merges with its neighbours.  Memory: the
    uint16 result and one step's float64 values."""
    spans = [(k, min(n, k + step)) for k in range(0, n, step)] or [(0, 0)]
    ranges, first = [], None
    for k0, k1 in spans:
        chunk = _real(read(k0, k1))
        ranges.append(_range(chunk[0], size))
        first = chunk if len(spans) == 1 else None
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    lo, hi = (lo, hi) if hi >= lo else (0.0, 0.0)
    sample = np.concatenate([r[2] for r in ranges])
    q = tuple(float(x) for x in np.quantile(sample, (TAIL, 1 - TAIL))) if hi > lo else (0.0, 0.0)
    del ranges, sample
    if first is not None:
        return _stretch(*first, lo, hi, q)
    out = None
    for k0, k1 in spans:
        part = _stretch(*_real(read(k0, k1)), lo, hi, q)
        if out is None:
            out = np.empty(part.shape[:2] + (n,) + part.shape[3:], np.uint16)
        out[:, :, k0:k1] = part
    return out


def _axes(img, ndim: int) -> tuple[list[int], list[int]]:
    """(spatial, other) voxel axes: the spatial ones in NIfTI order (x, y, then the slice axis),
    the others (time, echoes, …) after.  nibabel keeps MINC's file order, slowest first, with
    the time dimension wherever the file puts it (``time,zspace,yspace,xspace`` after
    mincconcat): MINC's spatial axes are the dimensions named ``*space``, reversed."""
    names = getattr(getattr(getattr(img, "dataobj", None), "minc_file", None), "_dim_names", None)
    if names is not None and len(names) == ndim:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        spatial = [i for i, n in enumerate(names) if n.endswith("space")][::-1]
        if spatial:
            return spatial, [i for i in range(ndim) if i not in spatial]
    return list(range(min(3, ndim))), list(range(3, ndim))


def spatial_shape(img) -> tuple[tuple[int, ...], int]:
    """(the spatial dimensions in voxel-axis order, as the affine's columns; the number of
    volumes) of a nibabel image: for a MINC with time first, ((z, y, x), t), not (t, z, y)."""
    shape = tuple(int(d) for d in img.shape)
    spatial, other = _axes(img, len(shape))
    return tuple(shape[i] for i in sorted(spatial)), int(np.prod([shape[i] for i in other])) if other else 1


def _block(img, shape: tuple[int, ...], spatial: list[int], other: list[int], t: int) -> np.ndarray:
    """Volume ``t`` of the image, its spatial axes in ``spatial`` order and padded to three (RGB
    as a last axis), stretched; read CHUNK_VOXELS at a time across its third spatial axis (the
    slowest on disk in NIfTI, Analyze, MGH and MINC order)."""
    dims = [shape[i] for i in spatial] + [1] * (3 - len(spatial))
    size = int(np.prod(dims))
    limit = MAX_VOXELS // 3 if other else MAX_VOXELS  # 4D: also its maximum and minimum
    if size > limit:
        raise VolumeUnreadable(f"a volume of more than {limit} voxels, too large to screen")
    at = dict(zip(other, (int(i) for i in np.unravel_index(t, [shape[i] for i in other])))) if other else {}

    def read(k0: int, k1: int) -> np.ndarray:
        index = [at.get(i, slice(None)) for i in range(len(shape))]
        if len(spatial) == 3:
            index[spatial[2]] = slice(k0, k1)
        data = np.asanyarray(img.dataobj[tuple(index)])
        data = np.moveaxis(data, [sorted(spatial).index(i) for i in spatial], list(range(len(spatial))))
        for k in range(len(spatial), 3):
            data = np.expand_dims(data, k)
        return data

    step = max(1, CHUNK_VOXELS // max(1, dims[0] * dims[1])) if len(spatial) == 3 else dims[2]
    return _stretched(read, dims[2], step, size)


def _load(path: Path):
    import nibabel as nib
    try:  # gzip: one stream read forward, not decompressed again from its start for each volume
        return nib.load(str(path), keep_file_open=True)
    except TypeError:  # PAR/REC, MINC: no such option
        return nib.load(str(path))


def text_in_volume(path: Path, threads: int = 1) -> Where | None:
    """Where the first text found in the volume at ``path`` (nibabel reads its pair or its
    companions beside it) lies, or None.  Raises VolumeUnreadable."""
    try:
        img = _load(path)
        shape = tuple(int(d) for d in img.shape)
    except Exception as exc:  # noqa: BLE001 - hostile or damaged input: the caller withholds
        raise VolumeUnreadable(f"not readable as an image ({type(exc).__name__})") from None
    if len(shape) < 2 or 0 in shape:
        return None
    spatial, other = _axes(img, len(shape))
    dims = [shape[i] for i in spatial] + [1] * (3 - len(spatial))
    volumes = int(np.prod([shape[i] for i in other])) if other else 1
    cache: dict[int, np.ndarray] = {}
    envelope: list[np.ndarray] = []  # voxelwise maximum and minimum of the volumes read (4D)

    def opener(t: int, axis: int):
        def open_() -> _Slices:
            if t not in cache:
                cache.clear()  # one volume in memory at a time
                try:
                    cache[t] = b = _block(img, shape, spatial, other, t)
                except (MemoryError, VolumeUnreadable):
                    raise
                except Exception as exc:  # noqa: BLE001 - truncated data, a codec, …
                    raise VolumeUnreadable(f"voxels not readable ({type(exc).__name__})") from None
                if volumes > 1 and envelope:
                    np.maximum(envelope[0], b, out=envelope[0])
                    np.minimum(envelope[1], b, out=envelope[1])
                elif volumes > 1:
                    envelope[:] = [b.copy(), b.copy()]
            return _Slices(cache[t], axis)
        return open_

    def seen(axis: int) -> bool:
        return min(d for i, d in enumerate(dims) if i != axis) >= MIN_SIDE

    axes = [a for a in (2, 1, 0) if seen(a)]
    # one volume: slices across every axis; 4D: every volume's slices across the first axis that
    # shows frames (the slice axis; a 2D+time series stored (x, 1, y, t) has only axis 1)
    for axis in axes if volumes == 1 else axes[:1]:
        res = screen.screen_frames([(dims[axis], opener(t, axis)) for t in range(volumes)], threads,
                                   views=screen.VIEWS, min_chars=MIN_CHARS)
        if res.text:
            return Where(axis, res.found[0].frame, res.found[0].file)
    # 4D: text across the other axes of one volume (a sagittal reformat's label) shows in the
    # voxelwise maximum (bright text) or minimum (dark text) of the volumes read above
    if volumes > 1 and len(axes) > 1:
        for over, block in zip(("maximum", "minimum"), list(envelope)):
            for axis in axes[1:]:
                res = screen.screen_frames([(dims[axis], lambda b=block, a=axis: _Slices(b, a))], threads,
                                           views=screen.VIEWS, min_chars=MIN_CHARS)
                if res.text:
                    return Where(axis, res.found[0].frame, 0, over)
    return None
