"""Clean Pixel Data for one de-identified DICOM file: select, detect, redact, write back.

:class:`PixelCleaner` runs on the file the DICOM engine has just written into the subject's
staging folder; the selection and the patient's identifiers come from the original header
values the engine captured while streaming (:data:`CAPTURE_TAGS`), so the original is read once.
Files the policy does not select are not opened again: their pixel data stay byte for byte.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from . import identify, ink, layout, ocr, render, thumbs
from .layout import Box
from .pixeldata import Frames, PixelDataError
from .policy import (Decision, HeaderFacts, decide, load_policy, load_regions, load_series_overrides, raw_key,
                     regions_for, tiled_wsi, wsi_level)

SELECTION_KEYWORDS = ("Modality", "SOPClassUID", "ImageType", "BurnedInAnnotation", "Manufacturer",
                      "ManufacturerModelName", "Rows", "Columns", "SpecimenLabelInImage", "SpecificCharacterSet",
                      "SeriesInstanceUID")
# the pixel module, so the screen can view native pixel data without parsing the file again
PIXEL_MODULE_KEYWORDS = ("SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "NumberOfFrames",
                         "PhotometricInterpretation", "PlanarConfiguration")
_SELECTION_TAGS = tuple(tag_for_keyword(k) for k in (*SELECTION_KEYWORDS, "NumberOfFrames") if k != "SeriesInstanceUID")
CAPTURE_TAGS = frozenset(tag_for_keyword(k) for k in (*SELECTION_KEYWORDS, *PIXEL_MODULE_KEYWORDS,
                                                       *identify.HEADER_KEYWORDS))
CLEAN_PIXEL_CODE = ("113101", "Clean Pixel Data Option")
DEFAULTS = {"clean": "auto", "policy": "all_text", "wsi_label": "drop", "selection_file": "", "regions_file": "",
            "series_file": ""}
UNREAD, TALL = 0.5, 0.1  # see _text_like
READABLE = 0.75  # identifiers_only: text read with less confidence is redacted
READ_CACHE_SIZE = 64
_READ_CACHE: dict[bytes, tuple[list, bool]] = {}  # frame key -> (merged boxes, every box read)
MOVING_SHARE = 0.2  # a multi-frame's moving area is the sector when it covers this share of the frame
MOVING_MAX_SHARE = 0.9  # ... and less than this: a stack whose frames differ everywhere has no fixed overlay area


class PixelError(ValueError):
    """A selected file whose pixels cannot be cleaned: it must not be released (quarantine reason)."""


@dataclass(frozen=True)
class Redaction:
    frame: int
    box: Box
    rule: str  # ocr:<policy rule> | region:<note> | wsi:label | wsi:overview-label
    text_hash: str = ""

    def audit(self) -> dict:
        d = {"frame": self.frame, "box": list(self.box), "rule": self.rule}
        if self.text_hash:
            d["text_hash"] = self.text_hash
        return d


@dataclass
class Outcome:
    """What happened to one file: ``skipped`` (not selected), ``no_text``, ``redacted``,
    ``blanked`` (WSI label), ``dropped`` (WSI label not released).  (Files of a series the
    screen passed are recorded by :mod:`.subject` as ``screened``, or ``kept`` when cleaning was
    switched off for the series.)"""

    action: str
    why: str
    redactions: list[Redaction] = field(default_factory=list)
    before_png: bytes | None = None
    after_png: bytes | None = None
    transfer_syntax: str | None = None
    frames: int = 0
    ocr_runs: int = 0

    def audit(self) -> dict:
        d = {"action": self.action, "why": self.why}
        if self.redactions:
            d["redactions"] = [r.audit() for r in self.redactions]
        if self.transfer_syntax:
            d["transfer_syntax"] = self.transfer_syntax
        return d


def sha_text(text: str) -> str:
    return hashlib.sha256(("deidflow-pixel-text\x00" + text).encode("utf-8")).hexdigest()[:16]


class PixelCleaner:
    """The ``pixels`` settings of a run, applied file by file."""

    def __init__(self, settings: Mapping | None = None, *, text_hash: Callable[[str], str] = sha_text,
                 threads: int = 1, thumbnails: bool = True):
        s = {**DEFAULTS, **(settings or {})}
        self.mode = "off" if s["clean"] in (None, False, "off") else s["clean"]
        self.policy, self.wsi_label = s["policy"], s["wsi_label"]
        self.rules = load_policy(s["selection_file"] or "")
        self.regions = load_regions(s["regions_file"] or "")
        self.series_overrides = load_series_overrides(s["series_file"] or "")
        self._classes: dict[tuple, tuple[Decision, bool, bool]] = {}
        self.text_hash = text_hash
        self.threads = threads
        self.thumbnails = thumbnails
        if self.mode != "off":
            ocr.model_files()  # fail now, with the install hint, not in the middle of a subject

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def capture(self) -> frozenset[int]:
        """The original top-level elements the DICOM engine must hand over (selection, identifiers)."""
        return CAPTURE_TAGS

    def decide(self, header: Dataset | None) -> Decision:
        return self.classify(header)[0]

    def classify(self, header: Dataset | None) -> tuple[Decision, bool, bool, bool]:
        """(the header rules' decision, is it an image, is it a whole-slide pyramid level, is it a
        whole-slide image stored as tiles), remembered per
        distinct set of the selection values (the files of a series repeat them; decoding them
        for every file costs as much as the screen)."""
        if header is None:
            return decide(HeaderFacts(), self.mode, self.rules), False, False, False
        key = raw_key(header, _SELECTION_TAGS)
        hit = self._classes.get(key)
        if hit is None:
            if len(self._classes) > 1024:
                self._classes.clear()
            h = HeaderFacts.from_dataset(header)
            hit = self._classes[key] = (decide(h, self.mode, self.rules), h.rows > 0 and h.columns > 0, wsi_level(h),
                                        tiled_wsi(h))
        return hit

    # -- one file -----------------------------------------------------------------------------
    def process(self, path: Path, header: Dataset | None, ids: identify.Identifiers | None = None,
                decision: Decision | None = None) -> Outcome:
        """Clean the de-identified file ``path`` in place (atomically) when the policy selects it
        (or ``decision`` says so: the screen found text in its series).

        ``header`` holds the original values of :data:`CAPTURE_TAGS`; ``ids`` the patient's
        identifiers (default: from ``header``).  Raises PixelError for a selected file that
        cannot be cleaned."""
        d = decision or self.decide(header)
        if d.action == "skip":
            return Outcome("skipped", d.why)
        if d.action == "wsi_label" and self.wsi_label == "drop":
            return Outcome("dropped", d.why)
        try:
            ds = pydicom.dcmread(path)
            frames = Frames(ds)
        except PixelDataError as exc:
            raise PixelError(f"pixel data could not be cleaned: {exc}") from None
        except Exception as exc:
            raise PixelError(f"pixel data could not be cleaned: {type(exc).__name__}") from None
        if ids is None:
            ids = identify.Identifiers.from_dataset(header)
        facts = HeaderFacts.from_dataset(header if header is not None else ds)
        if d.action == "wsi_label":
            out = Outcome("blanked", d.why, frames=frames.n)
            first = frames.frame(0)
            for i in range(frames.n):
                box = (0, 0, frames.cols, frames.rows)
                frames.fill(i, box)
                out.redactions.append(Redaction(i, box, "wsi:label"))
            self._thumbs(out, frames, 0, first, [(0, 0, frames.cols, frames.rows)])
        else:
            out = self._detect_and_fill(frames, facts, ids, d)
        if not out.redactions:
            return out
        out.transfer_syntax = self._write(ds, frames, path, label_blanked=d.action.startswith("wsi"))
        return out

    def _detect_and_fill(self, frames: Frames, facts: HeaderFacts, ids: identify.Identifiers,
                         d: Decision) -> Outcome:
        out = Outcome("no_text", d.why, frames=frames.n)
        shape = (frames.rows, frames.cols)
        fixed = [(layout.clip(r.box, shape), f"region:{r.note or r.manufacturer}")
                 for r in regions_for(facts, self.regions)]
        fixed = [(b, why) for b, why in fixed if b is not None]
        signature = _signature_mask(frames) if frames.n > 1 else None
        cache: dict[bytes, list[tuple[Box, str, str]]] = {}
        thumb_done = False
        for i in range(frames.n):
            frame = frames.frame(i)
            key = _frame_key(frame, signature)
            if key not in cache:
                cache[key] = self._boxes(frame, frames.invert, ids, d, shape)
                out.ocr_runs += 1
            found = cache[key]
            boxes = [(b, why, "") for b, why in fixed] + found
            if not boxes:
                continue
            before = render.display(frame, frames.invert) if (self.thumbnails and not thumb_done) else None
            for box, why, text in boxes:
                frames.fill(i, box)
                out.redactions.append(Redaction(i, box, why, self.text_hash(text) if text else ""))
            if before is not None:
                self._thumbs(out, frames, i, before, [b for b, _, _ in boxes], rendered=True)
                thumb_done = True
        if out.redactions:
            out.action = "redacted"
        return out

    def _boxes(self, frame: np.ndarray, invert: bool, ids: identify.Identifiers, d: Decision,
               shape: tuple[int, int]) -> list[tuple[Box, str, str]]:
        """Redaction boxes of one frame: (box, rule, text read)."""
        merged = self._read(frame, invert, shape, text=self.policy == "identifiers_only" and d.action != "wsi_overview")
        if d.action == "wsi_overview":
            return _overview_label(merged, shape)
        if not merged:
            return []
        gray = render.normalized(render.gray_of(frame), invert)
        from .codes import code_boxes  # a frame with text: its barcodes and QR codes go with it (never harmless)
        out = [(box, why, "") for box, why in code_boxes(gray)]
        if self.policy == "identifiers_only":
            for tb, texts, conf in merged:
                rule = next((r for r in (identify.match(t, ids) for t in texts) if r), None)
                if rule is None and conf < READABLE:
                    rule = "unreadable"  # text that cannot be read cannot be shown to be harmless
                if rule:
                    # only the rows the letters occupy (the rest of the image is meant to stay)
                    for box in ink.text_rows(gray, layout.pad(tb, shape, layout.PAD_LINE)):
                        out.append((box, f"ocr:{rule}", texts[0]))
            return out
        boxes = [layout.pad(tb, shape) for tb, _, _ in merged]
        texts = {layout.pad(tb, shape): t[0] for tb, t, _ in merged}
        for box in ink.stray_glyphs(gray, [tb for tb, _, _ in merged]):  # letters the detector missed
            if not any(layout.intersection(box, b) == layout.area(box) for b in boxes):
                boxes.append(box)
                texts.setdefault(box, "")
        for block in layout.blocks(boxes):
            inside = " ".join(texts[b] for b in boxes if layout.intersection(b, block) == layout.area(b))
            out.append((block, "ocr:all_text", inside))
        return out

    def _read(self, frame: np.ndarray, invert: bool, shape: tuple[int, int],
              text: bool = True) -> list[tuple[Box, list[str], float]]:
        """Text found and read in one frame (both tone curves), merged; remembered for the last
        few distinct frames, so a frame seen again (another policy, a repeated frame) is not
        read twice.  ``text=False`` (``all_text``, overviews: the boxes decide, not the words)
        reads only the tall boxes, which may be anatomy rather than text (see
        :func:`_text_like`); the others come back unread (text ``""``).  Recognition is about
        half of the OCR time."""
        key = _frame_key(frame, None) + bytes([invert])
        hit = _READ_CACHE.get(key)
        if hit is not None and (hit[1] or not text):
            return hit[0]
        eng = ocr.engine(self.threads)
        found: list[ocr.TextBox] = []
        for curve, img in render.renderings(frame, invert).items():
            boxes, scaled, s = eng.detect(img, curve)
            if not text:
                found.extend(b for b in boxes if b.height <= TALL * shape[0])
                boxes = [b for b in boxes if b.height > TALL * shape[0]]
            found.extend(eng.read(scaled, s, boxes))
        merged = _merge([t for t in found if _text_like(t, shape)])
        if len(_READ_CACHE) >= READ_CACHE_SIZE:
            _READ_CACHE.pop(next(iter(_READ_CACHE)))
        _READ_CACHE[key] = (merged, text)
        return merged

    def _thumbs(self, out: Outcome, frames: Frames, i: int, before: np.ndarray, boxes, rendered: bool = False) -> None:
        if not self.thumbnails:
            return
        b8 = before if rendered or before.dtype == np.uint8 and before.ndim == 3 else render.display(before, frames.invert)
        out.before_png = thumbs.png(b8, boxes)
        out.after_png = thumbs.png(render.display(frames.frame(i), frames.invert), boxes, colour=(0, 255, 0))

    def _write(self, ds: Dataset, frames: Frames, path: Path, label_blanked: bool) -> str:
        try:
            ts = frames.write_back()
        except Exception as exc:
            raise PixelError(f"redacted pixel data could not be encoded: {type(exc).__name__}") from None
        ds.BurnedInAnnotation = "NO"  # only now: the text found has been blanked
        if label_blanked and "SpecimenLabelInImage" in ds:
            ds.SpecimenLabelInImage = "NO"
        _mark(ds)
        tmp = path.with_name(f".tmp-pixels-{path.name}.{os.getpid()}")
        try:
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise
            raise PixelError(f"redacted file could not be written: {type(exc).__name__}") from None
        return ts


def _mark(ds: Dataset) -> None:
    """Record the Clean Pixel Data Option (CID 7050 code 113101) in the de-identification method."""
    code, meaning = CLEAN_PIXEL_CODE
    seq = ds.get("DeidentificationMethodCodeSequence")
    if seq is None:
        ds.DeidentificationMethodCodeSequence = []
        seq = ds.DeidentificationMethodCodeSequence
    if not any(getattr(item, "CodeValue", None) == code for item in seq):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
        seq.append(item)
    method = ds.get("DeidentificationMethod")
    values = [] if method is None else ([method] if isinstance(method, str) else list(method))
    if "burned-in text redacted (deidflow pixels)" not in values:
        ds.DeidentificationMethod = [*values, "burned-in text redacted (deidflow pixels)"]


def _merge(found: list[ocr.TextBox]) -> list[tuple[Box, list[str], float]]:
    """One box per text: detections of the same text in the two renderings are united; the text
    read with the higher confidence comes first; also that confidence."""
    groups: list[tuple[Box, list[ocr.TextBox]]] = []
    for tb in sorted(found, key=lambda t: (t.y0, t.x0, t.curve)):
        for gi, (box, members) in enumerate(groups):
            if layout.same_text(box, tb.box):
                groups[gi] = (layout.union(box, tb.box), [*members, tb])
                break
        else:
            groups.append((tb.box, [tb]))
    out = []
    for box, members in groups:
        members = sorted(members, key=lambda m: -m.text_score)
        out.append((box, [m.text for m in members], members[0].text_score))
    return out


def _text_like(t: ocr.TextBox, shape: tuple[int, int]) -> bool:
    """Drop detections that are anatomy or devices, not text: tall boxes (over a tenth of the
    frame) in which the recognizer reads nothing with confidence."""
    return t.text_score >= UNREAD or t.height <= TALL * shape[0]


def _overview_label(merged: list[tuple[Box, list[str], float]], shape: tuple[int, int]) -> list[tuple[Box, str, str]]:
    """The slide label's area in an overview image: the end of the slide nearer to the text
    found, across the whole slide, from the short edge to the farther of the text's far side
    and the slide's width (labels are about square and cover one end of the slide)."""
    if not merged:
        return []
    h, w = shape
    u = merged[0][0]
    for box, _, _ in merged[1:]:
        u = layout.union(u, box)
    u = layout.pad(u, shape, 0.5)
    # a slide label is about as long as the slide is wide (a 25 x 25 mm label on a 25 x 75 mm
    # slide): blank at least that square, more when the text found reaches further
    if w >= h:  # slide lies horizontally: the label is at the left or right end
        square = min(h, w // 2)
        box = (0, 0, max(u[2], square), h) if u[0] < w - u[2] else (min(u[0], w - square), 0, w, h)
    else:
        square = min(w, h // 2)
        box = (0, 0, w, max(u[3], square)) if u[1] < h - u[3] else (0, min(u[1], h - square), w, h)
    return [(box, "wsi:overview-label", " ".join(t[0] for _, t, _ in merged))]


def _signature_mask(frames: Frames) -> tuple[slice, slice] | None:
    """The moving image area of a multi-frame (bounding box of pixels that differ from frame 0),
    when it is large enough to be the image rather than a changing overlay, and leaves a fixed
    area for overlays: an enhanced MR or CT stack differs everywhere (noise), and text drawn on
    some of its frames only was never looked at (frame 0's detection was reused for all)."""
    first = frames.frame(0)
    moving = np.zeros(first.shape[:2], bool)
    for i in range(1, frames.n):
        diff = frames.frame(i) != first
        moving |= diff.any(axis=-1) if diff.ndim == 3 else diff
    ys, xs = np.nonzero(moving)
    if ys.size == 0:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if not MOVING_SHARE * moving.size <= (y1 - y0) * (x1 - x0) < MOVING_MAX_SHARE * moving.size:
        return None
    return slice(y0, y1), slice(x0, x1)


def _frame_key(frame: np.ndarray, moving: tuple[slice, slice] | None) -> bytes:
    """Detection cache key: the frame's pixels outside the moving area.  Frames of a cine loop
    whose overlays did not change share one detection (the boxes found inside the moving area
    of the first such frame are blanked in all of them)."""
    f = np.ascontiguousarray(frame)
    if moving is not None:
        f = f.copy()
        f[moving] = 0
    return hashlib.sha1(f.tobytes()).digest() + str(f.shape).encode()
