"""DICOM series of the demo head (deidflow.demo_head) in the encodings and with the labels real
exports use, for the face tests: classic or enhanced multi-frame, every lossless transfer syntax
the engine reads, any BodyPartExamined / description, MR or a CT-like head in Hounsfield units."""
from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, EnhancedMRImageStorage,
                         ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, MRImageStorage,
                         RLELossless, generate_uid)

from deidflow import demo_head

ENCODINGS = {"classic": ExplicitVRLittleEndian, "deflated": DeflatedExplicitVRLittleEndian,
             "jpeg2000": JPEG2000Lossless, "jpegls": JPEGLSLossless, "rle": RLELossless}


def ct_like(t1: np.ndarray) -> np.ndarray:
    """The demo head in Hounsfield units: air -1000, skin/fat about -80, soft tissue and brain
    20-60 (a T1 has no bone; the skull shows as soft tissue)."""
    t = t1.astype(np.float32)
    hu = np.where(t > 150, 20.0 + 40.0 * np.clip(t / 1500.0, 0, 1), -1000.0)
    hu = np.where((t > 1300), -80.0, hu)          # the T1's brightest tissue (scalp fat) as fat
    rng = np.random.default_rng(7)
    return np.rint(hu + rng.normal(0, 4.0, hu.shape)).astype(np.int32)


def _base(modality: str, sop_class: str, series_uid: str, body_part: str | None, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID, ds.PatientName = "sub-a", "sub-a"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1", series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.2"
    ds.SeriesNumber = 1
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if description:
        ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"] if modality == "MR" else ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = demo_head.ROWS, demo_head.COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12 if modality == "MR" else 16, 11 if modality == "MR" else 15
    ds.PixelRepresentation = 0 if modality == "MR" else 0
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
    return ds


def _meta(ds: Dataset, ts: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _encode(ds: Dataset, arr: np.ndarray, ts: str) -> bytes:
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    if ts in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        ds.compress(ts, arr, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def head_series(encoding: str = "classic", *, enhanced: bool = False, modality: str = "MR",
                body_part: str | None = "HEAD", description: str = "", pixels: np.ndarray | None = None,
                image_type: list[str] | None = None, extra=None) -> list[bytes]:
    """The demo head as a list of DICOM files (one per slice, or one enhanced multi-frame file)."""
    ts = ENCODINGS[encoding]
    stored = demo_head.head_t1() if pixels is None else pixels
    if modality == "CT":
        stored = ct_like(stored) + 1024
    stored = np.asarray(stored).astype(np.uint16)
    series_uid = generate_uid()
    row, col = np.array(demo_head.ORIENTATION[:3]), np.array(demo_head.ORIENTATION[3:])
    if enhanced:
        ds = _base(modality, EnhancedMRImageStorage, series_uid, body_part, description)
        ds.SOPInstanceUID = generate_uid()
        ds.NumberOfFrames = stored.shape[0]
        shared = Dataset()
        pm, po = Dataset(), Dataset()
        pm.PixelSpacing, pm.SliceThickness = [demo_head.SPACING_MM] * 2, demo_head.SPACING_MM
        po.ImageOrientationPatient = list(demo_head.ORIENTATION)
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per = []
        for k in range(stored.shape[0]):
            item, pp = Dataset(), Dataset()
            pp.ImagePositionPatient = list(demo_head.position(k))
            item.PlanePositionSequence = Sequence([pp])
            per.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per)
        if image_type:
            ds.ImageType = image_type
        for k, v in (extra or {}).items():
            setattr(ds, k, v)
        _meta(ds, ts)
        return [_encode(ds, stored, ts)]
    out = []
    for k in range(stored.shape[0]):
        ds = _base(modality, MRImageStorage if modality == "MR" else CTImageStorage, series_uid, body_part, description)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = list(demo_head.position(k))
        ds.ImageOrientationPatient = list(np.concatenate([row, col]))
        ds.PixelSpacing = [demo_head.SPACING_MM] * 2
        ds.SliceThickness = demo_head.SPACING_MM
        if image_type:
            ds.ImageType = image_type
        for kk, v in (extra or {}).items():
            setattr(ds, kk, v)
        _meta(ds, ts)
        out.append(_encode(ds, stored[k], ts))
    return out


def read_volume(blobs: list[bytes]) -> np.ndarray:
    """Stored pixels of a series in slice order (frames × rows × cols), whatever its encoding."""
    slices = []
    for b in blobs:
        ds = pydicom.dcmread(io.BytesIO(b))
        a = np.asarray(ds.pixel_array)
        n = int(ds.get("NumberOfFrames") or 1)
        a = a.reshape(n, ds.Rows, ds.Columns)
        if n > 1:
            return a
        slices.append((int(ds.InstanceNumber), a[0]))
    return np.stack([a for _, a in sorted(slices, key=lambda t: t[0])])
