"""A DICOM series as a 3D volume, and the way back: every frame's pixels in that volume's grid.

The face stage reads the de-identified DICOM itself, so that a head series is defaced whatever
happened to it in conversion (not converted, conversion failed, BIDS release off, a transfer
syntax dcm2niix does not read). :func:`scan` reads the geometry of every frame of every file
(classic single-frame files and enhanced multi-frame objects, position and orientation from the
per-frame or shared functional groups) without the pixel data; :func:`reconstruct` decodes the
pixels of one stack (any transfer syntax pydicom decodes with the installed pylibjpeg / pyjpegls
plugins: deflate, JPEG, JPEG-LS, JPEG 2000, RLE; errors are :class:`VolumeError` with a one-line
reason and no values) and builds its real-valued volume:

* frames that share orientation and matrix form a stack; frames at the same position (echoes,
  time points, diffusion directions) are further volumes of it — the first volume is used;
* a regular stack along the slice normal keeps its own grid (no resampling);
* a stack with irregular spacing or a tilted gantry (positions not along the normal) is
  resampled onto an orthogonal grid along the frames' own axes (linear between frames).

:func:`frame_voxels` maps any frame of the series into that grid, which is how the write-back
(:func:`deidflow.face.apply.mask_dicom` with ``snap``) finds each pixel's voxel of the mask.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

POS_TOL_MM = 0.05        # frames closer than this along the normal share a position
REGULAR_TOL = 0.01       # relative deviation of slice steps still counted as regular
TILT_TOL = 1e-3          # |sin| of the angle between the stack direction and the normal
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """The series cannot be read or reconstructed as a volume (one-line reason, no values)."""


@dataclass(frozen=True)
class FrameRef:
    rel: str                 # release-relative file
    index: int               # frame in the file (0 for classic files)
    ipp: tuple[float, float, float]
    iop: tuple[float, ...]   # 6 direction cosines
    spacing: tuple[float, float]   # PixelSpacing: between rows, between columns
    rows: int
    cols: int


@dataclass
class SeriesScan:
    """What the headers say about one series: its frames and the first data set's attributes."""

    frames: list[FrameRef]
    attrs: dict = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)   # files pydicom could not parse
    no_geometry: int = 0                                   # frames without position/orientation
    matrix: tuple[int, int] = (0, 0)                       # the largest rows and columns of its images

    def stacks(self) -> list[list[FrameRef]]:
        """Frames grouped by orientation and matrix, largest group first."""
        groups: dict[tuple, list[FrameRef]] = {}
        for f in self.frames:
            key = (tuple(np.round(f.iop, 3)), f.rows, f.cols, tuple(np.round(f.spacing, 4)))
            groups.setdefault(key, []).append(f)
        return sorted(groups.values(), key=lambda g: -len(g))


def _pick(ds, frame: int, seq_kw: str, attr: str):
    for fg_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        fgs = ds.get(fg_kw)
        if not fgs:
            continue
        item = fgs[frame] if fg_kw.startswith("PerFrame") and frame < len(fgs) else fgs[0]
        seq = item.get(seq_kw)
        if seq and attr in seq[0]:
            return seq[0][attr].value
    return ds.get(attr)


