"""Benchmark input trees, generated in code (nothing committed).

``real_header_tree``: copies of the dcm_qa_decubitus series (real Siemens headers and CSA blobs)
re-issued for N fake patients with new UIDs.  ``tiny_subject_tree``: one small header-only DICOM
per subject, for DAG and per-job overhead measurements.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage


def _uid(*parts) -> str:
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "/".join(map(str, parts))).int)


def real_header_tree(source: Path, dest: Path, patients: int, studies: int = 1) -> int:
    """Write, for each of ``patients`` fake patients, ``studies`` studies holding a copy of every
    series under ``source``; return the number of files."""
    files = sorted(source.rglob("*.dcm"))
    total = patients * studies * len(files)
    if dest.exists() and sum(1 for _ in dest.rglob("*.dcm")) == total:
        return total
    if dest.exists():
        import shutil
        shutil.rmtree(dest)
    sources = [(f, pydicom.dcmread(f)) for f in files]
    for p in range(patients):
        pid = f"BENCH{p:05d}"
        for st in range(studies):
            for f, ds in sources:
                series = f.parent.name
                ds.PatientName = f"BENCHMARK^PATIENT{p:05d}"
                ds.PatientID = pid
                ds.PatientBirthDate = f"19{50 + p % 40:02d}0{1 + p % 9}1{p % 9}"
                ds.StudyInstanceUID = _uid(pid, st, "study")
                ds.SeriesInstanceUID = _uid(pid, st, series)
                ds.SOPInstanceUID = _uid(pid, st, series, f.name)
                ds.FrameOfReferenceUID = _uid(pid, st, series, "for")
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                out = dest / pid / f"study{st}" / series / f"{f.stem[:4]}.dcm"
                out.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(out, enforce_file_format=True)
    return total


def tiny_subject_tree(dest: Path, subjects: int) -> int:
    """One 1-KB header-only MR object per subject."""
    if dest.exists() and sum(1 for _ in dest.iterdir()) == subjects:
        return subjects
    for i in range(subjects):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = _uid("tiny", i, "sop")
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = f"TINY^SUBJECT{i:06d}"
        ds.PatientID = f"TINY{i:06d}"
        ds.PatientBirthDate = "19700101"
        ds.StudyDate = "20200101"
        ds.Modality = "MR"
        ds.InstitutionName = "Benchmark Hospital"
        ds.StudyInstanceUID = _uid("tiny", i, "study")
        ds.SeriesInstanceUID = _uid("tiny", i, "series")
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        out = dest / f"TINY{i:06d}" / "1.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    return subjects
