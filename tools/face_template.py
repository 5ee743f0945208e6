"""Build ``src/deidflow/data/face_template.npz``: the template data of the ``ants`` defacing backend.

Derived from the data files of the MIT-licensed ``pydeface`` 2.1.0 wheel (``mean_reg2mean.nii.gz``, an
average T1w head, and ``facemask.nii.gz``, 0 on the face), with deepbet's brain mask of the template.
Run once by a maintainer (needs pydeface, deepbet and torch); the product only reads the .npz:

    PYTHONPATH=src python tools/face_template.py

What the file holds (all coordinates are template RAS millimetres):

* ``template`` / ``template_affine`` — the template block-averaged 3x3x3 (about 3 mm, scaled to
  uint8), the moving image of the registration;
* ``removal`` / ``removal_affine`` — the removed region on the template's own 1 mm grid: pydeface's face
  mask, plus the eye/brow box grown by ``BOX_MARGIN_MM`` (for registration error; both eyes with lids, both brows: pydeface's cut runs through the
  eyes and leaves brows and upper lids), extended to the front (every anterior-posterior column the
  region touches is removed from its deepest voxel forward), minus the template brain dilated by
  ``BRAIN_MARGIN_MM``;
* ``landmarks`` (names in ``landmark_names``) — the centres of the eyeballs (found in the template
  as the dark vitreous inside the bright orbital fat) and the brows (``BROW_UP_MM`` above them,
  ``BROW_DEPTH_MM`` under the skin);
* ``eye_brow_box`` — the 8 corners of the eye/brow region the coverage test checks (see
  :func:`eye_brow_box`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "deidflow" / "data" / "face_template.npz"
BRAIN_MARGIN_MM = 6.0
BOX_MARGIN_MM = 6.0                             # the removed box is the checked one grown by this
EYE_GUESSES = ((60, 200, 96), (118, 200, 96))   # template voxels, refined below
EYE_RADIUS_MM = 13.0
BROW_UP_MM = 17.0                               # a brow: this far above an eye centre,
BROW_DEPTH_MM = 4.0                             # this far under the skin (of the template's average face)
SKIN = 100.0                                    # template intensity of skin and scalp fat (air < 60)
BROW_RADIUS_MM = 12.0


def refine_eye(t: np.ndarray, guess) -> tuple[int, int, int]:
    """The voxel near ``guess`` that best centres a dark sphere (vitreous) in a bright ring (fat)."""
    r = np.arange(-16, 17)
    x, y, z = np.meshgrid(r, r, r, indexing="ij")
    rad = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    inner, ring = rad <= 8, (rad >= 11) & (rad <= 14)
    best = None
    for dx in range(-6, 7):
        for dy in range(-8, 9):
            for dz in range(-6, 7):
                c = (guess[0] + dx, guess[1] + dy, guess[2] + dz)
                blk = t[c[0] - 16:c[0] + 17, c[1] - 16:c[1] + 17, c[2] - 16:c[2] + 17]
                score = float(blk[ring].mean() - blk[inner].mean())
                if best is None or score > best[0]:
                    best = (score, c)
    return best[1]


def eye_brow_box(eyes_mm: np.ndarray, brows_mm: np.ndarray) -> np.ndarray:
    """Corners (8, 3) of the eye/brow region: the bounding box of the eyeballs and brows (spheres
    around the landmarks), from the eyeball centres forward (the visible half: lids, lashes, brows)."""
    lo = np.minimum((eyes_mm - EYE_RADIUS_MM).min(0), (brows_mm - BROW_RADIUS_MM).min(0))
    hi = np.maximum((eyes_mm + EYE_RADIUS_MM).max(0), (brows_mm + BROW_RADIUS_MM).max(0))
    lo[1] = eyes_mm[:, 1].min()
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def main() -> None:
    import nibabel as nib
    from importlib.resources import files
    from scipy import ndimage
    sys.path.insert(0, str(ROOT / "src"))
    from deidflow.face.deepbet_strip import brain_mask
    from deidflow.face.volume import reference_volume

    data = files("pydeface") / "data"
    tpl = nib.load(str(data / "mean_reg2mean.nii.gz"))
    t = np.asarray(tpl.get_fdata(), dtype=np.float32)
    aff = tpl.affine
    face = np.asarray(nib.load(str(data / "facemask.nii.gz")).get_fdata()) < 0.5
    assert t.shape == face.shape and np.allclose(nib.load(str(data / "facemask.nii.gz")).affine, aff, atol=1e-4)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(0))

    eyes_vox = np.array([refine_eye(t, g) for g in EYE_GUESSES], float)
    eyes = (aff @ np.c_[eyes_vox, np.ones(2)].T).T[:, :3]
    brows = []
    for v in eyes_vox.astype(int):
        z = int(round(v[2] + BROW_UP_MM / zooms[2]))
        front = int(np.nonzero(t[v[0], :, z] > SKIN)[0].max())
        brows.append(aff @ [v[0], front - BROW_DEPTH_MM / zooms[1], z, 1])
    brows = np.array(brows)[:, :3]
    box = eye_brow_box(eyes, brows)

    # the box on the template grid (in RAS mm: the template grid is slightly oblique)
    ijk = np.indices(t.shape).reshape(3, -1)
    ras = (aff[:3, :3] @ ijk + aff[:3, 3:]).T
    lo, hi = box.min(0) - BOX_MARGIN_MM, box.max(0) + BOX_MARGIN_MM
    in_box = np.all((ras >= lo) & (ras <= hi), axis=1).reshape(t.shape)
    region = face | in_box
    # extend to the front along the template's anterior axis (voxel axis 1)
    touched = region.any(axis=1)
    deepest = np.argmax(region, axis=1)
    y = np.arange(t.shape[1])[None, :, None]
    region |= touched[:, None, :] & (y >= deepest[:, None, :])
    brain = brain_mask(reference_volume(t, aff))
    ball = int(np.ceil(BRAIN_MARGIN_MM / zooms.min()))
    g = np.indices((2 * ball + 1,) * 3) - ball
    struct = ((g * zooms[:, None, None, None]) ** 2).sum(0) <= BRAIN_MARGIN_MM ** 2
    near_brain = ndimage.binary_dilation(brain, structure=struct)
    removal = region & ~near_brain

    k = 3
    n = [s // k * k for s in t.shape]
    small = t[:n[0], :n[1], :n[2]].reshape(n[0] // k, k, n[1] // k, k, n[2] // k, k).mean(axis=(1, 3, 5))
    small_aff = aff @ np.array([[k, 0, 0, (k - 1) / 2], [0, k, 0, (k - 1) / 2], [0, 0, k, (k - 1) / 2], [0, 0, 0, 1]])
    names = np.array(["eye_right", "eye_left", "brow_right", "brow_left"])
    small = np.round(255 * np.clip(small / np.percentile(small, 99.9), 0, 1)).astype(np.uint8)
    np.savez_compressed(OUT, template=small, template_affine=small_aff,
                        removal=np.packbits(removal), removal_shape=np.array(removal.shape), removal_affine=aff,
                        landmarks=np.r_[eyes, brows], landmark_names=names, eye_brow_box=box)
    print(f"{OUT}: {OUT.stat().st_size // 1024} kB; eyes {np.round(eyes, 1).tolist()}; brows {np.round(brows, 1).tolist()}; "
          f"removed {removal.mean():.3f} of the template grid; brain {brain.sum()} voxels; "
          f"box voxels carved for the brain {int((in_box & near_brain).sum())}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