def frame_geometry(ds, frame: int):
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of one frame as float
    arrays, from the top level (classic) or the functional groups (enhanced); None when missing."""
    ipp = _pick(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    iop = _pick(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    ps = _pick(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    try:
        ipp, iop, ps = np.array(ipp, float), np.array(iop, float), np.array(ps, float)
    except (TypeError, ValueError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,) or ps.shape != (2,) or not (np.isfinite(ipp).all()
                                                                          and np.isfinite(iop).all() and (ps > 0).all()):
        return None
    return ipp, iop, ps


def rescale(ds, frame: int) -> tuple[float, float]:
    """RescaleSlope / RescaleIntercept of one frame (functional groups first)."""
    slope = _pick(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    inter = _pick(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    try:
        slope = float(slope) if slope not in (None, "") else 1.0
        inter = float(inter) if inter not in (None, "") else 0.0
    except (TypeError, ValueError):
        return 1.0, 0.0
    return (slope if slope else 1.0), inter


def scan(files: dict[str, bytes]) -> SeriesScan:
    """The geometry of every frame of the series' files (``rel -> bytes``), pixel data not read."""
    import pydicom
    from ..bids.series import ATTRIBUTES, _convert, _find
    out = SeriesScan([])
    for rel in sorted(files):
        try:
            ds = pydicom.dcmread(io.BytesIO(files[rel]), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom raises many types
            out.unreadable.append(rel)
            continue
        if not out.attrs:
            for kw, kind in ATTRIBUTES.items():
                v = _find(ds, kw)
                if v is not None:
                    try:
                        out.attrs[kw] = _convert(v, kind)
                    except (TypeError, ValueError):
                        pass
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            continue                    # no image (SR, presentation state, …)
        out.matrix = (max(out.matrix[0], rows), max(out.matrix[1], cols))
        for f in range(int(ds.get("NumberOfFrames") or 1)):
            geo = frame_geometry(ds, f)
            if geo is None:
                out.no_geometry += 1
                continue
            ipp, iop, ps = geo
            out.frames.append(FrameRef(rel, f, tuple(ipp), tuple(iop), tuple(ps), rows, cols))
    return out


@dataclass
class SeriesVolume:
    """One stack of a series as a real-valued volume (voxel order: column, row, slice)."""

    data: np.ndarray            # float32 (cols, rows, slices)
    affine: np.ndarray          # voxel -> RAS mm (orthogonal axes)
    volumes: int                # frames per position (echoes, time points…)
    resampled: bool             # irregular spacing or tilt: not the frames' own grid


def frame_voxels(ipp, iop, ps, rows: int, cols: int, affine: np.ndarray, corners: bool = False) -> np.ndarray:
    """Continuous voxel coordinates (rows, cols, 3) in the grid of ``affine`` (voxel -> RAS) of
    every pixel of a frame with this position, orientation and pixel spacing (``corners``: of its
    four corner pixels only, (2, 2, 3))."""
    ipp, iop, ps = np.asarray(ipp, float), np.asarray(iop, float), np.asarray(ps, float)
    r, c = np.meshgrid(*(([0, rows - 1], [0, cols - 1]) if corners else (np.arange(rows), np.arange(cols))),
                       indexing="ij")
    lps = ipp + (c[..., None] * ps[1]) * iop[:3] + (r[..., None] * ps[0]) * iop[3:]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(affine)
    return ras @ inv[:3, :3].T + inv[:3, 3]


def positions(stack: list[FrameRef]) -> tuple[np.ndarray, list[list[FrameRef]]]:
    """Distinct positions along the stack's normal (ascending) and the frames at each."""
    iop = np.array(stack[0].iop)
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(stack, key=lambda f: float(np.dot(f.ipp, normal)))
    ts: list[float] = []
    at: list[list[FrameRef]] = []
    for f in order:
        t = float(np.dot(f.ipp, normal))
        if ts and abs(t - ts[-1]) <= POS_TOL_MM:
            at[-1].append(f)
        else:
            ts.append(t)
            at.append([f])
    return np.array(ts), at


def extent(stack: list[FrameRef]) -> tuple[float, float, float]:
    """Size in mm along the columns, the rows and the normal (one slice counts its pixel size)."""
    f = stack[0]
    ts, _ = positions(stack)
    depth = float(ts[-1] - ts[0]) + (float(np.median(np.diff(ts))) if len(ts) > 1 else 0.0)
    return f.cols * f.spacing[1], f.rows * f.spacing[0], max(depth, min(f.spacing))


def decode(data: bytes) -> tuple[object, np.ndarray]:
    """(data set, stored pixel array frames × rows × cols) of one file; :class:`VolumeError` when
    the pixel data cannot be decoded here (no decoder for its transfer syntax, corrupt stream)."""
    import pydicom
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise VolumeError(f"not readable as DICOM ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise VolumeError("no pixel data")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise VolumeError("colour pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing plugin, corrupt stream, …
        name = getattr(ts, "name", str(ts))
        raise VolumeError(f"pixel data cannot be decoded ({name}: {type(exc).__name__})") from None
    n = int(ds.get("NumberOfFrames") or 1)
    return ds, arr.reshape(n, int(ds.Rows), int(ds.Columns))


def reconstruct(files: dict[str, bytes], stack: list[FrameRef], max_step_mm: float = 2.0,
                volume: int = 0) -> SeriesVolume:
    """The real-valued volume of one stack (its first volume when positions repeat; ``volume``:
    the frames that come that many places later in file order at each position)."""
    ts, at = positions(stack)
    if len(ts) < 2:
        raise VolumeError("a single slice position: not a volume")
    counts = {len(a) for a in at}
    volumes = min(counts)
    first = [a[volume] for a in at]          # the first frame (file order) at each position
    need = {f.rel for f in first}
    slices: dict[tuple[str, int], np.ndarray] = {}
    for rel in sorted(need):
        ds, arr = decode(files[rel])
        for f in first:
            if f.rel == rel:
                slope, inter = rescale(ds, f.index)
                slices[(rel, f.index)] = arr[f.index].astype(np.float32) * np.float32(slope) + np.float32(inter)
    ref = first[0]
    iop = np.array(ref.iop)
    row_dir, col_dir = iop[:3], iop[3:]       # along a row (columns increase), along a column
    normal = np.cross(row_dir, col_dir)
    ps_r, ps_c = ref.spacing                  # between rows, between columns
    steps = np.diff(ts)
    stack_vec = (np.array(first[-1].ipp) - np.array(first[0].ipp)) / (len(first) - 1)
    tilt = float(np.linalg.norm(np.cross(stack_vec / np.linalg.norm(stack_vec), normal)))
    regular = float(np.max(np.abs(steps - np.median(steps)))) <= REGULAR_TOL * float(np.median(steps))
    frames = np.stack([slices[(f.rel, f.index)].T for f in first], axis=-1)  # (cols, rows, slices)
    if regular and tilt <= TILT_TOL:
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * ps_c, col_dir * ps_r, stack_vec, first[0].ipp
        return SeriesVolume(np.ascontiguousarray(frames, np.float32), LPS_TO_RAS @ lps, volumes, False)
    # Irregular or tilted: an orthogonal grid along the frames' axes covering every frame.
    basis = np.stack([row_dir, col_dir, normal])                 # rows: axes
    origins = np.array([f.ipp for f in first]) @ basis.T         # each frame's corner in (u, v, t)
    dz = float(min(max(np.median(steps), 0.5), max_step_mm))
    u0, v0 = origins[:, 0].min(), origins[:, 1].min()
    nu = int(np.ceil((origins[:, 0].max() - u0) / ps_c)) + ref.cols
    nv = int(np.ceil((origins[:, 1].max() - v0) / ps_r)) + ref.rows
    nt = int(np.floor((ts[-1] - ts[0]) / dz)) + 1
    from scipy import ndimage
    background = float(frames.min())      # outside every frame: the darkest value (air), not 0 (water in CT)
    out = np.full((nu, nv, nt), background, np.float32)
    tt = ts[0] + dz * np.arange(nt)
    k = np.clip(np.searchsorted(ts, tt, side="right") - 1, 0, len(ts) - 2)
    w = np.clip((tt - ts[k]) / (ts[k + 1] - ts[k]), 0.0, 1.0).astype(np.float32)
    uu, vv = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")

    def sample(j: int) -> np.ndarray:     # frame j on the target plane (in-plane shift only)
        cu = uu + (u0 - origins[j, 0]) / ps_c
        cv = vv + (v0 - origins[j, 1]) / ps_r
        return ndimage.map_coordinates(frames[..., j], [cu, cv], order=1, mode="constant", cval=background)

    cache: dict[int, np.ndarray] = {}
    for i in range(nt):
        a = cache.setdefault(int(k[i]), sample(int(k[i])))
        b = cache.setdefault(int(k[i]) + 1, sample(int(k[i]) + 1))
        out[..., i] = (1 - w[i]) * a + w[i] * b
        for old in [j for j in cache if j < k[i]]:
            del cache[old]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * ps_c, col_dir * ps_r, normal * dz
    lps[:3, 3] = u0 * row_dir + v0 * col_dir + ts[0] * normal
    return SeriesVolume(out, LPS_TO_RAS @ lps, volumes, True)
