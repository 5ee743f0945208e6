"""Which images can show a face, and which method each gets.

An image is a NIfTI file of the BIDS release with the DICOM series it was converted from, a
DICOM series of the release that has no converted image (not converted, conversion failed, BIDS
off, copied to ``sourcedata/unsorted``), or a NIfTI / Analyze / MGH / MINC / PAR-REC volume
released by the ``other`` stage. It is treated when, in this order:

1. its release path matches a ``face.select.exclude`` pattern: never treated;
   it matches a ``face.select.include`` pattern: treated (the remaining checks are skipped);
2. its modality is MR or CT (DICOM ``Modality`` or the sidecar's; an image with no modality at
   all counts only when its BIDS suffix is one of ``face.select.suffixes``, or when nothing at
   all is known about it, see 6);
3. it is not of a kind listed in ``face.select.skip`` (default: ``bold``, ``dwi``, ``asl``,
   ``fieldmap``, ``phase``): fMRI time series, diffusion, perfusion, field maps and phase images
   are acquired at a resolution and contrast that do not render a recognisable face, and changing
   their voxels breaks their analysis (:func:`kind_of` tells the kind from the BIDS suffix, the
   DICOM ``ImageType``, EPI time series, and the sequence and description of a series of two or
   more volumes: one 3D volume is not skipped for its description). A label alone does not
   decide for an image of at most MAX_BARE_VOLUMES volumes with pixels of at most LABEL_FACE_MM
   and 3D coverage: its volumes do (:func:`head_shape`; a phase or field map is a
   :func:`signed_map`, no head) — a T1 described ``fMRI run`` or typed ``ADC`` is defaced;
4. it can render a face: at least ``face.select.min_extent_mm`` along each of its three axes (a
   single slice or a thin slab cannot) and pixels no larger than ``face.select.max_in_plane_mm``;
   thin sagittal slices of a head (a localiser, a midline slice) show the facial profile and
   are withheld, as are 2D pictures (:func:`head_picture`; a NIfTI in colour or without
   scanner geometry);
5. it shows a head: ``BodyPartExamined`` names a head (``face.select.body_parts``, in any of the
   languages listed there, compared without accents and case, any word of the value), or the
   BIDS suffix is one of ``face.select.suffixes``, or the series description / protocol name
   matches ``face.select.description_pattern``. Otherwise — body part empty, ``WHOLEBODY``,
   ``NECK``, another body part or free text — labels are only hints and the volume itself is the
   arbiter: :func:`head_shape` (a run of axial sections shaped like a head) decides;
6. a volume about which nothing is known (``bare``: no modality — NIfTI, Analyze and MGH headers
   have no field for it —, no sidecar naming a body part, no BIDS suffix in its original file
   name) and whose original name does not match the description pattern is treated when it is
   head-sized: one 3D volume (or up to MAX_BARE_VOLUMES of them: echoes, inversions) spanning
   between ``face.select.min_extent_mm`` and ``face.select.max_extent_mm`` along each axis. When it is not a head, the backend's mask fails
   the plausibility check and the file is withheld (quarantined), never released with a face.

Every volume of a selected image (echoes, 4D time points) gets the same mask, computed once per
geometry on the image's first volume. The method is ``face.by_suffix[suffix]`` when set, else
``face.method``. Every decision is recorded with its reason in the unit's face report.
"""
from __future__ import annotations

import fnmatch
import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np

