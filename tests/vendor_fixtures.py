"""pydicom-made series that carry the vendor private elements dcm2niix reads, for conversion
parity where ../shared/data has no real file: Philips float scaling (classic MR with the
Philips MR Imaging DD 001 scale slope/intercept) and GE diffusion (b-values in the GEMS_PARM_01
slop integers, gradient directions in GEMS_ACQU_01).  Built from pydicom's MR_small.dcm; element
tags and VRs as dcm2niix's nii_dicom.cpp reads them."""
from __future__ import annotations

import copy
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


_NAMES = {"PHILIPS": "Lindqvist", "GEDWI": "Okonkwo"}


def _base(i: int, series: str, study: str, frame: str, patient: str, slices: int, z: int) -> pydicom.Dataset:
    ds = copy.deepcopy(pydicom.dcmread(get_testdata_file("MR_small.dcm")))
    # a person's name, not the vendor's: a patient called "Philips" would be (rightly) found by the
    # leak scan in another subject's Manufacturer
    ds.PatientName, ds.PatientID = f"{_NAMES[patient]}^Test", f"{patient}-0001"
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(i)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = i + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-90, -100, -20 + 5 * z]
    ds.SliceLocation = -20 + 5 * z
    ds.SliceThickness, ds.SpacingBetweenSlices = 5, 5
    return ds


def philips_scaled_series(dest: Path, slices: int = 4) -> Path:
    """Philips classic MR whose stored values need the private MR scale slope/intercept
    (2005,xx0E / xx0D) on top of RescaleSlope/Intercept to give dcm2niix's floating-point values."""
    dest.mkdir(parents=True, exist_ok=True)
    uids = [generate_uid(entropy_srcs=["philips", k]) for k in ("series", "study", "frame")]
    for i in range(slices):
        ds = _base(i, *uids, "PHILIPS", slices, i)
        ds.Manufacturer, ds.ManufacturerModelName = "Philips Medical Systems", "Ingenia"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2.5", "1.0", "normalized"
        block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        block.add_new(0x0E, "FL", 0.0125)  # MR Scale Slope
        block.add_new(0x0D, "FL", 3.0)  # MR Scale Intercept
        ds.save_as(dest / f"IM{i:04d}.dcm")
    return dest


def ge_diffusion_series(dest: Path, slices: int = 2) -> Path:
    """GE DWI: one b=0 and two b=1000 volumes; b-value in (0043,xx39) slop_int_6, directions in
    (0019,xxBB/BC/BD), the diffusion sequence name in (0019,xx9C)."""
    dest.mkdir(parents=True, exist_ok=True)
    uids = [generate_uid(entropy_srcs=["ge", k]) for k in ("series", "study", "frame")]
    volumes = [(0, (0.0, 0.0, 0.0)), (1000, (1.0, 0.0, 0.0)), (1000, (0.0, 0.70711, 0.70711))]
    i = 0
    for v, (b, direction) in enumerate(volumes):
        for z in range(slices):
            ds = _base(i, *uids, "GEDWI", slices, z)
            ds.Manufacturer, ds.ManufacturerModelName = "GE MEDICAL SYSTEMS", "SIGNA Pioneer"
            ds.ScanningSequence, ds.SequenceVariant, ds.ImageType = "EP\\SE", "NONE", ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.EchoTime, ds.RepetitionTime = 80, 4000
            ds.AcquisitionNumber = 1
            ds.InStackPositionNumber = z + 1
            ds.TemporalPositionIdentifier = v + 1
            ds.NumberOfTemporalPositions = len(volumes)
            acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            acq.add_new(0x9C, "LO", "epi2")
            acq.add_new(0xBB, "DS", str(direction[0]))
            acq.add_new(0xBC, "DS", str(direction[1]))
            acq.add_new(0xBD, "DS", str(direction[2]))
            parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
            parm.add_new(0x39, "IS", [str(b + 1000000000), "8", "0", "0"])  # slop_int_6..9
            ds.save_as(dest / f"IM{i:04d}.dcm")
            i += 1
    return dest
