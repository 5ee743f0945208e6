"""A 3D T1-weighted head MRI for the demo, made in code from pydeface's average head.

The demo needs one head scan with a face, so that the face stage has something to deface and the
QC report a face rendering to show. pydeface's wheel (MIT; installed with deidflow for the face
stage) ships ``mean_reg2mean.nii.gz``, an average head with its face. It is read with
:mod:`importlib.resources` (never downloaded, nothing large committed) and resampled onto the grid
of a sagittal 2 mm isotropic acquisition (:data:`N_SLICES` slices of :data:`ROWS` x
:data:`COLUMNS`), turned by a few degrees, with a smooth intensity bias and seeded Rician noise,
so that the demo head is not the template voxel for voxel. Template values below :data:`FLOOR`
become background first: averaging left faint structures in front of the face (a frame around
the eyes) that a skin-surface rendering would show as goggles. Values are stored as int16 and
kept below 4096: the high byte of every pixel is then below 0x10, so pixel bytes can never spell
a printable identifier that a byte scan of the release looks for.

Geometry is in DICOM patient coordinates (LPS, mm): slice ``k`` (0-based, acquisition order) has
:func:`position` ``(k)``, every slice has :data:`ORIENTATION` (rows run towards posterior, columns
towards inferior) and :data:`SPACING_MM` pixels, slices are :data:`SPACING_MM` apart.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["N_SLICES", "ROWS", "COLUMNS", "SPACING_MM", "ORIENTATION", "ACQUISITION",
           "position", "head_t1"]

N_SLICES = 96
ROWS = COLUMNS = 128
SPACING_MM = 2.0
ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # row direction: posterior; column direction: inferior
FOV_CENTRE_LPS = (4.0, -14.0, -16.0)           # the template's head sits around here
ROTATION_DEG = (6.0, -3.0, 2.5)                # the subject's head vs the template, about x, y, z (RAS)
FLOOR = 45.0                                   # template units (its skin is ~150-200, its maximum 646)
GAIN = 1.6
BIAS = (0.06, 0.04)                            # relative intensity ramp along the columns, the rows
NOISE_SIGMA = 8.0
NOISE_SEED = 20240917
MAX_VALUE = 4095

# Technical attributes of the series (a Philips 3 T 3D TFE, as the demo's Ingenia would write it).
ACQUISITION: dict[str, Any] = {
    "ScanningSequence": ["GR", "IR"],
    "SequenceVariant": ["SP", "MP"],
    "ScanOptions": "",
    "MRAcquisitionType": "3D",
    "SequenceName": "T1TFE",
    "SliceThickness": "2",
    "RepetitionTime": "8.1",
    "EchoTime": "3.7",
    "InversionTime": "900",
    "NumberOfAverages": "1",
    "ImagingFrequency": "127.7668",
    "ImagedNucleus": "1H",
    "EchoNumbers": "1",
    "MagneticFieldStrength": "3",
    "SpacingBetweenSlices": "2",
    "NumberOfPhaseEncodingSteps": 128,
    "EchoTrainLength": 128,
    "PercentSampling": "100",
    "PercentPhaseFieldOfView": "100",
    "PixelBandwidth": "241",
    "ProtocolName": "T1W_3D_TFE",
    "TransmitCoilName": "B",
    "AcquisitionMatrix": [0, 128, 128, 0],
    "InPlanePhaseEncodingDirection": "ROW",
    "FlipAngle": "8",
    "PatientPosition": "HFS",
    "BodyPartExamined": "HEAD",
    "SamplesPerPixel": 1,
    "PhotometricInterpretation": "MONOCHROME2",
    "Rows": ROWS,
    "Columns": COLUMNS,
    "PixelSpacing": [f"{SPACING_MM:g}", f"{SPACING_MM:g}"],
    "BitsAllocated": 16,
    "BitsStored": 16,
    "HighBit": 15,
    "PixelRepresentation": 1,
    "WindowCenter": "450",
    "WindowWidth": "900",
}


def _axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.array(ORIENTATION[:3])
    col = np.array(ORIENTATION[3:])
    return row, col, np.cross(row, col)


def position(k: int) -> tuple[float, float, float]:
    """ImagePositionPatient (LPS, mm) of slice ``k`` (0-based): the centre of its first pixel."""
    row, col, normal = _axes()
    corner = (np.array(FOV_CENTRE_LPS) - (COLUMNS - 1) / 2 * SPACING_MM * row
              - (ROWS - 1) / 2 * SPACING_MM * col - (N_SLICES - 1) / 2 * SPACING_MM * normal)
    p = corner + k * SPACING_MM * normal
    return (float(p[0]), float(p[1]), float(p[2]))


def _rotation() -> np.ndarray:
    ax, ay, az = np.deg2rad(ROTATION_DEG)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _template() -> tuple[np.ndarray, np.ndarray]:
    """pydeface's average head (float32 array, RAS affine)."""
    from importlib.resources import as_file, files

    import nibabel as nib
    with as_file(files("pydeface") / "data" / "mean_reg2mean.nii.gz") as path:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj).astype(np.float32)
    return data, img.affine


def _index_to_template(affine: np.ndarray) -> np.ndarray:
    """4x4 map from an output index (slice, row, column, 1) to a voxel index of the template,
    whose RAS affine is ``affine``."""
    row, col, normal = _axes()
    grid = np.eye(4)  # (k, r, c) -> LPS
    grid[:3, 0] = SPACING_MM * normal
    grid[:3, 1] = SPACING_MM * col
    grid[:3, 2] = SPACING_MM * row
    grid[:3, 3] = position(0)
    to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    centre = to_ras[:3, :3] @ np.array(FOV_CENTRE_LPS)
    # The subject's head is the template turned by R about the FOV centre, so the subject's point
    # x shows the template at R^-1 (x - c) + c.
    back = _rotation().T
    turn = np.eye(4)
    turn[:3, :3] = back
    turn[:3, 3] = centre - back @ centre
    return np.linalg.inv(affine) @ turn @ to_ras @ grid


@lru_cache(maxsize=1)
def head_t1() -> np.ndarray:
    """The series' stored pixel values, (N_SLICES, ROWS, COLUMNS) int16 (little-endian), slice
    ``k`` at :func:`position` ``(k)``. Deterministic: the noise comes from a fixed seed."""
    from scipy import ndimage
    template, affine = _template()
    m = _index_to_template(affine)
    values = ndimage.affine_transform(template, m[:3, :3], offset=m[:3, 3],
                                      output_shape=(N_SLICES, ROWS, COLUMNS), order=1,
                                      mode="constant", cval=0.0, prefilter=False)
    r = np.linspace(-1.0, 1.0, ROWS, dtype=np.float32)[None, :, None]
    c = np.linspace(-1.0, 1.0, COLUMNS, dtype=np.float32)[None, None, :]
    bias = 1.0 + BIAS[0] * c + BIAS[1] * r
    signal = np.maximum(values - np.float32(FLOOR), 0) * np.float32(GAIN) * bias
    rng = np.random.default_rng(NOISE_SEED)
    real = signal + rng.normal(0.0, NOISE_SIGMA, signal.shape).astype(np.float32)
    imag = rng.normal(0.0, NOISE_SIGMA, signal.shape).astype(np.float32)
    magnitude = np.hypot(real, imag)
    out = np.clip(np.rint(magnitude), 0, MAX_VALUE).astype("<i2")
    out.setflags(write=False)
    return out