MAX_EXTENT_MM = 300.0  # default of face.select.max_extent_mm
MAX_IN_PLANE_MM = 5.0  # default of face.select.max_in_plane_mm
LABEL_FACE_MM = 3.0  # pixels at most this large: a label (fMRI, ASL, field map, diffusion, phase) of an image of
# at most MAX_BARE_VOLUMES volumes does not decide alone, its volume does (real EPI/ASL: 3.4-4 mm; a T1: 0.5-2 mm)
MAX_BARE_VOLUMES = 6  # a headerless 4D volume with at most this many volumes is echoes / inversions of
# one head (multi-echo MPRAGE, MP2RAGE, dual-echo PD/T2); diffusion has 7 or more, fMRI many more
KINDS = ("bold", "dwi", "asl", "fieldmap", "phase")
DEFAULT_SKIP = KINDS
WHY_KIND = {
    "bold": "fMRI time series",
    "dwi": "diffusion-weighted series",
    "asl": "arterial spin labelling / perfusion series",
    "fieldmap": "field map",
    "phase": "phase image",
}
_SUFFIX_KIND = {
    "bold": "bold", "sbref": "bold", "cbv": "bold", "physio": "bold",
    "dwi": "dwi",
    "asl": "asl", "m0scan": "asl", "aslcontext": "asl",
    "phasediff": "fieldmap", "phase1": "fieldmap", "phase2": "fieldmap", "magnitude1": "fieldmap",
    "magnitude2": "fieldmap", "magnitude": "fieldmap", "fieldmap": "fieldmap", "epi": "fieldmap",
    "TB1map": "fieldmap", "TB1AFI": "fieldmap", "TB1TFL": "fieldmap", "TB1RFM": "fieldmap", "RB1map": "fieldmap",
    "TB1EPI": "fieldmap", "TB1DAM": "fieldmap", "TB1SRGE": "fieldmap", "RB1COR": "fieldmap",
    "phase": "phase",
}
SERIES_SUFFIXES = frozenset(("bold", "dwi", "asl", "cbv"))   # BIDS: always 4D
MR_SUFFIXES = frozenset(_SUFFIX_KIND) - {"physio", "aslcontext"}  # BIDS suffixes of MR images
_DESC_KIND = (  # checked in this order on SeriesDescription, ProtocolName and SequenceName (lower case)
    ("dwi", re.compile(r"dwi|dti|diff|tensor|\badc\b|trace|ep_b\d|\*ep_b|hardi|noddi")),
    ("asl", re.compile(r"asl|perfusion|\bm0\b|_m0|m0_")),
    ("fieldmap", re.compile(r"field.?map|fmap|b[01].?map|topup|sefm|spin.?echo.?field|gre_field|tb1|b1map")),
    ("bold", re.compile(r"bold|fmri|resting|\brest\b|_rest|rest_|\btask|_task|mbep2d|ep2d_bold|cmrr_mb")),
)
_TYPE_KIND = {"P": "phase", "PHASE": "phase", "DIFFUSION": "dwi", "ADC": "dwi", "TRACEW": "dwi", "FA": "dwi",
              "EADC": "dwi", "TRACE": "dwi", "ASL": "asl", "PERFUSION": "asl", "FIELD_MAP": "fieldmap",
              "B0_MAP": "fieldmap", "B1_MAP": "fieldmap", "FMRI": "bold"}


@dataclass(frozen=True)
class ImageFacts:
    """What the selector looks at (none of it identifying)."""

    path: str                     # release-relative NIfTI path (a DICOM series: its folder + "/")
    suffix: str                   # BIDS suffix (T1w, T2w, FLAIR, bold, ...) or ""
    modality: str                 # MR, CT, ... or "" when unknown
    body_part: str                # BodyPartExamined, or ""
    description: str              # SeriesDescription / ProtocolName, or ""
    extent_mm: tuple[float, ...]  # size of the 3D volume along its axes
    bare: bool = False            # nothing records modality, body part or BIDS suffix (headerless volume)
    volumes: int = 1              # volumes of a 4D image
    kind: str = ""                # bold | dwi | asl | fieldmap | phase, "" = anatomical or unknown
    in_plane_mm: float = 0.0      # largest pixel size in mm (0: not known)
    head_shape: bool | None = None  # the volume's shape test (None: not run yet)
    picture: str = ""             # head_picture(): a 2D picture derived from a head, or ""
    sagittal: bool = False        # its slices are sagittal (a thin one shows the facial profile)


@dataclass(frozen=True)
class Decision:
    method: str                   # deface | skullstrip | none
    reason: str
    pending: bool = False         # labels do not decide: run head_shape() and decide again


