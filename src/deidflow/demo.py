"""Generate a small, realistic *raw* PACS-export demo tree full of fake PHI.

The tree is built in code from pydicom's bundled test images (MR_small, CT_small,
SC_rgb_small_odd) so nothing large has to be committed or downloaded.  The pixel
data of the source files is copied byte for byte.  One patient also has a 3D
T1-weighted head MRI with a face (96 sagittal 2 mm slices, classic MR Image
Storage), made in code from the average head that ships in pydeface's wheel
(:mod:`deidflow.demo_head`), so that the face stage has a face to remove, and the ultrasound
study has a secondary capture of the screen with the patient's name, ID, birth and study date
burned into its pixels (drawn in code; its header does not announce it: BurnedInAnnotation absent),
so that the pixel step has text to remove and the QC report shows the redaction.
Every header value that could identify someone (names, IDs, dates, UIDs,
institution, device, free text, private tags, nested sequences, folder names)
is fake and generated deterministically from ``seed``.  The source files' own UIDs and identifiers are
never copied: only technical acquisition (0018) and image pixel (0028) attributes
plus the pixel data come from them.

Layout, as a typical PACS export tool would write it::

    dest/<FAMILY>_<GIVEN>_<PatientID>/<StudyDate>_<AccessionNumber>/
         <SeriesNumber>_<SeriesDescription>/IM_<InstanceNumber>.dcm

``planted_identifiers`` re-reads such a tree and returns every identifying
string in it, so that tests can scan a de-identified release for leaks.

Usage: ``python -m deidflow.demo DEST [--seed N]``.
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)
from pydicom.valuerep import PersonName

from . import demo_head

__all__ = [
    "DemoPatient",
    "DemoStudy",
    "make_demo_input",
    "planted_identifiers",
    "main",
]

# --------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoStudy:
    """One planted study, as written to disk."""

    study_instance_uid: str
    study_id: str
    accession_number: str
    study_date: str
    description: str
    institution: str
    modalities: tuple[str, ...]
    files: tuple[str, ...]  # POSIX paths relative to ``dest``


@dataclass(frozen=True)
class DemoPatient:
    """One planted (fake) patient and everything identifying planted for them."""

    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    specific_character_set: str  # "" means the default repertoire (no 0008,0005)
    other_patient_ids: tuple[tuple[str, str], ...]  # (PatientID, IssuerOfPatientID)
    address: str
    phone: str
    folder: str  # top-level folder name under ``dest``
    studies: tuple[DemoStudy, ...] = field(default=())


# --------------------------------------------------------------------------
# Static scenario (names are fixed; numbers, dates and UIDs come from the seed)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    key: str
    institution: str
    address: str
    department: str
    ae_title: str
    issuer: str
    referring: str
    requesting: str
    requesting_service: str
    reading: str
    timezone: str
    accession_prefix: str


@dataclass(frozen=True)
class _Device:
    key: str
    modality: str
    manufacturer: str
    model: str
    station: str
    serial_format: str
    software: str
    operator: str
    performing: str
    siemens_csa: bool = False


@dataclass(frozen=True)
class _SeriesSpec:
    number: int
    description: str
    device: _Device
    n_instances: int
    reference_series: int | None = None  # also reference first image of that series
    derived_from_first: bool = False  # instances > 1 get a SourceImageSequence
    implicit_vr_instance: int | None = None  # write this instance Implicit VR LE
    overlay_comment: str | None = None  # (6000,4000) on instance 1
    curve_description: str | None = None  # (5000,0022) on instance 1
    head_t1: bool = False  # pixels, geometry and technique from deidflow.demo_head
    burned_in: bool = False  # secondary capture with the patient's name and dates burned into its pixels


@dataclass(frozen=True)
class _StudySpec:
    site: _Site
    description: str
    procedure_code: tuple[str, str, str]  # value, scheme designator, meaning
    reason: str
    series: tuple[_SeriesSpec, ...]
    image_comments: str | None = None  # may use {phone} / {patient_id} / {birth_dmy}


@dataclass(frozen=True)
class _PatientSpec:
    key: str
    name: str
    sex: str
    birth_year: int
    charset: str  # "" for default repertoire
    id_format: str
    other_id_formats: tuple[tuple[str, str], ...]
    address: str
    phone_format: str
    weight: str
    size: str
    comments: str | None
    studies: tuple[_StudySpec, ...]


_KMS = _Site(
    "KMS", "Klinikum Musterstadt", "Hauptstraße 1, 38100 Musterstadt, Deutschland",
    "Institut für Diagnostische Radiologie", "KMS_PACS01", "KMS-KIS",
    "WEBER^KLAUS^^PROF. DR. MED.", "HOFFMANN^SABINE^^DR. MED.", "Neurologie Station 4B",
    "BRANDT^THOMAS^^DR. MED.", "+0100", "KMS",
)
_SGH = _Site(
    "SGH", "Springfield General Hospital", "1200 Hospital Drive, Springfield, IL 62701, USA",
    "Department of Radiology", "SGH_PACS", "SGH-MRN",
    "SMITH^ALICE^^^MD", "PATEL^RAJESH^^^MD", "Emergency Department",
    "NGUYEN^LINH^^^MD", "-0600", "SGH",
)
_RPS = _Site(
    "RPS", "Radiologie am Schloßpark", "Schloßallee 3, 80333 München",
    "CT-Abteilung Schloßpark", "RPS_ARCHIV", "RPS-PVS",
    "SCHÄFER^MONIKA^^DR. MED.", "KRÜGER^PAUL^^DR. MED.", "Hausarztpraxis Dr. Krüger",
    "LANGE^BIRGIT^^DR. MED.", "+0100", "RPS",
)
_FJS = _Site(
    "FJS", "Fjordby sykehus", "Sjøgata 12, 5003 Bergen, Norge",
    "Radiologisk avdeling", "FJS_PACS", "FJS-DIPS",
    "Bråthen^Øystein", "Haugen^Ingrid", "Nevrologisk poliklinikk",
    "Kvamme^Magnus", "+0100", "FJS",
)
_TCH = _Site(
    "TCH", "東都中央病院", "東京都港区芝公園9-9-9",
    "放射線科", "TCH_PACS", "TCH-HIS",
    "Suzuki^Ichiro=鈴木^一郎", "Tanaka^Hanako=田中^花子", "内科",
    "Sato^Kenji=佐藤^健二", "+0900", "TCH",
)

_KMS_MR = _Device("KMS_MR", "MR", "SIEMENS", "Avanto", "KMSMRAVANTO1", "{n6}",
                  "syngo MR B17", "SCHMIDT^ANNA", "KOCH^JULIA^^DR. MED.", siemens_csa=True)
_KMS_CT = _Device("KMS_CT", "CT", "GE MEDICAL SYSTEMS", "LightSpeed VCT", "KMSCT02", "{n6}",
                  "07MW11.10", "WAGNER^PETRA", "KOCH^JULIA^^DR. MED.")
_SGH_US = _Device("SGH_US", "US", "GE Healthcare", "LOGIQ E9", "SGH-US-03", "LE9{n6}",
                  "R6.1.2", "JOHNSON^MARY", "NGUYEN^LINH^^^MD")
_RPS_CT = _Device("RPS_CT", "CT", "SIEMENS", "SOMATOM go.Up", "RPSCT01", "{n6}",
                  "syngo CT VA30", "FISCHER^LENA", "LANGE^BIRGIT^^DR. MED.")
_FJS_MR = _Device("FJS_MR", "MR", "Philips", "Ingenia", "FJSMR1", "{n6}",
                  "5.4.1", "Nilsen^Kari", "Kvamme^Magnus")
_TCH_CT = _Device("TCH_CT", "CT", "TOSHIBA", "Aquilion ONE", "TCHCT1", "{n7}",
                  "V7.0", "Kobayashi^Yumi=小林^由美", "Sato^Kenji=佐藤^健二")

_PATIENTS: tuple[_PatientSpec, ...] = (
    _PatientSpec(
        "mustermann", "MUSTERMANN^ERIKA^^DR", "F", 1964, "ISO_IR 100", "{n8}",
        (("M{n9}", "GKV-KVNR"), ("ALT{n6}", "KMS-ALTKIS")),
        "Lindenweg 17, 38102 Musterstadt", "+49 531 {n7}", "68", "1.68",
        "Kontrastmittelallergie. Angehörige: Lisa Mustermann (Tochter)",
        (
            _StudySpec(
                _KMS, "MRT Schädel nativ", ("MRSCHAED", "99KMS", "MRT Schädel nativ"),
                "V.a. Raumforderung rechts frontal",
                (
                    _SeriesSpec(1, "t2_tse_tra_5mm", _KMS_MR, 4,
                                overlay_comment="Befund tel. an Prof. Weber übermittelt "
                                                "(Pat. Mustermann)"),
                    _SeriesSpec(2, "t1_se_sag", _KMS_MR, 3, reference_series=1),
                ),
                image_comments="Pat. Mustermann, Erika, geb. {birth_dmy}: Verlaufskontrolle",
            ),
            _StudySpec(
                _KMS, "CT Thorax mit KM", ("CTTHOKM", "99KMS", "CT Thorax mit Kontrastmittel"),
                "Staging",
                (_SeriesSpec(2, "Thorax 5mm STND", _KMS_CT, 4),),
            ),
        ),
    ),
    _PatientSpec(
        "doe", "DOE^JOHN", "M", 1958, "", "MRN{n7}",
        (("9{n2}-{n2}-{n4}", "US-SSA"),),
        "1742 Maple Street, Springfield, IL 62704", "+1 217 555 {n4}", "84", "1.80", None,
        (
            _StudySpec(
                _SGH, "US ABDOMEN COMPLETE", ("76700", "C4", "US ABDOMEN COMPLETE"),
                "RUQ pain",
                (_SeriesSpec(1, "ABDOMEN", _SGH_US, 2, derived_from_first=True),
                 _SeriesSpec(2, "Report capture", _SGH_US, 1, burned_in=True)),
                image_comments="J. DOE RUQ pain, r/o cholelithiasis, call {phone}",
            ),
        ),
    ),
    _PatientSpec(
        "mueller", "MÜLLER^JÜRGEN", "M", 1951, "ISO_IR 100", "P{n6}",
        (("K{n9}", "GKV-KVNR"),),
        "Gärtnerstraße 8, 80335 München", "+49 89 {n8}", "91", "1.76", None,
        (
            _StudySpec(
                _RPS, "CT Thorax nativ (Rückruf Dr. Schäfer)",
                ("CTTHO", "99RPS", "CT Thorax nativ"),
                "Husten seit 6 Wochen",
                (_SeriesSpec(3, "Thorax nativ 3mm", _RPS_CT, 3, implicit_vr_instance=2),),
                image_comments="Pat. Müller Jürgen, Tel. {phone}",
            ),
        ),
    ),
    _PatientSpec(
        "odegard", "Ødegård^Åse^Marit", "F", 1979, "ISO_IR 192", "{n8}",
        (("{ddmmyy}{n5}", "NO-FNR"),),
        "Kong Oscars gate 5, 5017 Bergen", "+47 {n8}", "59", "1.71", None,
        (
            _StudySpec(
                _FJS, "MR caput", ("MRCAP", "99FJS", "MR caput uten kontrast"),
                "Hodepine",
                (
                    _SeriesSpec(301, "T2W_TSE_TRA", _FJS_MR, 4,
                                curve_description="EKG-trigger Ødegård, Åse"),
                    _SeriesSpec(401, "T1W_3D_TFE_SAG", _FJS_MR, demo_head.N_SLICES,
                                head_t1=True),
                ),
                image_comments="Henvist fra fastlege, pas. Ødegård",
            ),
        ),
    ),
    _PatientSpec(
        "yamada", "Yamada^Tarou=山田^太郎=やまだ^たろう", "M", 1985, "ISO_IR 192", "TCH{n8}",
        (("{n4}-{n6}", "JP-HOKEN"),),
        "東京都新宿区西新宿8-8-8", "+81 3 {n4} {n4}", "72", "1.74", None,
        (
            _StudySpec(
                _TCH, "胸部単純CT", ("CT-CHEST", "99TCH", "胸部単純CT"),
                "健診異常",
                (_SeriesSpec(2, "Chest 5mm", _TCH_CT, 3),),
                image_comments="山田様 経過観察",
            ),
        ),
    ),
)

_SOURCES = {"MR": "MR_small.dcm", "CT": "CT_small.dcm", "US": "SC_rgb_small_odd.dcm"}
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage, "US": UltrasoundImageStorage}
_IMAGE_TYPE = {
    "MR": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "CT": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "US": ["ORIGINAL", "PRIMARY", "ABDOMINAL"],
}
_DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
_ACME_CREATOR = "ACME PACS 1.0"
_CSA_CREATOR = "SIEMENS CSA HEADER"
_UID_NAMESPACE = "deidflow.demo"


def _uuid_uid(*parts: str) -> str:
    """Deterministic UUID-derived UID (2.25.<int>) from name parts.

    ``generate_uid(prefix=None, entropy_srcs=...)`` would ignore the entropy and
    return a random UUID4, so a name-based UUID (uuid5) is used instead.
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, '|'.join(parts)).int}"

