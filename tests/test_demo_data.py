"""Tests for the generated raw demo export (deidflow.demo)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from deidflow import demo_head  # noqa: E402
from deidflow.demo import DemoPatient, main, make_demo_input, planted_identifiers  # noqa: E402

ACME = "ACME PACS 1.0"
SOURCE_FILES = {"MR": "MR_small.dcm", "CT": "CT_small.dcm", "US": "SC_rgb_small_odd.dcm"}


# ---------------------------------------------------------------- helpers / fixtures


def _files(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _tree(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in _files(dest)}


def _walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _is_head(ds: Dataset) -> bool:
    return ds.get("BodyPartExamined") == "HEAD"


def _acme(ds: Dataset, offset: int) -> str:
    """Value of an ACME private element, decoding raw UN bytes of implicit-VR files."""
    value = ds.private_block(0x0009, ACME)[offset].value
    if isinstance(value, bytes):
        value = value.decode(convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6"))[0])
    return str(value).rstrip("\x00 ")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DemoPatient]]:
    dest = tmp_path_factory.mktemp("demo") / "export"
    return dest, make_demo_input(dest, seed=0)


@pytest.fixture(scope="module")
def datasets(demo: tuple[Path, list[DemoPatient]]) -> dict[str, Dataset]:
    dest, _ = demo
    return {p.relative_to(dest).as_posix(): pydicom.dcmread(p) for p in _files(dest)}


@pytest.fixture(scope="module")
def planted(demo: tuple[Path, list[DemoPatient]]) -> set[str]:
    return planted_identifiers(demo[0])


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_tree(demo, tmp_path: Path) -> None:
    dest, patients = demo
    again = make_demo_input(tmp_path / "again", seed=0)
    assert again == patients
    assert _tree(tmp_path / "again") == _tree(dest)


def test_other_seed_changes_identifiers(demo, tmp_path: Path) -> None:
    _, patients = demo
    other = make_demo_input(tmp_path / "other", seed=1)
    assert [p.name for p in other] == [p.name for p in patients]
    assert {p.patient_id for p in other}.isdisjoint({p.patient_id for p in patients})
    uids = {s.study_instance_uid for p in patients for s in p.studies}
    assert uids.isdisjoint({s.study_instance_uid for p in other for s in p.studies})


# ---------------------------------------------------------------- content / structure


def test_patients_studies_and_modalities(demo, datasets) -> None:
    dest, patients = demo
    assert len(patients) >= 3
    assert len({p.patient_id for p in patients}) == len(patients)
    multi = [p for p in patients if len(p.studies) >= 2]
    assert multi, "one patient must have two studies"
    studies = multi[0].studies
    assert len({s.study_instance_uid for s in studies}) == len(studies)
    assert len({s.study_date for s in studies}) == len(studies)
    assert len({s.accession_number for s in studies}) == len(studies)

    listed = {f for p in patients for s in p.studies for f in s.files}
    assert listed == set(datasets)
    head = [f for f, ds in datasets.items() if _is_head(ds)]
    assert len(head) == demo_head.N_SLICES
    assert 20 <= len(datasets) - len(head) <= 40
    assert {ds.Modality for ds in datasets.values()} == {"MR", "CT", "US"}
    # Each study's files really belong to that patient and study.
    for p in patients:
        for s in p.studies:
            for f in s.files:
                ds = datasets[f]
                assert ds.PatientID == p.patient_id
                assert ds.StudyInstanceUID == s.study_instance_uid
                assert ds.AccessionNumber == s.accession_number
                assert ds.Modality in s.modalities


def test_mr_series_has_several_distinct_slices(datasets) -> None:
    by_series: dict[str, list[Dataset]] = {}
    for ds in datasets.values():
        if ds.Modality == "MR":
            by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    big = [s for s in by_series.values() if len(s) >= 4]
    assert big
    for series in big:
        assert len({ds.SOPInstanceUID for ds in series}) == len(series)
        assert len({int(ds.InstanceNumber) for ds in series}) == len(series)
        assert len({float(ds.SliceLocation) for ds in series}) == len(series)
        assert len({ds.FrameOfReferenceUID for ds in series}) == 1


def test_every_file_is_valid_part10(demo, datasets) -> None:
    dest, _ = demo
    transfer_syntaxes = set()
    for path in _files(dest):
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM", path
        ds = pydicom.dcmread(path)  # no force
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.SourceApplicationEntityTitle
        transfer_syntaxes.add(meta.TransferSyntaxUID)
        assert re.fullmatch(r"IM_\d{4}\.dcm", path.name)
    assert transfer_syntaxes == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    captures = [ds for ds in datasets.values() if ds.SOPClassUID == SecondaryCaptureImageStorage]
    assert len(captures) == 1  # the screen capture with burned-in text (deidflow.demo.burned_in_lines)
    assert "BurnedInAnnotation" not in captures[0] and captures[0].PhotometricInterpretation == "MONOCHROME2"
    us = [ds for ds in datasets.values() if ds.Modality == "US" and ds not in captures]
    assert 1 <= len(us) <= 2
    for ds in us:
        assert ds.SOPClassUID == UltrasoundImageStorage
        assert ds.PhotometricInterpretation == "RGB"
        assert ds.SamplesPerPixel == 3


def test_pixel_data_copied_unchanged(datasets) -> None:
    source_pixels = {
        m: pydicom.dcmread(get_testdata_file(name)).PixelData for m, name in SOURCE_FILES.items()
    }
    for ds in datasets.values():
        if not _is_head(ds) and ds.SOPClassUID != SecondaryCaptureImageStorage:
            assert ds.PixelData == source_pixels[ds.Modality]
    mr = next(ds for ds in datasets.values() if ds.SOPClassUID == MRImageStorage)
    assert mr.pixel_array.shape == (64, 64)


def test_head_mri_is_a_classic_3d_t1_series_with_full_geometry(demo, datasets) -> None:
    """One head T1 (what the face stage needs): 96 sagittal 2 mm slices of MR Image Storage, one
    orientation, positions 2 mm apart along the slice normal, int16 pixels below 4096 that are the
    demo_head volume, a head (not an empty box) large enough for the face selector."""
    _, patients = demo
    head = sorted((ds for ds in datasets.values() if _is_head(ds)), key=lambda d: int(d.InstanceNumber))
    assert len({ds.SeriesInstanceUID for ds in head}) == 1 and len(head) == demo_head.N_SLICES
    assert len({ds.SOPInstanceUID for ds in head}) == len(head)
    (owner,) = [p for p in patients if head[0].PatientID == p.patient_id]
    assert owner.name == str(head[0].PatientName) and len(owner.studies) == 1
    assert head[0].StudyInstanceUID == owner.studies[0].study_instance_uid
    volume = demo_head.head_t1()
    row, col = (np.array([float(v) for v in head[0].ImageOrientationPatient[i:i + 3]]) for i in (0, 3))
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in head])
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps, 2.0 * normal)
    for ds in head:
        assert ds.SOPClassUID == MRImageStorage and "NumberOfFrames" not in ds
        assert ds.Modality == "MR" and ds.MRAcquisitionType == "3D" and ds.PatientPosition == "HFS"
        assert [float(v) for v in ds.ImageOrientationPatient] == list(demo_head.ORIENTATION)
        assert [float(v) for v in ds.PixelSpacing] == [2.0, 2.0] and float(ds.SliceThickness) == 2.0
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (128, 128, 16, 1)
        pixels = ds.pixel_array
        assert pixels.dtype == np.int16
        assert np.array_equal(pixels, volume[int(ds.InstanceNumber) - 1])
    assert volume.min() >= 0 and volume.max() < 4096  # high bytes < 0x10: pixels never spell a value
    extent = np.array([demo_head.N_SLICES, demo_head.ROWS, demo_head.COLUMNS]) * 2.0
    assert extent.min() >= 60
    inside = volume > 0.12 * np.percentile(volume[volume > 0], 99.5)  # the face renderer's skin level
    assert 0.15 < inside.mean() < 0.6  # a head fills a good part of the field of view, not all of it
    assert not inside[[0, -1]].any() and not inside[:, [0, -1]].any()  # first/last slice, top/bottom rows empty


def test_source_identity_never_copied(demo) -> None:
    dest, _ = demo
    needles: set[str] = set()
    for name in SOURCE_FILES.values():
        src = pydicom.dcmread(get_testdata_file(name))
        for elem in list(_walk(src.file_meta)) + list(_walk(src)):
            if elem.VR == "UI" and elem.value and UID(elem.value).name == elem.value:
                needles.add(str(elem.value))
        needles.update({str(src.PatientName), str(src.PatientID)})
    blob = b"".join(_tree(dest).values())
    leaked = {n for n in needles if n.encode() in blob}
    assert not leaked


def test_folder_names_carry_identity(demo) -> None:
    dest, patients = demo
    for p in patients:
        folder = dest / p.folder
        assert folder.is_dir()
        assert p.patient_id in p.folder
        for s in p.studies:
            assert (folder / f"{s.study_date}_{s.accession_number}").is_dir()
    assert any(not p.folder.isascii() for p in patients)


def test_nested_private_overlay_and_curve_attributes(demo, datasets) -> None:
    _, patients = demo
    by_study = {s.study_instance_uid: set(s.files) for p in patients for s in p.studies}
    sop_by_file = {f: ds.SOPInstanceUID for f, ds in datasets.items()}
    saw = {"ref_image": False, "source_image": False, "overlay": False, "curve": False,
           "csa": False, "implicit_acme": False}
    for f, ds in datasets.items():
        same_study = {sop_by_file[g] for g in by_study[ds.StudyInstanceUID]} - {ds.SOPInstanceUID}
        # Request attributes with nested referenced study
        (req,) = ds.RequestAttributesSequence
        assert req.RequestedProcedureID and req.ScheduledProcedureStepID
        assert req.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ds.StudyInstanceUID
        assert ds.ProcedureCodeSequence[0].CodeMeaning
        assert ds.PerformedProcedureStepDescription
        assert len(ds.OtherPatientIDsSequence) >= 1
        for keyword, flag in (("ReferencedImageSequence", "ref_image"),
                              ("SourceImageSequence", "source_image")):
            for item in ds.get(keyword, []):
                assert item.ReferencedSOPInstanceUID in same_study
                saw[flag] = True
        # ACME private block with patient name and ID
        assert _acme(ds, 0x10) == str(ds.PatientName)
        assert _acme(ds, 0x11) == ds.PatientID
        if ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian:
            saw["implicit_acme"] = ds.private_block(0x0009, ACME)[0x10].VR == "UN"
        if (0x0029, 0x0010) in ds:
            csa = ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10]
            assert csa.VR == "OB" and isinstance(csa.value, bytes)
            saw["csa"] = True
        saw["overlay"] |= (0x6000, 0x4000) in ds
        saw["curve"] |= (0x5000, 0x0022) in ds
    assert all(saw.values()), saw


# ---------------------------------------------------------------- planted identifiers


def test_planted_identifiers_cover_patients_and_studies(demo, datasets, planted) -> None:
    _, patients = demo
    for p in patients:
        first_group = p.name.split("=")[0].split("^")
        expected = {p.name, first_group[0], first_group[1], p.patient_id, p.issuer,
                    p.birth_date, p.address, p.phone, p.folder}
        expected |= {pid for pid, _ in p.other_patient_ids}
        for s in p.studies:
            expected |= {s.study_instance_uid, s.accession_number, s.study_id,
                         s.study_date, s.institution, f"{s.study_date}_{s.accession_number}"}
        assert expected <= planted, expected - planted
    for ds in datasets.values():
        expected = {ds.SOPInstanceUID, ds.SeriesInstanceUID, str(ds.ReferringPhysicianName),
                    str(ds.OperatorsName), ds.StationName, ds.DeviceSerialNumber,
                    ds.InstitutionAddress, ds.file_meta.SourceApplicationEntityTitle}
        if "FrameOfReferenceUID" in ds:
            expected.add(ds.FrameOfReferenceUID)
        assert expected <= planted, expected - planted


def test_planted_identifiers_include_non_ascii_names(planted) -> None:
    for value in ("MÜLLER^JÜRGEN", "MÜLLER", "JÜRGEN", "Ødegård^Åse^Marit", "Ødegård",
                  "Åse", "Yamada^Tarou=山田^太郎=やまだ^たろう", "山田", "太郎", "やまだ",
                  "MUSTERMANN", "ERIKA", "DOE", "JOHN"):
        assert value in planted, value


def test_planted_identifiers_include_private_nested_and_free_text(datasets, planted) -> None:
    for ds in datasets.values():
        assert _acme(ds, 0x12) in planted  # exam key only stored privately
        assert _acme(ds, 0x13) in planted  # archive date only stored privately
        req = ds.RequestAttributesSequence[0]
        assert {req.RequestedProcedureID, req.ScheduledProcedureStepID} <= planted
        assert {i.PatientID for i in ds.OtherPatientIDsSequence} <= planted
        assert ds.PlacerOrderNumberImagingServiceRequest in planted
        for keyword in ("ImageComments", "PatientComments"):
            if keyword in ds:
                assert ds.data_element(keyword).value in planted
        if (0x6000, 0x4000) in ds:
            assert ds[0x6000, 0x4000].value in planted
        if (0x5000, 0x0022) in ds:
            assert ds[0x5000, 0x0022].value in planted


def test_planted_identifiers_leave_out_generic_values(datasets, planted) -> None:
    any_ds = next(iter(datasets.values()))
    generic = {"MR", "CT", "US", "F", "M", "O", "DR", "ORIGINAL", "PRIMARY", "MONOCHROME2",
               "RGB", "SIEMENS", "HFS", str(MRImageStorage), str(ExplicitVRLittleEndian),
               str(any_ds.file_meta.ImplementationClassUID), "IM_0001.dcm"}
    assert not generic & planted
    assert all(len(v) >= 2 for v in planted)


def test_every_planted_identifier_occurs_in_the_tree(demo, planted) -> None:
    dest, _ = demo
    blob = b"".join(_tree(dest).values())
    parts = {part for p in _files(dest) for part in p.relative_to(dest).parts}
    missing = []
    for value in planted:
        encodings = [value.encode(enc) for enc in ("utf-8", "latin-1")
                     if value.encode(enc, errors="ignore").decode(enc) == value]
        if value not in parts and not any(e in blob for e in encodings):
            missing.append(value)
    assert not missing


def test_cli_writes_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--seed", "0"]) == 0
    assert "files" in capsys.readouterr().out
    assert len(_files(tmp_path / "cli")) >= 20
