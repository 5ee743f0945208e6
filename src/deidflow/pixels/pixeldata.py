"""Pixel data of one data set as editable frames, and writing it back.

Native (uncompressed) pixel data in the usual layouts (8/16/32 bits allocated, MONOCHROME1/2,
RGB in either planar configuration, PALETTE COLOR) is edited **in place in its own bytes**:
only the pixels inside redaction boxes change, every other byte (including bits above
BitsStored) stays as it was, and the transfer syntax is kept.  Anything else (every
compressed transfer syntax pydicom can decode, with the pylibjpeg/openjpeg/RLE/JPEG-LS
plugins; YBR colour; 1-bit data) is decoded to RGB or grey and written back losslessly as RLE
Lossless, or uncompressed Explicit VR Little Endian where RLE cannot hold it, with the
photometric interpretation and planar configuration that match the new bytes.

Boxes are filled with one flat value per box that occurs nowhere inside the box, so every pixel
of a redacted box changes and no pattern survives: display black (the frame's minimum; maximum
for MONOCHROME1) or one of the next few levels when possible, else a value beyond black (outside
the frame's range), else the darkest lighter value free in the box (text drawn with
anti-aliasing over anatomy can use every level of an 8-bit range; the patch then looks light).
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, pack_bits
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

NATIVE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR")
DARK_LEVELS = 16  # fill values tried above display black before going below the frame's range


class PixelDataError(ValueError):
    """The pixel data cannot be decoded, edited or encoded (one-line reason, no values)."""


class Frames:
    """Editable frames of ``ds`` (shape frames × rows × columns [× samples])."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        if "EncapsulatedDocument" in ds and "PixelData" not in ds:
            raise PixelDataError("an encapsulated document (PDF, CDA), not an image: its text cannot be checked")
        try:
            self.rows, self.cols = int(ds.Rows), int(ds.Columns)
            self.spp = int(ds.get("SamplesPerPixel") or 1)
            self.bits = int(ds.BitsAllocated)
            self.stored = int(ds.get("BitsStored") or self.bits)
            self.signed = int(ds.get("PixelRepresentation") or 0) == 1
            self.n = int(ds.get("NumberOfFrames") or 1)
            self.photometric = str(ds.PhotometricInterpretation).strip().upper()
            self.planar = int(ds.get("PlanarConfiguration") or 0)
        except Exception as exc:
            raise PixelDataError(f"image pixel module incomplete: {type(exc).__name__}") from None
        if "PixelData" not in ds:
            raise PixelDataError("no PixelData (float or double pixel data are not cleaned)")
        ts = ds.file_meta.get("TransferSyntaxUID")
        self.native = ts is not None and not ts.is_compressed and self.bits in (8, 16, 32) \
            and self.photometric in NATIVE_PHOTOMETRIC and self.spp in (1, 3) \
            and (self.photometric != "PALETTE COLOR" or self.spp == 1)
        self._lut_order: np.ndarray | None = None
        self.changed = False
        if self.native:
            self._native_view()
        else:
            self._decode()

    # -- reading ------------------------------------------------------------------------------
    def _native_view(self) -> None:
        nbytes = self.bits // 8
        count = self.n * self.rows * self.cols * self.spp
        self.buf = bytearray(self.ds.PixelData)
        if len(self.buf) < count * nbytes:
            raise PixelDataError(f"PixelData holds {len(self.buf)} bytes, the pixel module needs {count * nbytes}")
        kind = "i" if self.signed and self.photometric.startswith("MONO") else "u"
        dtype = np.dtype(f"<{kind}{nbytes}")
        a = np.frombuffer(self.buf, dtype, count=count)
        if self.spp == 1:
            self.arr = a.reshape(self.n, self.rows, self.cols)
        elif self.planar == 1:
            self.arr = a.reshape(self.n, self.spp, self.rows, self.cols).transpose(0, 2, 3, 1)
        else:
            self.arr = a.reshape(self.n, self.rows, self.cols, self.spp)

    def _decode(self) -> None:
        try:
            a = self.ds.pixel_array  # YBR is converted to RGB
        except Exception as exc:
            raise PixelDataError(f"pixel data cannot be decoded ({self.ds.file_meta.get('TransferSyntaxUID', '?')}):"
                                 f" {type(exc).__name__}") from None
        a = np.array(a)  # own, writable copy
        if self.n == 1:
            a = a[None]
        self.arr = a.reshape(self.n, self.rows, self.cols, *([self.spp] if self.spp > 1 else []))
        if self.spp == 3 and self.photometric != "RGB":
            self.photometric_out = "RGB"

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as values to render (palette applied, unused high bits masked)."""
        f = self.arr[i]
        if self.photometric == "PALETTE COLOR":
            return apply_color_lut(self._mask(f), self.ds)
        return self._mask(f)

    def _mask(self, f: np.ndarray) -> np.ndarray:
        if not self.native or self.stored >= self.bits or self.spp != 1:
            return f
        shift = self.bits - self.stored
        if self.signed:
            return (f << shift) >> shift
        return f & ((1 << self.stored) - 1)

    @property
    def invert(self) -> bool:
        return self.photometric == "MONOCHROME1"

    # -- editing ------------------------------------------------------------------------------
    def fill(self, i: int, box: tuple[int, int, int, int]) -> None:
        """Blank ``box`` (x0, y0, x1, y1) of frame ``i`` with one flat dark value."""
        x0, y0, x1, y1 = box
        region = self.arr[i, y0:y1, x0:x1]
        if region.size == 0:
            return
        region[...] = self._fill_value(i, region)
        self.changed = True

    def _fill_value(self, i: int, region: np.ndarray):
        if region.ndim == 3 and region.shape[-1] == 3:  # colour: the darkest colour not in the box
            packed = ((region[..., 0].astype(np.int64) << 32) | (region[..., 1].astype(np.int64) << 16)
                      | region[..., 2].astype(np.int64))
            code = _first_absent(_DARK_COLOURS, packed)
            return np.array([code >> 32, (code >> 16) & 0xFFFF, code & 0xFFFF], region.dtype)
        if self.photometric == "PALETTE COLOR":
            return _first_absent(self._palette_order(), region)
        f = self._mask(self.arr[i])
        dark = int(f.max()) if self.invert else int(f.min())
        lo, hi = _range(self.stored if self.native else self.bits, self.signed)
        step = -1 if self.invert else 1
        # display black first, then a few levels lighter, then beyond black (outside the frame's
        # range), then anything lighter, up to 4096 values (a box holds far fewer distinct ones)
        near = np.arange(dark, dark + step * DARK_LEVELS, step)
        beyond = np.arange(dark - step, dark - step * 512, -step)
        lighter = np.arange(dark + step * DARK_LEVELS, dark + step * 4096, step)
        cands = np.concatenate([near, beyond, lighter])
        cands = cands[(cands >= lo) & (cands <= hi)]
        return np.asarray(_first_absent(cands, self._mask(region)), self.arr.dtype)

    def _palette_order(self) -> np.ndarray:
        """Palette indices from darkest to brightest colour."""
        if self._lut_order is None:
            idx = np.arange(0, 1 << min(self.stored, 16), dtype=np.uint16 if self.bits > 8 else np.uint8)
            rgb = apply_color_lut(idx, self.ds).astype(np.float64)
            self._lut_order = idx[np.argsort(rgb @ np.array([0.299, 0.587, 0.114]), kind="stable")]
        return self._lut_order

    # -- writing ------------------------------------------------------------------------------
    def write_back(self) -> str:
        """Store the edited frames in ``ds``; returns the transfer syntax written."""
        ds = self.ds
        if self.native:
            ds.PixelData = bytes(self.buf)
            return str(ds.file_meta.TransferSyntaxUID)
        arr = self.arr if self.n > 1 else self.arr[0]
        ds.PhotometricInterpretation = getattr(self, "photometric_out", self.photometric)
        if self.spp > 1:
            ds.PlanarConfiguration = 0
        if "NumberOfFrames" in ds and self.n == 1:
            ds.NumberOfFrames = 1
        if self.bits in (8, 16) and ds.PhotometricInterpretation in NATIVE_PHOTOMETRIC:
            try:
                ds.compress(RLELossless, arr, generate_instance_uid=False)
                return RLELossless
            except Exception:  # no RLE encoder for this layout: fall back to uncompressed
                pass
        if self.bits == 1:
            data = pack_bits(arr)
        else:
            data = np.ascontiguousarray(arr.astype(self.arr.dtype.newbyteorder("<"))).tobytes()
        if len(data) % 2:
            data += b"\x00"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = data
        ds["PixelData"].VR = "OB" if self.bits <= 8 else "OW"
        ds["PixelData"].is_undefined_length = False
        return ExplicitVRLittleEndian


def _dark_colours() -> np.ndarray:
    """Colours packed as r<<32 | g<<16 | b, darkest first: greys 0..15, then every mix of 0..15."""
    lv = np.arange(16, dtype=np.int64)
    r, g, b = np.meshgrid(lv, lv, lv, indexing="ij")
    mixes = np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1)
    mixes = mixes[np.argsort(mixes.sum(axis=1), kind="stable")]
    greys = lv[:, None].repeat(3, axis=1)
    allc = np.concatenate([greys, mixes])
    codes = (allc[:, 0] << 32) | (allc[:, 1] << 16) | allc[:, 2]
    _, first = np.unique(codes, return_index=True)
    return codes[np.sort(first)]


_DARK_COLOURS = _dark_colours()


def _range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _first_absent(candidates: np.ndarray, present: np.ndarray):
    """The first of ``candidates`` not among ``present`` (the first candidate when all are)."""
    if present.size == 0:
        return candidates[0]
    hit = np.isin(candidates, np.unique(present), assume_unique=False)
    free = np.flatnonzero(~hit)
    return candidates[free[0]] if free.size else candidates[0]


def check_consistency(ds: Dataset) -> list[str]:
    """Basic pixel-module checks (what dciodvfy checks first); empty when consistent."""
    problems = []
    spp = int(ds.get("SamplesPerPixel") or 0)
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    if pi in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") and spp != 1:
        problems.append(f"{pi} with SamplesPerPixel {spp}")
    if pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT") and spp != 3:
        problems.append(f"{pi} with SamplesPerPixel {spp}")
    if spp > 1 and "PlanarConfiguration" not in ds:
        problems.append("PlanarConfiguration missing with SamplesPerPixel > 1")
    bits, stored, high = (int(ds.get(k) or 0) for k in ("BitsAllocated", "BitsStored", "HighBit"))
    if not (0 < stored <= bits) or high != stored - 1:
        problems.append(f"BitsAllocated/BitsStored/HighBit {bits}/{stored}/{high} inconsistent")
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and not ts.is_compressed and "PixelData" in ds:
        n = int(ds.get("NumberOfFrames") or 1)
        need = int(ds.Rows) * int(ds.Columns) * spp * n * bits
        need = (need + 7) // 8
        have = len(ds.PixelData)
        if have not in (need, need + 1):
            problems.append(f"PixelData length {have}, pixel module implies {need}")
    return problems
