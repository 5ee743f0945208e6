"""``external`` backends: FSL ``bet`` and FreeSurfer ``mri_synthstrip`` (skull-stripping) or
``mri_deface`` (defacing), run through nipype when the program is on PATH.

Each program reads the RAS reference volume written to a temporary NIfTI and returns a mask or
a processed image, from which the removed region is derived; nothing else of their output is used.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .volume import Volume

PROGRAMS = {
    "bet": ("skullstrip", "FSL (https://fsl.fmrib.ox.ac.uk), with $FSLDIR/bin on PATH"),
    "mri_synthstrip": ("skullstrip", "FreeSurfer >= 7.3 (mri_synthstrip), with $FREESURFER_HOME/bin on PATH"),
    "mri_deface": ("deface", "FreeSurfer's mri_deface and its talairach_mixed_with_skull.gca and face.gca "
                             "templates in $FREESURFER_HOME/average or $MRI_DEFACE_TEMPLATES"),
}


class ProgramMissing(RuntimeError):
    """The external program is not on PATH; the message names it and how to get it."""


def missing_reason(program: str) -> str | None:
    """Why ``program`` cannot run here, or None when it can."""
    if program not in PROGRAMS:
        return f"unknown external program {program!r} (known: {', '.join(PROGRAMS)})"
    if shutil.which(program) is None:
        return f"the external program {program!r} is not on PATH: install {PROGRAMS[program][1]}"
    if program == "mri_deface" and _deface_templates() is None:
        return f"mri_deface is on PATH but its templates were not found: {PROGRAMS[program][1]}"
    return None


def _deface_templates() -> tuple[Path, Path] | None:
    for root in (os.environ.get("MRI_DEFACE_TEMPLATES"), os.environ.get("FREESURFER_HOME") and
                 os.path.join(os.environ["FREESURFER_HOME"], "average")):
        if root:
            brain, face = Path(root) / "talairach_mixed_with_skull.gca", Path(root) / "face.gca"
            if brain.is_file() and face.is_file():
                return brain, face
    return None


def _run(program: str, in_file: Path, out_file: Path, work: Path) -> None:
    from nipype.interfaces import fsl
    from nipype.interfaces.base import CommandLine
    if program == "bet":
        fsl.BET(in_file=str(in_file), out_file=str(out_file), mask=True, output_type="NIFTI_GZ").run(cwd=str(work))
        return
    if program == "mri_synthstrip":
        args = f"-i {in_file} -m {out_file}"
    else:
        brain, face = _deface_templates()
        args = f"{in_file} {brain} {face} {out_file}"
    CommandLine(command=program, args=args, terminal_output="allatonce").run(cwd=str(work))


class External:
    """An external program behind the common interface; ``program`` is one of :data:`PROGRAMS`."""

    name = "external"
    methods = ("deface", "skullstrip")

    def __init__(self, program: str):
        self.program = program

    def removal_mask(self, vol: Volume) -> np.ndarray:
        import nibabel as nib
        reason = missing_reason(self.program)
        if reason:
            raise ProgramMissing(reason)
        if self.program == "mri_deface":   # registers its templates from the header's orientation
            from .ants_deface import check_orientation
            check_orientation(vol.data, vol.affine)
        with tempfile.TemporaryDirectory(prefix="deidflow-face-") as tmp:
            work = Path(tmp)
            src, out = work / "in.nii.gz", work / "out.nii.gz"
            nib.save(nib.Nifti1Image(vol.data, vol.affine), src)
            _run(self.program, src, out, work)
            if self.program == "bet":
                out = work / "out_mask.nii.gz"
            res = nib.load(out)
            arr = np.asanyarray(res.dataobj)
            if arr.shape[:3] != vol.data.shape:
                raise RuntimeError(f"{self.program} changed the image grid")
            arr = arr.reshape(vol.data.shape + (-1,))[..., 0]
        if self.program == "mri_deface":   # a defaced image: removed where it became zero
            return (arr == 0) & (vol.data != 0)
        return arr == 0                    # a brain mask
