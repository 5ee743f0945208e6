"""``deepbet`` brain masks: the CNN whose weights ship in the ``deepbet`` wheel, run through its
Python API (``deepbet.bet.BrainExtraction``) on the CPU, or with ``face.device: auto`` on a GPU
when one is visible.

Needs the optional extra ``pip install 'deidflow[deepbet]'`` (deepbet and a pinned torch)."""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .volume import Volume

INSTALL = "pip install 'deidflow[deepbet]'"


@lru_cache(maxsize=1)
def _model():
    import torch
    from deepbet.bet import BrainExtraction
    torch.set_num_threads(max(1, int(os.environ.get("DEIDFLOW_FACE_THREADS", "0")) or (os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    # face.device (the face job sets DEIDFLOW_FACE_GPU): CPU unless asked, since GPU masks can differ
    # from the CPU's in a few voxels and a release must not depend on which node ran the job
    gpu = os.environ.get("DEIDFLOW_FACE_GPU", "0") == "1" and torch.cuda.is_available()
    return BrainExtraction(no_gpu=not gpu)


def brain_mask(vol: Volume) -> np.ndarray:
    """Boolean RAS brain mask of ``vol`` (deepbet's threshold 0.5, largest component, holes filled)."""
    import nibabel as nib
    import torch
    bet = _model()
    img = nib.Nifti1Image(vol.data, vol.affine)  # already RAS: deepbet's canonical reorientation is a no-op
    with torch.inference_mode():
        x = nib.as_closest_canonical(img).get_fdata(dtype=np.float32)
        prob = bet.run_model(x.copy())
    mask = bet.postprocess(prob > 0.5)
    return np.asarray(mask, dtype=bool)


class DeepbetStrip:
    """Skull-stripping: remove everything outside the deepbet brain mask."""

    name = "deepbet"
    methods = ("skullstrip",)

    def removal_mask(self, vol: Volume) -> np.ndarray:
        return ~brain_mask(vol)
