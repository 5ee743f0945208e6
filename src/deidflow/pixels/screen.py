"""Screening: is there burned-in text in a series?  ``pixels.clean: auto`` looks, not only at headers.

Headers that should announce burned-in text (Modality, ImageType, BurnedInAnnotation) are often
empty or wrong in real exports, so every image series the header rules do not already select is
screened.  Which frames:

* every frame of a small series (at most :data:`SMALL_SERIES` frames);
* otherwise the first, middle and last frames and :data:`SPREAD` more spread between them
  (the *sample*), plus every frame whose pixel statistics differ from the series' (screen
  captures and key images slipped into a series, see :func:`outliers`) and every frame with
  strong edges where its neighbours are flat background (a name drawn onto one slice at the
  anatomy's brightness, see :func:`isolated_edges`).

How: the text detector (the PP-OCRv4 model :mod:`.ocr` ships) runs on a render scaled so its
short side is :data:`SCREEN_SIDE` (downsampled for large images, 2× for 256² MR), both tone
curves; the recognizer then reads only the boxes found, and text counts as found when a box
reads as at least :data:`MIN_CHARS` letters or digits with confidence :data:`MIN_SCORE`
(anatomy the detector mistakes for text reads as nothing; see docs/pixels.md for the figures).
In a long series, text burned in by the modality or the PACS sits at the same place on every
frame while the anatomy changes: the sampled frames are compared first, and the detector runs
on them only where strong edges stay in place from frame to frame (:func:`constant_edges`), so
a clean 35-slice MR series costs a few milliseconds.

Decoding stays cheap: native pixel data of the staged file is viewed in its own bytes
(:func:`read_frames`), compressed data goes through pydicom.
"""
from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.datadict import tag_for_keyword

from . import ocr, render
from .pixeldata import Frames
from .policy import raw_key

SMALL_SERIES = 8
SPREAD = 2
SCREEN_SIDE = 512
MIN_CHARS = 3
MIN_SCORE = 0.5
MAX_OUTLIERS = 8
READ_BATCH = 6
MAX_UP = 4.0
EDGE = 0.2  # an edge: a step of this share of the frame's range between neighbouring pixels
MIN_CONSTANT_EDGES = 12  # constant edge pixels that make the detector look (a character has dozens)
GLYPH_AREA = 150  # objects of at most this many pixels (half resolution) can be letters, not anatomy
MIN_GLYPHS = 3  # ... and at least this many of them (a word)
GLYPH_MARGIN = 6  # ... when a neighbouring frame is flat background this far (half-resolution pixels) around
_FRAME_TAGS = tuple(tag_for_keyword(k) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                                                  "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation",
                                                  "PlanarConfiguration"))
_ALNUM = re.compile(r"[0-9A-Za-z]")


