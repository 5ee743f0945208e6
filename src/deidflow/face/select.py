"""Which released images are head MRI, and which method each gets.

An image (a NIfTI file of the BIDS release with the DICOM series it was converted from, or a
NIfTI / Analyze / MGH / MINC / PAR-REC volume released by the ``other`` stage) is treated when, in
this order:

1. its release path matches a ``face.select.exclude`` pattern: never treated;
   it matches a ``face.select.include`` pattern: treated (the remaining checks are skipped);
2. its modality is MR (DICOM ``Modality`` or the sidecar's; an image with no modality at all
   counts as MR only when its BIDS suffix is one of ``face.select.suffixes``, or when nothing at
   all is known about it, see 5);
3. it shows a head: ``BodyPartExamined`` is one of ``face.select.body_parts``; when that attribute
   is empty or missing, the BIDS suffix is one of ``face.select.suffixes`` or the series
   description / protocol name matches ``face.select.description_pattern``; any other body part
   excludes it;
4. it covers the head in 3D: the volume spans at least ``face.select.min_extent_mm`` along each of
   its three axes (a single 2D slice or a thin slab cannot show a face);
5. a volume about which nothing is known (``bare``: no modality — NIfTI, Analyze and MGH headers
   have no field for it —, no sidecar naming a body part, no BIDS suffix in its original file
   name) and whose original name does not match the description pattern is treated when it is
   head-sized: one 3D volume spanning between ``face.select.min_extent_mm`` and ``face.select.max_extent_mm`` along
   each axis. Such a file most often is a head scan; when it is not, the backend's mask fails the
   plausibility check and the file is withheld (quarantined), never released with a face.

Every volume of a selected image (echoes, 4D time points) gets the same mask, computed once per
geometry on the image's first volume. The method is ``face.by_suffix[suffix]`` when set, else
``face.method``. Every decision is recorded with its reason in the unit's face report.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

MAX_EXTENT_MM = 300.0  # default of face.select.max_extent_mm


@dataclass(frozen=True)
class ImageFacts:
    """What the selector looks at (none of it identifying)."""

    path: str                     # release-relative NIfTI path
    suffix: str                   # BIDS suffix (T1w, T2w, FLAIR, bold, ...)
    modality: str                 # MR, CT, ... or "" when unknown
    body_part: str                # BodyPartExamined, upper case, or ""
    description: str              # SeriesDescription / ProtocolName, or ""
    extent_mm: tuple[float, ...]  # size of the 3D volume along its axes
    bare: bool = False            # nothing records modality, body part or BIDS suffix (headerless volume)
    volumes: int = 1              # volumes of a 4D image


@dataclass(frozen=True)
class Decision:
    method: str                   # deface | skullstrip | none
    reason: str


def decide(facts: ImageFacts, face_cfg: Mapping[str, Any]) -> Decision:
    """The method for one image under the ``face`` configuration block, with the reason."""
    sel = face_cfg["select"]
    method = face_cfg.get("by_suffix", {}).get(facts.suffix, face_cfg["method"])
    if any(fnmatch.fnmatch(facts.path, p) for p in sel.get("exclude", ())):
        return Decision("none", "excluded by face.select.exclude")
    if any(fnmatch.fnmatch(facts.path, p) for p in sel.get("include", ())):
        return Decision(method, "included by face.select.include")
    suffixes = set(sel["suffixes"])
    modality = facts.modality.upper()
    if modality and modality != "MR":
        return Decision("none", f"modality {modality}, not MR")
    if not modality and facts.suffix not in suffixes and not facts.bare:
        return Decision("none", "no modality and not a head MRI suffix")
    body = facts.body_part.upper().strip()
    if body:
        if body not in {b.upper() for b in sel["body_parts"]}:
            return Decision("none", f"body part {body} is not a head")
        why = f"body part {body}"
    elif facts.suffix in suffixes:
        why = f"suffix {facts.suffix}"
    elif facts.description and re.search(sel["description_pattern"], facts.description, re.I):
        why = "series description (or original file name) names head anatomy"
    elif facts.bare:
        lo, hi = sel["min_extent_mm"], sel.get("max_extent_mm", MAX_EXTENT_MM)
        ext = facts.extent_mm
        if facts.volumes != 1 or len(ext) < 3 or min(ext[:3]) < lo or max(ext[:3]) > hi:
            return Decision("none", f"no header says what this is, and it is not one head-sized 3D volume "
                                    f"(extent {_mm(ext)} mm, {facts.volumes} volume{'s' * (facts.volumes != 1)})")
        why = "no header says what this is; a head-sized 3D volume"
    else:
        return Decision("none", "nothing says this is a head")
    if len(facts.extent_mm) < 3 or min(facts.extent_mm[:3]) < sel["min_extent_mm"]:
        return Decision("none", f"{why}, but no 3D coverage (extent {_mm(facts.extent_mm)} mm)")
    if method == "none":
        return Decision("none", f"{why}; method none configured")
    return Decision(method, f"{why}, extent {_mm(facts.extent_mm)} mm")


def extent_mm(shape, zooms) -> tuple[float, ...]:
    """Size of a volume along its first three axes (a 2D image has an extent of one slice)."""
    shape = tuple(shape) + (1,) * max(0, 3 - len(shape))
    zooms = tuple(zooms) + (1.0,) * max(0, 3 - len(zooms))
    return tuple(float(n) * float(z) for n, z in zip(shape[:3], zooms[:3]))


def _mm(ext) -> str:
    return "x".join(str(int(np.round(e))) for e in ext)