# Fixed, fake "PACS export tool" implementation identity (not patient related).
_IMPLEMENTATION_UID = _uuid_uid(_UID_NAMESPACE, "implementation")
_IMPLEMENTATION_VERSION = "ACME_PACS_10"

# Tags copied from the source image besides groups 0018/0028 and pixel data.
_SKIP_COPY = {0x00181000, 0x00181020}  # DeviceSerialNumber, SoftwareVersions
_SKIP_COPY_US = {0x00280008, 0x00280030}  # NumberOfFrames, PixelSpacing


# --------------------------------------------------------------------------
# Deterministic value generation
# --------------------------------------------------------------------------


class _Draw:
    """Seeded source of unique fake numbers, dates, times and UIDs."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self._used: set[str] = set()

    def fill(self, fmt: str, **extra: str) -> str:
        """Replace ``{nK}`` with K random digits (unique result); other keys from extra."""

        def repl(m: re.Match[str]) -> str:
            key = m.group(1)
            if key.startswith("n"):
                k = int(key[1:])
                return str(self.rng.randrange(10 ** (k - 1), 10**k))
            return extra[key]

        for _ in range(1000):
            value = re.sub(r"\{(\w+)\}", repl, fmt)
            if value not in self._used:
                self._used.add(value)
                return value
        raise RuntimeError(f"cannot draw a unique value for {fmt!r}")

    def day(self, start: date, span_days: int) -> date:
        return start + timedelta(days=self.rng.randrange(span_days))

    def time_of_day(self) -> datetime:
        return datetime(2000, 1, 1) + timedelta(seconds=self.rng.randrange(7 * 3600, 17 * 3600))

    def uid(self, *parts: object) -> str:
        return _uuid_uid(_UID_NAMESPACE, f"seed={self.seed}", *(str(p) for p in parts))


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: datetime) -> str:
    return t.strftime("%H%M%S")


def _age(birth: date, on: date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _safe_name(text: str) -> str:
    """Folder-name-safe version of text (keeps Unicode letters, as export tools do)."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_")