class ScreenError(ValueError):
    """A file of the series whose pixels cannot be read (``index`` in the list screened)."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


@dataclass(frozen=True)
class Found:
    """Text the screen found: where (file index in the series, frame), its box and confidence."""

    file: int
    frame: int
    box: tuple[int, int, int, int]
    score: float

    def as_dict(self) -> dict:
        return {"file": self.file, "frame": self.frame, "box": list(self.box), "score": round(self.score, 3)}


@dataclass
class Result:
    """What the screen did for one series."""

    frames: int = 0  # frames in the series
    screened: int = 0  # frames the detector looked at (whole or in part)
    sampled: int = 0  # frames compared for constant edges (long series)
    outliers: int = 0  # frames whose statistics differ from the series'
    detector_runs: int = 0
    found: list[Found] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def text(self) -> bool:
        return bool(self.found)


# -- reading ----------------------------------------------------------------------------------
def _transfer_syntax(data: bytes) -> str | None:
    """The transfer syntax UID in the file meta group of a Part-10 file's bytes."""
    if data[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 2:
            return None
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,), start = struct.unpack_from("<I", data, pos + 8), pos + 12
        else:
            (length,), start = struct.unpack_from("<H", data, pos + 6), pos + 8
        if elem == 0x0010:
            return data[start:start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    return None


class _Native:
    """Native pixel data viewed in a file's bytes (what the screen needs of :class:`Frames`)."""

    native = True

    def __init__(self, arr: np.ndarray, invert: bool, stored: int, bits: int, signed: bool):
        self.arr, self.invert, self.n = arr, invert, arr.shape[0]
        self._shift = bits - stored if 0 < stored < bits and arr.ndim == 3 else 0
        self._signed = signed

    def frame(self, i: int) -> np.ndarray:
        f = self.arr[i]
        if not self._shift:
            return f
        if self._signed:
            return (f << self._shift) >> self._shift
        return f & ((1 << (f.dtype.itemsize * 8 - self._shift)) - 1)


_MODULES: dict[tuple, tuple | None] = {}  # raw pixel-module values -> parsed layout (None: not native)


def _module(header) -> tuple | None:
    """(rows, cols, spp, bits, stored, signed, frames, photometric, planar) of the captured
    header, parsed once per distinct set of raw values (a series repeats them)."""
    key = raw_key(header, _FRAME_TAGS)
    if key in _MODULES:
        return _MODULES[key]
    try:
        rows, cols = int(header.Rows), int(header.Columns)
        spp = int(header.get("SamplesPerPixel") or 1)
        bits = int(header.BitsAllocated)
        stored = int(header.get("BitsStored") or bits)
        signed = int(header.get("PixelRepresentation") or 0) == 1
        n = int(header.get("NumberOfFrames") or 1)
        pi = str(header.PhotometricInterpretation).strip().upper()
        planar = int(header.get("PlanarConfiguration") or 0)
        ok = bits in (8, 16, 32) and ((pi in ("MONOCHROME1", "MONOCHROME2") and spp == 1) or (pi == "RGB" and spp == 3))
        mod = (rows, cols, spp, bits, stored, signed, n, pi, planar) if ok else None
    except Exception:
        mod = None
    if len(_MODULES) > 256:
        _MODULES.clear()
    _MODULES[key] = mod
    return mod


def _tail_region(data: bytes, nbytes: int) -> tuple[int, int] | None:
    """(start, end) of the pixel data value: checked in place when (7FE0,0010) is the last element
    (the usual layout; its length is ``nbytes``, padded to even), else found by the leak scan's
    search from the end of the file."""
    size = len(data)
    for length in {nbytes + (nbytes & 1), nbytes}:
        start = size - length
        for head in (12, 8):  # explicit VR (OB/OW, reserved, 4-byte length) or implicit VR
            i = start - head
            if i >= 132 and data[i:i + 4] == b"\xe0\x7f\x10\x00" and \
                    struct.unpack_from("<I", data, start - 4)[0] == length:
                return start, size
    from ..qc.leakscan import pixel_region
    return pixel_region(data)


def read_frames(path: Path, header):
    """The frames of a staged file.  Native little-endian grey or RGB pixel data is viewed
    straight in the file's bytes, laid out by the pixel module in ``header`` (the original values
    the engine captured; the profile keeps them); anything else is decoded by pydicom
    (:class:`Frames`).  Raises what Frames raises."""
    import pydicom
    data = Path(path).read_bytes()
    ts = _transfer_syntax(data)
    mod = _module(header) if header is not None and ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") else None
    if mod is not None:
        rows, cols, spp, bits, stored, signed, n, pi, planar = mod
        count = n * rows * cols * spp
        region = _tail_region(data, count * bits // 8)
        if region is not None and region[1] - region[0] >= count * bits // 8:
            dtype = np.dtype(f"<{'i' if signed and spp == 1 else 'u'}{bits // 8}")
            a = np.frombuffer(data, dtype, count=count, offset=region[0])
            if spp == 1:
                a = a.reshape(n, rows, cols)
            elif planar == 1:
                a = a.reshape(n, spp, rows, cols).transpose(0, 2, 3, 1)
            else:
                a = a.reshape(n, rows, cols, spp)
            return _Native(a, pi == "MONOCHROME1", stored, bits, signed)
    from io import BytesIO
    return Frames(pydicom.dcmread(BytesIO(data)))


# -- which frames -----------------------------------------------------------------------------
def sample(n: int) -> list[int]:
    """Frame positions screened in a series of ``n`` frames: every one up to SMALL_SERIES, else
    the first, middle and last and SPREAD more evenly between."""
    if n <= SMALL_SERIES:
        return list(range(n))
    picks = {(n - 1) // 2}
    picks.update(round((n - 1) * k / (SPREAD + 2)) for k in range(SPREAD + 3))
    return sorted(picks)


def stats(frame: np.ndarray) -> tuple:
    """Cheap statistics of one frame (on every other pixel of every other row): shape, mean,
    standard deviation, minimum, maximum and the share of pixels at the maximum (flat overlays
    and text raise it)."""
    sub = render.gray_of(frame)[::2, ::2]
    hi = int(sub.max())
    return (frame.shape, float(sub.mean()), float(sub.std()), int(sub.min()), hi,
            float(np.count_nonzero(sub == hi)) / max(1, sub.size))


def outliers(all_stats: list[tuple]) -> list[int]:
    """Frames whose statistics differ from the series' (in series order): another shape than
    most frames; a mean or spread that jumps away from both neighbours by more than a tenth of
    the series' range and six typical steps (anatomy changes smoothly from slice to slice, a key
    image or screen capture slipped in does not); or more pixels at the frame's maximum than
    the series has (half a percent of the frame and four times the median: flat text, graphics)."""
    n = len(all_stats)
    if n <= SMALL_SERIES:
        return []
    shapes = [s[0] for s in all_stats]
    common = max(set(shapes), key=shapes.count)
    span = max(1, max(s[4] for s in all_stats) - min(s[3] for s in all_stats))
    out = {i for i, s in enumerate(all_stats) if s[0] != common}
    for col in (1, 2):
        v = np.array([s[col] for s in all_stats], float) / span
        step = np.abs(np.diff(v))
        limit = max(0.1, 6 * float(np.median(step)))
        left = np.concatenate([[np.inf], step])  # jump from the previous frame
        right = np.concatenate([step, [np.inf]])  # jump to the next frame
        jump = np.minimum(left, right)
        jump[0], jump[-1] = step[0] if step[1] < limit / 2 else 0, step[-1] if step[-2] < limit / 2 else 0
        out.update(np.flatnonzero(jump > limit).tolist())
    ink = np.array([s[5] for s in all_stats], float)
    med = float(np.median(ink))
    out.update(np.flatnonzero((ink > med + 0.005) & (ink > 4 * med)).tolist())
    return sorted(out)


def edge_map(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(strong edges, flat background, background GLYPH_MARGIN pixels in from its border) of one
    frame on every other pixel of every other row: an edge is a step of EDGE of the frame's range
    to the next pixel; background lies in the lowest tenth of the range (air, the dark outside of
    the body)."""
    g = render.gray_of(frame)[::2, ::2].astype(np.int32)
    lo, hi = int(g.min()), int(g.max())
    step = max(1.0, EDGE * (hi - lo))
    edge = np.zeros(g.shape, bool)
    edge[:, 1:] |= np.abs(np.diff(g, axis=1)) >= step
    edge[1:, :] |= np.abs(np.diff(g, axis=0)) >= step
    bg = g <= lo + 0.1 * (hi - lo)
    return edge, bg, _eroded(bg, GLYPH_MARGIN)


def isolated_edges(cur: tuple[np.ndarray, ...], *neighbours: tuple[np.ndarray, ...]) -> int:
    """Strong edges of a frame where every neighbouring frame is flat background (two pixels in
    from its border): text or graphics drawn onto one slice of a series, which no neighbour shows
    (anatomy continues from slice to slice; burned-in text on every frame is
    :func:`constant_edges`' to find).  Also the strong edges of glyph-sized objects (at most
    GLYPH_AREA pixels of the half-resolution map) where one neighbour is flat background
    GLYPH_MARGIN pixels around: the first and last frame of a run of frames carrying text, whose
    inner frames' neighbours show the same text (a name on four unsampled slices of a real T1 was
    released; red-team 3).  Anatomy appearing from one slice to the next is one large object."""
    edge, bg, _ = cur
    if any(e.shape != edge.shape for e, _, _ in neighbours):
        return 0
    flat = np.ones(edge.shape, bool)
    for _, nbg, _ in neighbours:
        flat &= nbg
    count = int(np.count_nonzero(edge & _eroded(flat, 2)))  # the body's border moves a little
    fars = [far for _, _, far in neighbours if np.count_nonzero(edge & far) >= MIN_CONSTANT_EDGES]
    if not fars:  # (cheap: no strong edges far out in any neighbour's background)
        return count
    from scipy import ndimage
    labels, n = ndimage.label(~bg)
    sizes = np.bincount(labels.ravel())
    sizes[0] = GLYPH_AREA + 1
    small = (sizes <= GLYPH_AREA)[labels]
    grown = ndimage.grey_dilation(np.where(small, labels, 0), size=3)  # edges lie on either side of a step
    for far in fars:
        hit = edge & far & (grown > 0)
        if len(np.unique(grown[hit])) >= MIN_GLYPHS:  # a word, not one speck or one piece of anatomy
            count = max(count, int(np.count_nonzero(hit)))
    return count


def _eroded(mask: np.ndarray, n: int) -> np.ndarray:
    """``mask`` shrunk by ``n`` pixels (4-neighbourhood; outside the frame counts as inside)."""
    for _ in range(n):
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        mask = inner
    return mask


def constant_edges(frames: list[np.ndarray]) -> np.ndarray | None:
    """Pixels that are strong edges (a step of EDGE of the frame's range to the next pixel) in
    every one of ``frames``: where burned-in text sits in a series whose anatomy changes (the
    edges of the letters stay where they are even when the text's value or the compression
    noise around it changes).  None when the frames differ in shape."""
    g = [render.gray_of(f) for f in frames]
    if not g or len({x.shape for x in g}) != 1:
        return None
    out = np.ones(g[0].shape, bool)
    for x in g:
        x = x.astype(np.int32)
        step = max(1.0, EDGE * (int(x.max()) - int(x.min())))
        edge = np.zeros(x.shape, bool)
        edge[:, 1:] |= np.abs(np.diff(x, axis=1)) >= step
        edge[1:, :] |= np.abs(np.diff(x, axis=0)) >= step
        out &= edge
    return out


# -- looking ----------------------------------------------------------------------------------
def scale_for(h: int, w: int) -> float:
    """The screen's render scale: short side SCREEN_SIDE (at most MAX_UP× up), long side at most 2.5×."""
    s = min(MAX_UP, SCREEN_SIDE / max(1, min(h, w)))
    return min(s, 2.5 * SCREEN_SIDE / max(h, w))


def text_in(frame: np.ndarray, invert: bool, threads: int = 1,
            crop: tuple[int, int, int, int] | None = None,
            views: tuple[tuple[bool, bool], ...] = ((False, False),),
            min_chars: int = MIN_CHARS) -> list[tuple[tuple[int, int, int, int], str, float]]:
    """Text the screen accepts in one frame (or the ``crop`` of it): boxes in frame pixels, the
    text read and its confidence, for boxes that read as at least ``min_chars`` letters or digits
    with confidence MIN_SCORE; each box is read in each of ``views`` (:data:`VIEWS`)."""
    eng = ocr.engine(threads)
    x0, y0 = (crop[0], crop[1]) if crop else (0, 0)
    part = frame[crop[1]:crop[3], crop[0]:crop[2]] if crop else frame
    s = scale_for(*render.gray_of(frame).shape)  # the same scale for a crop as for its frame
    out = []
    for curve, img in render.renderings(part, invert).items():
        found, rgb, _ = eng.detect(img, curve, s)
        # widest boxes first (text lines are wide), a few at a time: one readable line decides
        found.sort(key=lambda b: -(b.x1 - b.x0))
        for i in range(0, len(found), READ_BATCH):
            for tb in eng.read(rgb, s, found[i:i + READ_BATCH], views):
                if tb.text_score >= MIN_SCORE and len(_ALNUM.findall(tb.text)) >= min_chars:
                    out.append(((tb.x0 + x0, tb.y0 + y0, tb.x1 + x0, tb.y1 + y0), tb.text, tb.text_score))
            if out:
                return out
    return out


def bounding(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin),
            min(w, int(xs.max()) + 1 + margin), min(h, int(ys.max()) + 1 + margin))


def _frames(index: int, path: Path, header):
    from .pixeldata import PixelDataError
    try:
        return read_frames(path, header)
    except PixelDataError as exc:
        raise ScreenError(index, str(exc)) from None
    except OSError:
        raise
    except Exception as exc:
        raise ScreenError(index, type(exc).__name__) from None


# -- a series ---------------------------------------------------------------------------------
VIEWS = ((False, False), (True, True), (False, True), (True, False))
"""(upside down, mirrored) ways of reading a text box whose display orientation is not known (a
volume's slices): the recognizer reads only upright text (and tall boxes turned either way), so
these four cover every rotation and mirror image of a line of text."""


def screen(files: list[tuple[Path, object]], threads: int = 1) -> Result:
    """Screen one DICOM series: ``files`` are its staged files in order with the original header
    values the engine captured (pixel module).  Stops at the first text found.  Raises
    ScreenError for a file whose pixels cannot be read."""
    counts = [max(1, int((h.get("NumberOfFrames") if h is not None else 1) or 1)) for _, h in files]
    return screen_frames([(c, (lambda i=i, p=p, h=h: _frames(i, p, h))) for i, (c, (p, h)) in enumerate(zip(counts, files))],
                         threads)


def screen_frames(sources: list[tuple[int, "object"]], threads: int = 1,
                  views: tuple[tuple[bool, bool], ...] = VIEWS[:1], min_chars: int = MIN_CHARS) -> Result:
    """Screen one series of frames: ``sources`` hold, per file (or volume) in order, its expected
    number of frames and a callable opening it (an object with ``n``, ``frame(k)`` and
    ``invert``); each box the detector finds is read in each of ``views`` (display
    orientation known: only as it is); a reading counts with ``min_chars`` letters or digits.
    Stops at the first text found.  Raises ScreenError for a
    source whose pixels cannot be read."""
    t0 = time.perf_counter()
    n = sum(c for c, _ in sources)
    res = Result(frames=n)
    picks = set(sample(n))
    kept: dict[int, tuple[np.ndarray, bool]] = {}  # position -> (frame, invert)
    where: list[tuple[int, int]] = []  # position -> (file, frame)
    all_stats = []
    maps: list = []  # edge maps of the last three frames
    drawn: list[int] = []  # frames with text or graphics no neighbour shows
    for fi, (_, opener) in enumerate(sources):
        fr = opener()
        for k in range(fr.n):
            pos = len(where)
            where.append((fi, k))
            try:
                f = fr.frame(k)
            except Exception as exc:  # a palette without its lookup table, …
                raise ScreenError(fi, f"frame cannot be rendered: {type(exc).__name__}") from None
            all_stats.append(stats(f))
            if pos in picks:
                kept[pos] = (np.array(f), fr.invert)
            if n > SMALL_SERIES:
                maps = (maps + [edge_map(f)])[-3:]
                if len(maps) == 2 and isolated_edges(maps[0], maps[1]) >= MIN_CONSTANT_EDGES:
                    drawn.append(0)  # the first frame, against the second
                elif len(maps) == 3 and isolated_edges(maps[1], maps[0], maps[2]) >= MIN_CONSTANT_EDGES:
                    drawn.append(pos - 1)
    if n > SMALL_SERIES and len(maps) >= 2 and isolated_edges(maps[-1], maps[-2]) >= MIN_CONSTANT_EDGES:
        drawn.append(n - 1)  # the last frame, against the one before

    def look(pos: int, frame: np.ndarray, invert: bool, crop=None) -> bool:
        res.detector_runs += 1
        for box, _, score in text_in(frame, invert, threads, crop, views, min_chars):
            res.found.append(Found(*where[pos], box, score))
        return res.text

    try:
        if len(where) <= SMALL_SERIES:
            res.screened = len(where)
            for pos in sorted(kept):
                if look(pos, *kept[pos]):
                    return res
            return res
        res.sampled = len(kept)
        outs = sorted(set(outliers(all_stats)) | set(drawn))
        if len(outs) > MAX_OUTLIERS:
            outs = [outs[i] for i in sample(len(outs))][:MAX_OUTLIERS]
        res.outliers = len(outs)
        order = sorted(kept)
        ce = constant_edges([kept[p][0] for p in order])
        if ce is None:  # frames of different shapes: look at each sampled frame
            for pos in order:
                res.screened += 1
                if look(pos, *kept[pos]):
                    return res
        elif int(ce.sum()) >= MIN_CONSTANT_EDGES:
            mid = order[len(order) // 2]
            res.screened += 1
            if look(mid, *kept[mid], crop=bounding(ce, 24)):
                return res
        for pos in outs:
            fi, k = where[pos]
            if pos in kept:
                frame, invert = kept[pos]
            else:
                fr = sources[fi][1]()
                frame, invert = fr.frame(k), fr.invert
            res.screened += 1
            if look(pos, frame, invert):
                return res
        return res
    finally:
        res.seconds = time.perf_counter() - t0


# -- images outside DICOM ---------------------------------------------------------------------
class _Page:
    """One page of an image file as a one-frame source (a 2-D array, or rows × columns × samples)."""

    invert = False
    n = 1

    def __init__(self, read):
        self._read = read

    def frame(self, k: int) -> np.ndarray:
        arr = np.asarray(self._read())
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):  # samples first (planar) or a stack
            arr = arr[0] if arr.shape[0] not in (3, 4) else np.moveaxis(arr, 0, -1)
        if arr.ndim == 3:
            arr = arr[..., :3]
        if arr.ndim not in (2, 3):
            raise ValueError(f"a page of {arr.ndim} dimensions")
        return arr


def page_with_text(pages: list, threads: int = 1) -> int | None:
    """The page (position in ``pages``) on which text was found, or None: the series screen
    (:func:`screen_frames`: every page of a short stack; the sample, outlier pages and pages whose
    edges no neighbour shows in a long one) for images whose pixels deidflow releases as they are
    and cannot clean (plain TIFF pages: scans, screenshots, photographs of forms).  ``pages``
    holds callables giving each page as an array.  Raises ScreenError for a page that cannot be
    decoded."""
    def opener(read):
        return lambda: _Page(read)
    res = screen_frames([(1, opener(read)) for read in pages], threads)
    return res.found[0].file if res.text else None
