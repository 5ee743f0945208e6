"""Faces: defacing and skull-stripping of head MRI, in the released NIfTI and in the DICOM series
it was converted from (see docs/face.md).

Modules: :mod:`.volume` (orientation, reference volume), :mod:`.backends` (the common interface
and availability checks), :mod:`.ants_deface`, :mod:`.deepbet_strip`, :mod:`.quickshear`,
:mod:`.external` (the backends), :mod:`.select` (which images are head MRI and what to do with
them), :mod:`.apply` (masking NIfTI images and DICOM series), :mod:`.render` (QC pictures) and
:mod:`.stage` (the per-unit ``face`` job). Heavy libraries are imported only by the backends.
"""