def _words(text: str) -> set[str]:
    """Upper-case words of a label without accents (``Schädel`` → ``SCHADEL``)."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return {w for w in re.split(r"[^A-Z0-9]+", plain.upper()) if w}


def names_head(body_part: str, head_parts) -> bool:
    """Whether a ``BodyPartExamined`` value names a head (any word of it, accents and case ignored)."""
    heads = set().union(*(_words(b) if len(_words(b)) == 1 else {"".join(sorted(_words(b)))} for b in head_parts))
    words = _words(body_part)
    return bool(words & heads) or "".join(sorted(words)) in heads


# ImageType values and descriptions of 3D renderings (volume, surface, cinematic rendering): a picture
# of the head's surface, which the face stage cannot deface (2D frames, no volume)
_RENDER_TYPES = frozenset(("VRT", "VR", "SSD", "VOLREN", "VOLUME_RENDER", "SURFACE_RENDER", "VOLUME RENDERING",
                           "CINEMATIC", "CVRT", "3DVR"))
_RENDER_TEXT = re.compile(r"\b(?:vrt|vr|ssd|3d[ _-]?vr|volume[ _-]?render\w*|surface[ _-]?render\w*|cinematic|cvrt)\b",
                          re.IGNORECASE)


def rendering(attrs: Mapping[str, Any], head_parts=("HEAD", "BRAIN", "SKULL", "FACE", "HEADNECK", "NEURO")) -> str | None:
    """Why a DICOM series is a 3D rendering that may show the face (its ImageType or description
    names a volume or surface rendering, and its body part is a head or not given), else None.
    Such a series is withheld: it is a picture, not a volume the face stage could deface."""
    types = {t.strip().upper() for t in str(attrs.get("ImageType") or "").split("\\")}
    text = " ".join(str(attrs.get(k) or "") for k in ("SeriesDescription", "ProtocolName"))
    if not (types & _RENDER_TYPES or _RENDER_TEXT.search(text)):
        return None
    body = str(attrs.get("BodyPartExamined") or "").strip()
    if body and not names_head(body, head_parts):
        return None
    return "a 3D rendering of the head (volume or surface rendering) can show the face"


# SOP classes of MR and CT images: an MR or CT head stored under another Modality value (PT, OT, …) is
# still one (red-team 6: an MR head labelled OT was released with its face)
_SOP_MODALITY = {"1.2.840.10008.5.1.4.1.1.4": "MR", "1.2.840.10008.5.1.4.1.1.4.1": "MR", "1.2.840.10008.5.1.4.1.1.4.3": "MR",
                 "1.2.840.10008.5.1.4.1.1.4.4": "MR", "1.2.840.10008.5.1.4.1.1.2": "CT",
                 "1.2.840.10008.5.1.4.1.1.2.1": "CT", "1.2.840.10008.5.1.4.1.1.2.2": "CT"}
SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"   # Secondary Capture and its multi-frame classes (PS3.4 B.5)
GENERIC_MODALITIES = frozenset(("", "OT", "SC"))   # say nothing about what the pixels show


def modality_of(attrs: Mapping[str, Any]) -> str:
    """The modality the face stage works with: MR / CT from the SOP class when it is an MR or CT
    image class (whatever ``Modality`` says), else ``Modality``: MR / CT, "" (not known: the volume
    decides, as for an empty body part) for a generic label (OT, SC, none), any other modality (PT,
    US, XA, …; a secondary capture of an ultrasound screen is US) as it is."""
    sop = str(attrs.get("SOPClassUID") or "").strip()
    if sop in _SOP_MODALITY:
        return _SOP_MODALITY[sop]
    modality = str(attrs.get("Modality") or "").strip().upper()
    if modality in ("MR", "CT"):
        return modality
    return "" if modality in GENERIC_MODALITIES else modality


# A 2D picture derived from a head (not a volume the face stage can deface): ImageType value 2
# SECONDARY, or a derived image whose values name a projection, reformat, rendering or screen save
# (PS3.3 C.7.6.1.1.2: value 1 DERIVED, value 3 implementation-defined: GE/Siemens/Philips exports
# write MIP, MINIP, MPR, 3D, REFORMATTED, SCREEN SAVE, PROJECTION IMAGE), a Secondary Capture, a
# colour picture, or an external-camera photograph (XC)
_PICTURE_TYPES = frozenset(("SECONDARY", "MIP", "MINIP", "MIN_IP", "MAX_IP", "MPR", "CURVED_MPR", "CPR", "3D",
                            "REFORMATTED", "SCREEN SAVE", "SCREEN_SAVE", "PROJECTION IMAGE", "PROJECTION_IMAGE",
                            "PROJECTION", "MAXIMUM", "MINIMUM", "MEAN"))
_COLOUR = ("RGB", "YBR", "PALETTE")


PROFILE = "sagittal slices of a head without 3D coverage show the facial profile"
SAGITTAL_COS = 0.87   # a slice normal within 30 degrees of left-right


def sagittal(normal) -> bool:
    """Whether a slice normal (patient or RAS coordinates) points left-right (within 30 degrees)."""
    n = np.asarray(normal, float)
    norm = float(np.linalg.norm(n))
    return norm > 0 and abs(float(n[0])) / norm >= SAGITTAL_COS


MIN_PICTURE_PIXELS = 32  # an image smaller than this on a side cannot show a recognisable face (an icon)


def head_picture(attrs: Mapping[str, Any], head_parts, matrix: tuple[int, ...] | None = None) -> str:
    """What 2D picture derived from a head a DICOM series is — a MIP, reformat, screen save,
    secondary capture, colour picture or external-camera photograph of MR, CT or unknown modality,
    with a body part that names a head or none (fail closed) — or "" when it is none of these.
    :func:`decide` withholds such a series when it is no volume the face stage could deface: it can
    show the face. Original single slices (localisers) are not pictures, nor are images of fewer
    than :data:`MIN_PICTURE_PIXELS` pixels on a side (``matrix``: rows and columns, when known)."""
    modality = modality_of(attrs)
    colour = str(attrs.get("PhotometricInterpretation") or "").strip().upper().startswith(_COLOUR)
    if modality not in ("MR", "CT", "", "XC") and not (modality in ("PT", "NM") and colour):
        return ""   # a PET in colour is a fusion with CT or MR, whose face outline it shows (red-team 7)
    if matrix and min(matrix[:2]) < MIN_PICTURE_PIXELS:
        return ""
    types = [t.strip().upper() for t in str(attrs.get("ImageType") or "").split("\\")]
    sop = str(attrs.get("SOPClassUID") or "").strip()
    derived = types[:1] == ["DERIVED"] and bool(set(types[1:]) & _PICTURE_TYPES)
    what = ("secondary capture" if sop.startswith(SC_SOP_PREFIX) else "photograph" if modality == "XC" else
            "derived picture (projection, reformat or screen save)" if derived or types[1:2] == ["SECONDARY"] else
            "colour picture" if colour else "")
    body = str(attrs.get("BodyPartExamined") or "").strip()
    if not what or (body and not names_head(body, head_parts)):
        return ""
    return f"a 2D {what} of a head"


def kind_of(suffix: str, path: str = "", attrs: Mapping[str, Any] | None = None, volumes: int = 1) -> tuple[str, str]:
    """(kind, evidence) of an image: bold / dwi / asl / fieldmap / phase, or ("", "") for an
    anatomical or unknown image. The BIDS suffix decides when it is known (an anatomical one too);
    else the DICOM ``ImageType`` values, an EPI time series, and the description / protocol /
    sequence name for a series of two or more volumes: a label alone does not make one 3D head
    volume faceless (a T1 described as ``T1_mprage_resting_study`` was released with its face)."""
    if suffix in _SUFFIX_KIND:
        return _SUFFIX_KIND[suffix], f"BIDS suffix {suffix}"
    if "_part-phase" in path:
        return "phase", "BIDS entity part-phase"
    if suffix:
        return "", ""
    attrs = attrs or {}
    types = {t.strip().upper() for t in str(attrs.get("ImageType") or "").split("\\")}
    for t in sorted(types & _TYPE_KIND.keys()):
        return _TYPE_KIND[t], f"ImageType {t}"
    text = " ".join(str(attrs.get(k) or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName",
                                                      "PulseSequenceName")).lower()
    for kind, pattern in _DESC_KIND:
        if pattern.search(text) and volumes >= 2:
            return kind, "series description / protocol / sequence name"
    epi = "EP" in str(attrs.get("ScanningSequence") or "").upper().split("\\") or \
        re.search(r"epi|ep2d|\bep_|epfid|epse", text) is not None
    if epi and volumes >= 2:
        return "bold", f"EPI time series of {volumes} volumes"
    return "", ""


def decide(facts: ImageFacts, face_cfg: Mapping[str, Any]) -> Decision:
    """The method for one image under the ``face`` configuration block, with the reason."""
    sel = face_cfg["select"]
    method = face_cfg.get("by_suffix", {}).get(facts.suffix, face_cfg["method"])
    if any(fnmatch.fnmatch(facts.path, p) for p in sel.get("exclude", ())):
        return Decision("none", "excluded by face.select.exclude")
    if any(fnmatch.fnmatch(facts.path, p) for p in sel.get("include", ())):
        return Decision(method, "included by face.select.include")
    suffixes = set(sel["suffixes"])
    modality = facts.modality.upper().strip()
    ext = facts.extent_mm
    flat = len(ext) < 3 or min(ext[:3]) < sel["min_extent_mm"]
    if facts.picture and flat:   # no volume to deface, and a picture can show the face (red-team 6)
        return Decision("withhold", f"{facts.picture} (no 3D coverage: extent {_mm(ext)} mm) can show the face "
                                    "and cannot be defaced")
    if "colour" in facts.picture and modality in ("PT", "NM"):   # a fused PET/CT or PET/MR of the head
        return Decision("withhold", f"{facts.picture} (PET/CT or PET/MR fusion) can show the face and cannot be "
                                    "defaced")
    if modality and modality not in ("MR", "CT"):
        return Decision("none", f"modality {modality}, neither MR nor CT")
    if not modality and facts.suffix and facts.suffix not in suffixes:
        return Decision("none", "no modality and not a head MRI suffix")
    kind = facts.kind
    if not kind:
        kind, _ = kind_of(facts.suffix, facts.path)
    labelled = ""   # a skipped kind named by a label only, overruled by a head-shaped volume (red-team 7)
    if kind and kind in sel.get("skip", DEFAULT_SKIP):
        skip = f"{WHY_KIND.get(kind, kind)}: not defaced (face.select.skip)"
        if flat or facts.volumes > MAX_BARE_VOLUMES or facts.in_plane_mm > LABEL_FACE_MM + 1e-3:
            return Decision("none", skip)
        if facts.head_shape is None:
            return Decision("none", f"{skip}, but a few volumes at face resolution: the volume decides", pending=True)
        if not facts.head_shape:
            return Decision("none", f"{skip}; the volume is not head-shaped")
        labelled = (f"labelled {WHY_KIND.get(kind, kind)}, but {facts.volumes} head-shaped volume"
                    f"{'s' * (facts.volumes != 1)} at face resolution")
    max_px = float(sel.get("max_in_plane_mm", MAX_IN_PLANE_MM))
    body = facts.body_part.strip()
    if flat and facts.sagittal and len(ext) >= 3 and sorted(ext)[1] >= sel["min_extent_mm"] \
            and (not facts.in_plane_mm or facts.in_plane_mm <= max_px + 1e-3) \
            and (not body or names_head(body, sel["body_parts"])):   # red-team 7
        return Decision("withhold", f"{PROFILE} (extent {_mm(ext)} mm) and cannot be defaced")
    if flat:
        return Decision("none", f"no 3D coverage of a face (extent {_mm(ext)} mm)")
    if facts.in_plane_mm and facts.in_plane_mm > max_px + 1e-3:
        return Decision("none", f"pixels of {facts.in_plane_mm:.2f} mm are too coarse to render a face "
                                f"(face.select.max_in_plane_mm {max_px:g})")
    if labelled:
        why = labelled
    elif body and names_head(body, sel["body_parts"]):
        why = "body part names a head"
    elif facts.suffix in suffixes and not body:  # T1w & co. name a contrast, not a body part
        why = f"suffix {facts.suffix}"
    elif facts.description and re.search(sel["description_pattern"], facts.description, re.I):
        why = "series description (or original file name) names head anatomy"
    elif facts.bare:
        hi = sel.get("max_extent_mm", MAX_EXTENT_MM)   # the minimum extent was checked above
        if facts.volumes > MAX_BARE_VOLUMES or max(ext[:3]) > hi:
            return Decision("none", f"no header says what this is, and it is not one head-sized volume (or a few echoes of one) "
                                    f"(extent {_mm(ext)} mm, {facts.volumes} volume{'s' * (facts.volumes != 1)})")
        why = "no header says what this is; a head-sized 3D volume"
    elif facts.head_shape is None:
        return Decision("none", "labels do not say whether this is a head", pending=True)
    elif facts.head_shape:
        why = "the volume is head-shaped" + (" (body part label not a head)" if body else "")
    else:
        return Decision("none", "the volume is not head-shaped" + (" (body part label not a head)" if body else ""))
    if method == "none":
        return Decision("none", f"{why}; method none configured")
    return Decision(method, f"{why}, extent {_mm(ext)} mm")


def head_shape(data: np.ndarray, zooms, threshold: float) -> tuple[bool, str]:
    """Whether a RAS-ordered volume holds a head: a run of at least ``HEAD_RUN_MM`` of axial
    sections (the largest section of each slice, of objects of 50 ml or more above ``threshold``) that are head-sized (``HEAD_WIDTH_MM`` left
    to right, ``HEAD_DEPTH_MM`` front to back), at least as deep as wide (a trunk is wider than
    deep) and compact (filling most of their bounding ellipse). Computed at about 4 mm."""
    from scipy import ndimage
    zooms = np.asarray(zooms, float)
    step = np.maximum(1, np.round(4.0 / zooms)).astype(int)
    d = data[::step[0], ::step[1], ::step[2]]
    if signed_map(d):
        return False, "a signed map (phase or field map: values spread evenly on both sides of zero), no head picture"
    z = zooms * step
    m = ndimage.binary_opening(d > threshold, iterations=1)
    labels, n = ndimage.label(m)
    if n == 0:
        return False, "no tissue"
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    m = np.isin(labels, np.flatnonzero(sizes * float(np.prod(z)) >= 50_000.0))  # objects of 50 ml and more
    best = run = 0
    for k in range(m.shape[2]):
        sl, count = ndimage.label(ndimage.binary_fill_holes(m[:, :, k]))
        if count > 1:                                   # the largest section of this slice
            sl = sl == np.argmax(np.bincount(sl.ravel())[1:]) + 1
        xs, ys = np.nonzero(sl)
        ok = False
        if xs.size:
            w = (xs.max() - xs.min() + 1) * z[0]
            dep = (ys.max() - ys.min() + 1) * z[1]
            fill = xs.size * z[0] * z[1] / (np.pi / 4 * w * dep)
            ok = (HEAD_WIDTH_MM[0] <= w <= HEAD_WIDTH_MM[1] and HEAD_DEPTH_MM[0] <= dep <= HEAD_DEPTH_MM[1]
                  and dep >= 0.95 * w and fill >= 0.6)
        run = run + 1 if ok else 0
        best = max(best, run)
    mm = best * z[2]
    return mm >= HEAD_RUN_MM, f"{mm:.0f} mm of head-shaped axial sections"


def signed_map(data: np.ndarray) -> bool:
    """Whether a volume is a phase or field map rather than a magnitude picture: between a quarter
    and three quarters of its non-zero voxels are negative and each quarter of its range (0.5th to
    99.5th percentile) holds a tenth of them (wrapped phase and its noise fill the range). A
    magnitude image has no negative values; a CT in Hounsfield units has its air at one end."""
    nz = np.asarray(data, np.float32)
    nz = nz[nz != 0]
    if nz.size < 1000 or not 0.25 <= float((nz < 0).mean()) <= 0.75:
        return False
    lo, hi = np.percentile(nz, [0.5, 99.5])
    if hi <= lo:
        return False
    counts, _ = np.histogram(nz, bins=4, range=(float(lo), float(hi)))
    return bool(counts.min() >= 0.1 * nz.size)


def hounsfield(data: np.ndarray) -> bool:
    """Whether a volume holds CT values: at least a fifth of its voxels at air (-1100 to -500 HU)
    and a twentieth in soft tissue (-100 to 100 HU). PET activity and SUV are never far below zero."""
    d = np.asarray(data, np.float32)[::2, ::2, ::2]
    n = max(d.size, 1)
    air = np.count_nonzero((d >= -1100) & (d <= -500)) / n
    soft = np.count_nonzero((d >= -100) & (d <= 100)) / n
    return air >= 0.2 and soft >= 0.05


def ct_under_pet_label(facts: ImageFacts, decision: Decision, face_cfg: Mapping[str, Any],
                       volume: Callable[[], np.ndarray]) -> tuple[ImageFacts, Decision] | None:
    """The facts and decision of a CT for an image under a PET label (PT, NM) of a head, or of no
    body part, that its label leaves undefaced and whose values (``volume()``) are Hounsfield units
    (:func:`hounsfield`; red-team 7: a CT head under the PET SOP class kept its face); None for
    anything else, and for a volume that cannot be read here (a PET stays as it was)."""
    body = facts.body_part.strip()
    if facts.modality not in ("PT", "NM") or decision.method != "none" or facts.picture or \
            (body and not names_head(body, face_cfg["select"]["body_parts"])):
        return None
    try:
        if not hounsfield(volume()):
            return None
    except Exception:  # noqa: BLE001 - a PET that cannot be read here stays as it was
        return None
    facts = replace(facts, modality="CT")
    d = decide(facts, face_cfg)
    return facts, Decision(d.method, f"CT values under a PET label; {d.reason}", d.pending)


def label_image(data: np.ndarray) -> bool:
    """Whether a volume is a mask or label image (a segmentation, a region of interest): whole
    numbers only, at most :data:`MAX_LABELS` of them, and piecewise constant (at least
    :data:`LABEL_FLAT` of its non-zero voxels equal their neighbour along each axis). A greyscale
    head, 8-bit ones too, has noise and gradients everywhere (chris_t1, 8-bit: 0.04)."""
    d = np.asarray(data)
    if d.ndim < 3 or min(d.shape[:3]) < 2:
        return False
    d = d.reshape(d.shape[:3] + (-1,))[..., 0]
    if d.dtype.kind == "f" and not np.array_equal(d, np.round(d)):
        return False
    nz = d != 0
    for axis in range(3):
        a = np.moveaxis(d, axis, 0)
        m = np.moveaxis(nz, axis, 0)[:-1]
        if m.any() and float((a[1:] == a[:-1])[m].mean()) < LABEL_FLAT:
            return False
    return np.unique(d).size <= MAX_LABELS


MAX_LABELS = 1000   # FreeSurfer's aparc+aseg has about 110 labels, numbered up to 2035
LABEL_FLAT = 0.8
HEAD_WIDTH_MM = (100.0, 210.0)
HEAD_DEPTH_MM = (120.0, 260.0)
HEAD_RUN_MM = 40.0


def extent_mm(shape, zooms) -> tuple[float, ...]:
    """Size of a volume along its first three axes (a 2D image has an extent of one slice)."""
    shape = tuple(shape) + (1,) * max(0, 3 - len(shape))
    zooms = tuple(zooms) + (1.0,) * max(0, 3 - len(zooms))
    return tuple(float(n) * float(z) for n, z in zip(shape[:3], zooms[:3]))


def _mm(ext) -> str:
    return "x".join(str(int(np.round(e))) for e in ext)