def _item(**attrs: object) -> Dataset:
    item = Dataset()
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _StudyValues:
    """Seed-dependent values shared by all instances of one study."""

    uid: str
    for_uid: str
    date: str
    time: datetime
    accession: str
    study_id: str
    rp_id: str
    sps_id: str
    pps_id: str
    placer: str
    exam_key: str
    archive_date: str
    age: str


@dataclass(frozen=True)
class _Instance:
    series: _SeriesSpec
    number: int
    sop_uid: str
    path: Path


def _load_sources() -> dict[str, Dataset]:
    sources: dict[str, Dataset] = {}
    for modality, name in _SOURCES.items():
        path = get_testdata_file(name)
        if path is None:
            raise RuntimeError(f"pydicom test file {name} is not available")
        sources[modality] = pydicom.dcmread(path)
    return sources


def make_demo_input(dest: Path, *, seed: int = 0) -> list[DemoPatient]:
    """Write the raw demo export under dest (created), return the patients planted.

    Output is byte-identical for the same seed; no clock or unseeded randomness is used.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    draw = _Draw(seed)
    sources = _load_sources()
    serials: dict[str, str] = {}
    return [_write_patient(dest, spec, draw, sources, serials) for spec in _PATIENTS]


def _write_patient(
    dest: Path,
    spec: _PatientSpec,
    draw: _Draw,
    sources: dict[str, Dataset],
    serials: dict[str, str],
) -> DemoPatient:
    birth = draw.day(date(spec.birth_year, 1, 1), 365)
    patient_id = draw.fill(spec.id_format)
    other_ids = tuple(
        (draw.fill(fmt, ddmmyy=birth.strftime("%d%m%y")), issuer)
        for fmt, issuer in spec.other_id_formats
    )
    phone = draw.fill(spec.phone_format)
    first_group = spec.name.split("=")[0].split("^")
    folder = _safe_name(f"{first_group[0]}_{first_group[1]}_{patient_id}")
    patient = DemoPatient(
        patient_id=patient_id,
        issuer=spec.studies[0].site.issuer,
        name=spec.name,
        birth_date=_da(birth),
        sex=spec.sex,
        specific_character_set=spec.charset,
        other_patient_ids=other_ids,
        address=spec.address,
        phone=phone,
        folder=folder,
    )
    studies: list[DemoStudy] = []
    study_day = draw.day(date(2019, 1, 1), 5 * 365)
    for index, study_spec in enumerate(spec.studies):
        if index:
            study_day += timedelta(days=draw.rng.randrange(60, 400))
        studies.append(
            _write_study(dest, spec, patient, birth, study_spec, index, study_day,
                         draw, sources, serials)
        )
    return replace(patient, studies=tuple(studies))


def _write_study(
    dest: Path,
    pspec: _PatientSpec,
    patient: DemoPatient,
    birth: date,
    spec: _StudySpec,
    index: int,
    study_day: date,
    draw: _Draw,
    sources: dict[str, Dataset],
    serials: dict[str, str],
) -> DemoStudy:
    site = spec.site
    key = (pspec.key, f"study{index}")
    study = _StudyValues(
        uid=draw.uid(*key, "study"),
        for_uid=draw.uid(*key, "frame-of-reference"),
        date=_da(study_day),
        time=draw.time_of_day(),
        accession=draw.fill(f"{site.accession_prefix}{study_day:%y}{{n6}}"),
        study_id=draw.fill("U{n7}"),
        rp_id=draw.fill("RP{n7}"),
        sps_id=draw.fill("SPS{n7}"),
        pps_id=draw.fill("PPS{n7}"),
        placer=draw.fill("ORD{n8}"),
        exam_key=f"ACME-{draw.rng.getrandbits(48):012X}",
        archive_date=_da(study_day + timedelta(days=1)),
        age=_age(birth, study_day),
    )
    study_dir = dest / patient.folder / _safe_name(f"{study.date}_{study.accession}")
    for series in spec.series:
        if series.device.key not in serials:
            serials[series.device.key] = draw.fill(series.device.serial_format)

    instances: dict[int, list[_Instance]] = {}
    for series in spec.series:
        series_dir = study_dir / _safe_name(f"{series.number:03d}_{series.description}")
        instances[series.number] = [
            _Instance(series, n, draw.uid(*key, f"series{series.number}", f"inst{n}"),
                      series_dir / f"IM_{n:04d}.dcm")
            for n in range(1, series.n_instances + 1)
        ]

    texts = {"phone": patient.phone, "patient_id": patient.patient_id,
             "birth_dmy": birth.strftime("%d.%m.%Y")}
    for s_index, series in enumerate(spec.series):
        series_uid = draw.uid(*key, f"series{series.number}", "series")
        series_time = study.time + timedelta(minutes=7 * s_index + 2)
        for inst in instances[series.number]:
            ds = _build_instance(
                pspec, patient, spec, study, series, series_uid, series_time, inst,
                instances, sources[series.device.modality], serials, texts,
            )
            implicit = inst.number == series.implicit_vr_instance
            ds.file_meta = _file_meta(ds, site, implicit)
            inst.path.parent.mkdir(parents=True, exist_ok=True)
            pydicom.dcmwrite(inst.path, ds, implicit_vr=implicit, little_endian=True,
                             enforce_file_format=True)

    all_instances = [i for series in spec.series for i in instances[series.number]]
    return DemoStudy(
        study_instance_uid=study.uid,
        study_id=study.study_id,
        accession_number=study.accession,
        study_date=study.date,
        description=spec.description,
        institution=site.institution,
        modalities=tuple(sorted({s.device.modality for s in spec.series})),
        files=tuple(i.path.relative_to(dest).as_posix() for i in all_instances),
    )


def _file_meta(ds: Dataset, site: _Site, implicit: bool) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = site.ae_title
    return meta


def _build_instance(
    pspec: _PatientSpec,
    patient: DemoPatient,
    spec: _StudySpec,
    study: _StudyValues,
    series: _SeriesSpec,
    series_uid: str,
    series_time: datetime,
    inst: _Instance,
    instances: dict[int, list[_Instance]],
    source: Dataset,
    serials: dict[str, str],
    texts: dict[str, str],
) -> Dataset:
    site, device = spec.site, series.device
    modality = device.modality
    ds = Dataset()
    if series.head_t1:
        _set_head_image(ds, inst.number)
    elif series.burned_in:
        _set_burned_in_capture(ds, patient, study)
    else:
        _copy_image_attributes(source, ds, modality)

    # SOP common / general image
    if pspec.charset:
        ds.SpecificCharacterSet = pspec.charset
    # A 3D acquisition is one acquisition; 2D demo slices were acquired one after the other.
    acq_time = series_time + timedelta(seconds=15 * (1 if series.head_t1 else inst.number))
    ds.ImageType = ["DERIVED", "SECONDARY"] if series.burned_in else _IMAGE_TYPE[modality]
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = _tm(acq_time + timedelta(seconds=3))
    ds.SOPClassUID = SecondaryCaptureImageStorage if series.burned_in else _SOP_CLASS[modality]
    ds.SOPInstanceUID = inst.sop_uid
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = _tm(study.time)
    ds.SeriesTime = _tm(series_time)
    ds.AcquisitionTime = _tm(acq_time)
    ds.ContentTime = _tm(acq_time + timedelta(seconds=2))
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = device.manufacturer
    ds.InstitutionName = site.institution
    ds.InstitutionAddress = site.address
    ds.ReferringPhysicianName = site.referring
    ds.TimezoneOffsetFromUTC = site.timezone
    ds.StationName = device.station
    ds.StudyDescription = spec.description
    ds.ProcedureCodeSequence = DicomSequence([
        _item(CodeValue=spec.procedure_code[0], CodingSchemeDesignator=spec.procedure_code[1],
              CodeMeaning=spec.procedure_code[2])
    ])
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = site.department
    ds.PerformingPhysicianName = device.performing
    ds.NameOfPhysiciansReadingStudy = site.reading
    ds.OperatorsName = device.operator
    ds.ManufacturerModelName = device.model

    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.OtherPatientIDsSequence = DicomSequence([
        _item(PatientID=pid, IssuerOfPatientID=issuer, TypeOfPatientID="TEXT")
        for pid, issuer in patient.other_patient_ids
    ])
    ds.PatientAge = study.age
    ds.PatientSize = pspec.size
    ds.PatientWeight = pspec.weight
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    if pspec.comments:
        ds.PatientComments = pspec.comments

    # Equipment
    ds.DeviceSerialNumber = serials[device.key]
    ds.SoftwareVersions = device.software

    # Study / series / instance identity and geometry
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = inst.number
    if modality in ("MR", "CT"):
        ds.FrameOfReferenceUID = study.for_uid
        ds.PositionReferenceIndicator = ""
        if not series.head_t1:
            _set_slice_position(source, ds, inst.number)
    else:
        ds.PatientOrientation = ""
        if not series.burned_in:  # the capture does not announce its burned-in text
            ds.BurnedInAnnotation = "NO"
    if spec.image_comments:
        ds.ImageComments = spec.image_comments.format(**texts)

    # References to other instances of the same study
    first = instances[series.number][0]
    refs = [first] if inst.number > 1 else []
    if series.reference_series is not None:
        refs.insert(0, instances[series.reference_series][0])
    if refs and not series.derived_from_first:
        ds.ReferencedImageSequence = DicomSequence([
            _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=r.sop_uid)
            for r in refs
        ])
    if series.derived_from_first and inst.number > 1:
        ds.ImageType = ["DERIVED", "SECONDARY", "ABDOMINAL"]
        ds.DerivationDescription = "Measurement capture"
        ds.SourceImageSequence = DicomSequence([
            _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=first.sop_uid)
        ])

    # Requested / performed procedure step
    ds.RequestingPhysician = site.requesting
    ds.RequestingService = site.requesting_service
    ds.RequestAttributesSequence = DicomSequence([
        _item(
            AccessionNumber=study.accession,
            ReferencedStudySequence=DicomSequence([
                _item(ReferencedSOPClassUID=_DETACHED_STUDY_MANAGEMENT,
                      ReferencedSOPInstanceUID=study.uid)
            ]),
            RequestedProcedureDescription=spec.description,
            ScheduledProcedureStepDescription=spec.description,
            ScheduledProcedureStepID=study.sps_id,
            RequestedProcedureID=study.rp_id,
            ReasonForTheRequestedProcedure=spec.reason,
        )
    ])
    ds.PerformedProcedureStepStartDate = study.date
    ds.PerformedProcedureStepStartTime = _tm(study.time)
    ds.PerformedProcedureStepID = study.pps_id
    ds.PerformedProcedureStepDescription = spec.description
    ds.PlacerOrderNumberImagingServiceRequest = study.placer

    # Private blocks: PACS stamp on every file, Siemens CSA on Siemens MR.
    acme = ds.private_block(0x0009, _ACME_CREATOR, create=True)
    acme.add_new(0x10, "LO", patient.name)
    acme.add_new(0x11, "LO", patient.patient_id)
    acme.add_new(0x12, "LO", study.exam_key)
    acme.add_new(0x13, "DA", study.archive_date)
    if device.siemens_csa:
        csa = ds.private_block(0x0029, _CSA_CREATOR, create=True)
        csa.add_new(0x08, "CS", "IMAGE NUM 4")
        csa.add_new(0x09, "LO", "20100114")
        csa.add_new(0x10, "OB", _csa_blob(series, instances[series.number][0].sop_uid))

    if inst.number == 1 and series.overlay_comment:
        _add_overlay(ds, series.overlay_comment)
    if inst.number == 1 and series.curve_description:
        ds.add_new(0x50000020, "CS", "ECG")
        ds.add_new(0x50000022, "LO", series.curve_description)
    return ds


def _copy_image_attributes(source: Dataset, ds: Dataset, modality: str) -> None:
    """Copy technical (0018) and image-pixel (0028) attributes and the pixel data bytes."""
    skip = _SKIP_COPY | (_SKIP_COPY_US if modality == "US" else set())
    for elem in source:
        if elem.tag.is_private or elem.tag.group not in (0x0018, 0x0028) or elem.tag in skip:
            continue
        ds.add(copy.deepcopy(elem))
    if modality == "US":
        ds.PhotometricInterpretation = "RGB"
    vr = "OB" if int(source.BitsAllocated) <= 8 else "OW"
    ds.add(DataElement(0x7FE00010, vr, bytes(source.PixelData)))


BURNED_IN_SIZE = (400, 560)  # rows, columns of the screen capture
BURNED_IN_TEXT_BOX = (8, 8, 362, 92)  # x0, y0, x1, y1 around its burned-in lines


def burned_in_lines(patient: "DemoPatient", study_date: str) -> list[str]:
    """The text burned into the demo's screen capture: the patient's name, ID, birth and study date."""
    family_given = patient.name.split("=")[0].replace("^", " ").strip()
    birth, day = patient.birth_date, study_date
    return [family_given, f"ID {patient.patient_id}  DOB {birth[:4]}-{birth[4:6]}-{birth[6:]}",
            f"{day[:4]}-{day[4:6]}-{day[6:]}  LOGIQ E9"]


def _set_burned_in_capture(ds: Dataset, patient: "DemoPatient", study: "_StudyValues") -> None:
    """A secondary capture of an ultrasound screen (made in code: speckle in a fan) with the
    patient's name and dates written into the pixels at the top left; the header says nothing
    about burned-in annotation (BurnedInAnnotation absent), as many capture devices write it."""
    from PIL import Image, ImageDraw, ImageFont
    rows, cols = BURNED_IN_SIZE
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = np.hypot(xx - cols / 2, yy + 40)
    angle = np.degrees(np.arctan2(xx - cols / 2, yy + 40))
    fan = (r > 170) & (r < rows + 30) & (np.abs(angle) < 35)
    pixels = np.zeros((rows, cols), np.uint8)
    pixels[fan] = np.clip(rng.gamma(2.0, 30.0, fan.sum()) + 20, 0, 200).astype(np.uint8)
    img = Image.fromarray(pixels, "L")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=22)
    for i, line in enumerate(burned_in_lines(patient, study.date)):
        draw.text((12, 10 + 26 * i), line, fill=255, font=font)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ConversionType = "WSD"
    ds.add(DataElement(0x7FE00010, "OB", np.asarray(img, np.uint8).tobytes()))


def _set_head_image(ds: Dataset, number: int) -> None:
    """Technique, geometry and pixel data of slice ``number`` (1-based) of the demo head T1."""
    for keyword, value in demo_head.ACQUISITION.items():
        setattr(ds, keyword, value)
    x, y, z = demo_head.position(number - 1)
    ds.ImageOrientationPatient = [f"{v:g}" for v in demo_head.ORIENTATION]
    ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"]
    ds.SliceLocation = f"{x:.4f}"  # sagittal: position along the left-right axis
    ds.add(DataElement(0x7FE00010, "OW", demo_head.head_t1()[number - 1].tobytes()))


def _set_slice_position(source: Dataset, ds: Dataset, number: int) -> None:
    x, y, z0 = (float(v) for v in source.ImagePositionPatient)
    step = float(source.get("SpacingBetweenSlices") or source.SliceThickness)
    z = z0 + (number - 1) * step
    ds.ImageOrientationPatient = list(source.ImageOrientationPatient)
    ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"]
    ds.SliceLocation = f"{z:.4f}"


def _csa_blob(series: _SeriesSpec, reference_uid: str) -> bytes:
    """A small CSA-like blob whose embedded protocol text references another image UID."""
    text = (
        "### ASCCONV BEGIN ###\n"
        f'tProtocolName\t = ""{series.description}""\n'
        f"sSliceArray.lSize\t = {series.n_instances}\n"
        f'tReferenceImage0\t = ""{reference_uid}""\n'
        "### ASCCONV END ###\n"
    ).encode("ascii")
    blob = b"SV10\x04\x03\x02\x01" + len(text).to_bytes(4, "little") + text
    return blob + b"\x00" * (len(blob) % 2)


def _add_overlay(ds: Dataset, comment: str) -> None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = np.zeros((rows, cols), dtype=np.uint8)
    bits[rows // 8, cols // 8: -cols // 8] = 1
    bits[-rows // 8, cols // 8: -cols // 8] = 1
    bits[rows // 8: -rows // 8, cols // 8] = 1
    bits[rows // 8: -rows // 8, -cols // 8] = 1
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000022, "LO", "ROI")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", packed + b"\x00" * (len(packed) % 2))
    ds.add_new(0x60004000, "LT", comment)


# --------------------------------------------------------------------------
# Re-reading: what was planted
# --------------------------------------------------------------------------

# Non-PN, non-UI, non-date attributes whose whole value identifies someone/something.
_IDENTIFYING_KEYWORDS = frozenset({
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "AccessionNumber",
    "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "AdmissionID", "RequestingService", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "MedicalRecordLocator", "PerformedStationName",
    "PerformedLocation",
})
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
# Private creators whose (string) values are all identity carriers.
_IDENTIFYING_CREATORS = frozenset({_ACME_CREATOR})
_MIN_TAINT_LEN = 3  # shorter ASCII identifiers do not flag free text (e.g. CJK 山田 does)


def planted_identifiers(dest: Path) -> set[str]:
    """Every identifying string value planted in the tree under dest.

    Computed by re-reading the files: person names (whole value, each ``=`` group
    and each family/given/middle part of two or more characters), IDs and issuers,
    dates (DA/DT), non-registered UIDs (except the implementation class UID),
    AE titles, institution/station/device/accession/procedure identifiers,
    all string values in the ``ACME PACS 1.0`` private block, and every free-text
    value or folder/file name that contains one of those identifiers.  Values
    that do not identify on their own (sex, age, times, technical parameters,
    registered UIDs) are left out to avoid false positives when scanning.
    """
    dest = Path(dest)
    core: set[str] = set()
    texts: set[str] = set()
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        texts.update(path.relative_to(dest).parts)
        ds = pydicom.dcmread(path)
        _collect(ds.file_meta, ["ascii"], core, texts)
        _collect(ds, _encodings(ds), core, texts)
    needles = [c.casefold() for c in core if len(c) >= _MIN_TAINT_LEN or not c.isascii()]
    for text in texts:
        folded = text.casefold()
        if any(n in folded for n in needles):
            core.add(text)
    return {v for v in core if v.strip()}


def _encodings(ds: Dataset) -> list[str]:
    return convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6"))


def _collect(ds: Dataset, encodings: list[str], core: set[str], texts: set[str]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _collect(item, encodings, core, texts)
            continue
        if elem.tag.is_private and not elem.tag.is_private_creator:
            creator = ds.get((elem.tag.group, elem.tag.element >> 8))
            if creator is not None and str(creator.value).strip() in _IDENTIFYING_CREATORS:
                core.update(_strings(elem, encodings))
            continue
        values = _strings(elem, encodings)
        if elem.VR == "PN":
            for value in values:
                core.update(_name_parts(value))
        elif elem.VR == "UI":
            if elem.tag != 0x00020012:  # ImplementationClassUID
                core.update(v for v in values if UID(v).name == v)  # unregistered only
        elif elem.VR in ("DA", "DT", "AE") or elem.keyword in _IDENTIFYING_KEYWORDS:
            core.update(values)
        elif elem.VR in _TEXT_VRS:
            texts.update(values)


def _strings(elem: DataElement, encodings: list[str]) -> list[str]:
    """String values of an element; raw (UN) bytes are decoded with the dataset charset."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        if elem.VR not in ("UN",):
            return []
        text = bytes(value).decode(encodings[0], errors="replace").rstrip("\x00 ")
        return [v.strip() for v in text.split("\\") if v.strip()]
    items: Iterable[object] = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, (str, PersonName)):
            s = str(v).strip()
            if s:
                out.append(s)
    return out


def _name_parts(value: str) -> Iterator[str]:
    yield value
    for group in value.split("="):
        if not group:
            continue
        yield group
        for part in group.split("^")[:3]:  # family, given, middle; not prefix/suffix
            part = part.strip()
            if len(part) >= 2:
                yield part


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the demo export tree to DEST."""
    parser = argparse.ArgumentParser(
        prog="python -m deidflow.demo",
        description="Write a small raw PACS-export demo tree with fake PHI.",
    )
    parser.add_argument("dest", type=Path, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed for IDs, dates and UIDs")
    args = parser.parse_args(argv)
    patients = make_demo_input(args.dest, seed=args.seed)
    n_studies = sum(len(p.studies) for p in patients)
    n_files = sum(len(s.files) for p in patients for s in p.studies)
    print(f"wrote {n_files} files, {n_studies} studies, {len(patients)} patients to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
