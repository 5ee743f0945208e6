"""Burned-in text in volumes without a DICOM header (NIfTI, Analyze, MGH, MINC, PAR/REC).

A NIfTI converted from a screen capture, a scanner's 3D reformat with its annotation, or a
volume someone drew a label into carries the text in its voxels, and the ``other`` stage
releases voxels as they are.  The volume is screened like a DICOM series
(:func:`.screen.screen_frames`: sampled slices, slices whose statistics stand out, edges that stay
in place from slice to slice or appear on one slice only):

* every slice of the slice axis (the third voxel axis, where converters put the acquired
  frames), over every volume of a 4D image;
* for a single 3D volume, also the slices along the other two axes (a reformat or a label drawn
  onto a sagittal view);
* each slice is read as stored and upside down, mirrored, and both (:data:`.screen.VIEWS`):
  the voxel order says nothing certain about which way up the text was drawn (dcm2niix stores
  rows bottom-up), and the recognizer reads only upright text.

Values are stretched to 16 bits over each volume's finite range (float volumes, per-slice
scaling) before the screen looks; nothing is written.  Text found, or a volume that cannot be
read, withholds the file (:func:`text_in_volume`'s callers): deidflow does not rewrite voxels of
these formats to blank text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import screen

MIN_SIDE = 8  # a slice narrower than this cannot show a line of text


class VolumeUnreadable(ValueError):
    """The volume's voxels cannot be read to screen them (the message says why, without values)."""


@dataclass(frozen=True)
class Where:
    """Where text was found: voxel axis the slices were cut across, slice, volume (4D)."""

    axis: int
    slice: int
    volume: int

    def __str__(self) -> str:
        vol = f" of volume {self.volume}" if self.volume else ""
        return f"slice {self.slice} across voxel axis {self.axis}{vol}"


class _Slices:
    """One 3D block's slices across ``axis``, each as a 2-D frame (rows: the next voxel axis)."""

    invert = False

    def __init__(self, block: np.ndarray, axis: int):
        self.block, self.axis, self.n = block, axis, block.shape[axis]

    def frame(self, k: int) -> np.ndarray:
        return self.block[(slice(None),) * self.axis + (k,)].swapaxes(0, 1)  # a view: (b, a[, channels])


def _stretched(a: np.ndarray) -> np.ndarray:
    """A block of voxels (RGB as a last axis of 3) as uint16 over its own finite range."""
    if a.dtype.names:  # RGB/RGBA NIfTI: a structured dtype
        a = np.stack([a[name] for name in a.dtype.names[:3]], axis=-1)
    a = np.asarray(a, np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0).astype(np.float32)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint16)
    return ((a - lo) * np.float32(65535.0 / (hi - lo))).astype(np.uint16)


def _block(img, shape: tuple[int, ...], t: int) -> np.ndarray:
    """Volume ``t`` of the image (3D, RGB as a last axis), stretched."""
    extra = shape[3:]
    if not extra:
        data = np.asanyarray(img.dataobj)
    else:
        data = np.asanyarray(img.dataobj[(slice(None),) * 3 + tuple(int(i) for i in np.unravel_index(t, extra))])
    if data.ndim == 2:
        data = data[..., None]
    return _stretched(data)


def text_in_volume(path: Path, threads: int = 1) -> Where | None:
    """Where the first text found in the volume at ``path`` (nibabel reads its pair or its
    companions beside it) lies, or None.  Raises VolumeUnreadable."""
    import nibabel as nib
    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
    except Exception as exc:  # noqa: BLE001 - hostile or damaged input: the caller withholds
        raise VolumeUnreadable(f"not readable as an image ({type(exc).__name__})") from None
    if len(shape) < 2 or 0 in shape:
        return None
    shape = shape + (1,) * (3 - len(shape))
    volumes = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    cache: dict[int, np.ndarray] = {}

    def opener(t: int):
        def open_() -> _Slices:
            if t not in cache:
                cache.clear()  # one volume in memory at a time
                try:
                    cache[t] = _block(img, shape, t)
                except MemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - truncated data, a codec, …
                    raise VolumeUnreadable(f"voxels not readable ({type(exc).__name__})") from None
            return _Slices(cache[t], axis)
        return open_

    axes = (2, 1, 0) if volumes == 1 else (2,)
    for axis in axes:
        side = [d for i, d in enumerate(shape[:3]) if i != axis]
        if min(side) < MIN_SIDE:
            continue
        sources = [(shape[axis], opener(t)) for t in range(volumes)]
        res = screen.screen_frames(sources, threads, views=screen.VIEWS)
        if res.text:
            f = res.found[0]
            return Where(axis, f.frame, f.file)
    return None
