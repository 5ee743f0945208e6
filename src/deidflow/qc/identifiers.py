"""Original identifying values seen while de-identifying: collected by the stages, kept in the
restricted folder, searched for by the leak scan (:mod:`deidflow.qc.leakscan`).

A stage writes one file per subject, ``restricted/work/<unit>/identifiers/<stage>/<subject>.json``::

    {"subject": "sub-X", "stage": "dicom", "values": [["name", "PatientName", "DOE^JOHN"], ...]}

Each value is ``[kind, field, value]``; ``kind`` is one of :data:`KINDS` and decides how the value is
searched (names are split into parts, dates are searched in their common textual forms, …).
The DICOM engine fills an :class:`IdentifierCollector` while it scrubs (only values the profile
removes or replaces, so a value the profile keeps is never reported as a leak); the non-DICOM
formats return ``ScrubResult.identifiers`` (field -> value), which :func:`from_fields` classifies.
Original file and folder names are read from the unit's manifest at scan time.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir

KINDS = ("name", "date", "datetime", "time", "uid", "id", "path")
IDENTIFIERS_DIR = "identifiers"
# Text attributes (besides every PN, DA, DT, TM and UI) whose removed or replaced values identify a
# person, a place or an encounter.  Descriptions and comments are not listed: what identifies in
# them is a name, ID or date, which is searched for in its own right.
ID_KEYWORDS = frozenset((
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
    "PatientTelecomInformation", "MedicalRecordLocator", "MilitaryRank", "BranchOfService",
    "RegionOfResidence", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "StationName", "StationAETitle", "PerformedStationAETitle", "ScheduledStationAETitle",
    "PerformedStationName", "ScheduledStationName", "PerformedLocation", "ScheduledProcedureStepLocation",
    "DeviceSerialNumber", "DeviceUID", "DetectorID", "GantryID", "AccessionNumber", "StudyID",
    "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequestRetired", "FillerOrderNumberImagingServiceRequestRetired",
    "AdmissionID", "IssuerOfAdmissionID", "ServiceEpisodeID", "RequestingService",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PersonAddress",
    "PersonTelephoneNumbers", "VerifyingOrganization", "ContentCreatorName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialSiteName", "ClinicalTrialSiteID",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "RetrieveAETitle", "SourceApplicationEntityTitle", "IssuerOfTheContainerIdentifier",
    "ContainerIdentifier", "SpecimenIdentifier",
))
_TEXT_VRS = frozenset(("LO", "SH", "ST", "LT", "UT", "UC", "AE", "CS"))
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*)){3,}")
_DATE = re.compile(r"(?:1[89]|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])")
_PRIVATE_MAX = 64  # longer private values are blobs or prose, not identifiers
_NOT_REGISTERED = ("ClassUID", "SyntaxUID")


@lru_cache(maxsize=8192)
def element_kind(tag: int, vr: str | None) -> tuple[str | None, str]:
    """(kind, field) of an element whose value the profile removes or replaces; kind None when its
    values are not identifiers.  Private elements of an unknown or text VR get kind ``private``
    (their values are classified one by one, see :func:`classify_private`)."""
    from ..dicom import _dict_info, _tag_label
    if (tag >> 16) & 1:
        field = _tag_label(tag)
        if vr == "PN":
            return "name", field
        if vr in ("DA", "DT", "TM", "UI"):
            return {"DA": "date", "DT": "datetime", "TM": "time", "UI": "uid"}[vr], field
        if vr in (None, "UN") or vr in _TEXT_VRS:
            return "private", field
        return None, field
    info = _dict_info(tag)
    if info is None:
        return ("private" if vr in (None, "UN") or vr in _TEXT_VRS else None), _tag_label(tag)
    dict_vr, keyword = info
    vr = vr if vr not in (None, "UN") else dict_vr.split(" or ")[0]
    keyword = keyword or _tag_label(tag)
    if vr == "PN":
        return "name", keyword
    if vr == "DA":
        return "date", keyword
    if vr == "DT":
        return "datetime", keyword
    if vr == "TM":
        return "time", keyword
    if vr == "UI":
        return (None if keyword.endswith(_NOT_REGISTERED) else "uid"), keyword
    if vr in _TEXT_VRS and keyword in ID_KEYWORDS:
        return "id", keyword
    return None, keyword


def classify_private(value: str) -> str | None:
    """Kind of one value of a removed private element, or None when it does not look like an
    identifier (private blocks hold mostly technical values that also appear in kept attributes):
    a person name (has ``^``), a UID, a date, or an ID (no white space, 6–64 characters, letters
    and digits, or at least 8 digits)."""
    v = value.strip()
    if not v or len(v) > _PRIVATE_MAX or not v.isprintable():
        return None
    if "^" in v and any(c.isalpha() for c in v):
        return "name"
    if _UID.fullmatch(v):
        return "uid"
    if _DATE.fullmatch(v):
        return "date"
    if any(c.isspace() for c in v) or len(v) < 6:
        return None
    has_digit = any(c.isdigit() for c in v)
    if has_digit and any(c.isalpha() for c in v):
        return "id"
    if v.isdigit() and len(v) >= 8:
        return "id"
    return None


def _registered(uid: str) -> bool:
    from pydicom.uid import UID_dictionary
    return uid in UID_dictionary


def _strings(value) -> list[str]:
    """The text values of a decoded element value (multi-values split)."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [s for v in value for s in _strings(v)]
    s = str(value).strip("\x00 ")
    return [s] if s else []


class IdentifierCollector:
    """The identifying values of one subject, as the scrubber meets them (restricted).

    Cheap enough to run inside the streaming engine: raw values are decoded only the first time a
    (tag, bytes) pair is seen, and only for tags whose values can identify."""

    __slots__ = ("values", "_seen")

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], str] = {}  # (kind, value) -> field it was first seen in
        self._seen: set = set()

    def add(self, kind: str, field: str, value: str) -> None:
        value = value.strip("\x00 \t\r\n")
        if value and not (kind == "uid" and _registered(value)):
            self.values.setdefault((kind, value), field)

    def element(self, tag: int, vr: str | None, value) -> None:
        """A decoded value (pydicom path) that the profile is about to remove or replace."""
        kind, field = element_kind(tag, vr)
        if kind is None:
            return
        for s in _strings(value):
            self._add_value(kind, field, s)

    def _add_value(self, kind: str, field: str, value: str) -> None:
        """One value of an element of ``kind``; a private value only when it looks identifying."""
        if kind == "private":
            kind = classify_private(value)
            if kind is None:
                return
        self.add(kind, field, value)

    def dataset(self, ds) -> None:
        """Every identifying value inside a removed sequence item (any depth)."""
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    self.dataset(item)
            elif elem.tag & 0xFFFF and not (elem.tag >> 16 == 0x0002):
                try:
                    self.element(int(elem.tag), elem.VR, elem.value)
                except Exception:  # an undecodable value cannot be searched for either
                    continue

    def file_meta(self, meta) -> None:
        """The AE titles and instance UIDs of a file meta group that is rebuilt."""
        try:
            for elem in meta:
                kind = {"AE": "id", "UI": "uid"}.get(elem.VR)
                if kind and (kind == "id" or elem.keyword == "MediaStorageSOPInstanceUID"):
                    for s in _strings(elem.value):
                        self.add(kind, elem.keyword, s)
        except Exception:
            pass

    def raw(self, tag: int, vr: str | None, buf, start: int, end: int, encodings) -> None:
        """An encoded value (streaming path) that the profile removes or replaces."""
        if end <= start:
            return
        kind, field = element_kind(tag, vr)
        if kind is None or (kind == "private" and end - start > _PRIVATE_MAX):
            return
        data = bytes(buf[start:end])
        key = (tag, data)
        if key in self._seen:
            return
        self._seen.add(key)
        if data.isascii():
            text = data.decode("ascii")
        else:
            from pydicom.charset import decode_bytes
            try:
                text = decode_bytes(data, encodings, {0x5C, 0x5E, 0x3D} if kind == "name" else {0x5C})
            except Exception:
                text = data.decode("latin-1")
        for s in text.split("\\"):
            s = s.strip("\x00 ")
            if s:
                self._add_value(kind, field, s)

    def entries(self) -> list[list[str]]:
        return sorted([kind, field, value] for (kind, value), field in self.values.items())


def from_fields(fields: Mapping[str, str]) -> list[list[str]]:
    """``[kind, field, value]`` entries for a non-DICOM ScrubResult's ``identifiers`` (field -> value):
    the kind is guessed from the field name and the value."""
    out = []
    for field, value in sorted(fields.items()):
        value = str(value).strip("\x00 ")
        if not value:
            continue
        low = field.lower()
        if "name" in low and ("patient" in low or "physician" in low or "operator" in low or "^" in value):
            kind = "name"
        elif _UID.fullmatch(value) or low.endswith("uid"):
            kind = "uid"
        elif _DATE.fullmatch(value) or "date" in low:
            kind = "date"
        else:
            kind = "id"
        out.append([kind, field, value])
    return out


def path(restricted: Path, unit: str, stage: str, subject: str) -> Path:
    return Path(restricted) / "work" / unit / IDENTIFIERS_DIR / stage / f"{subject}.json"


def write(restricted: Path, unit: str, stage: str, subject: str, entries: Iterable[Iterable[str]]) -> Path:
    """Write one subject's identifiers for ``stage`` (restricted folder, mode 0600)."""
    target = path(restricted, unit, stage, subject)
    make_restricted_dir(target.parent.parent.parent)
    make_restricted_dir(target.parent.parent)
    make_restricted_dir(target.parent)
    values = sorted({tuple(e) for e in entries if len(e) == 3 and e[0] in KINDS and e[2]})
    text = json.dumps({"subject": subject, "stage": stage, "values": [list(v) for v in values]},
                      ensure_ascii=False, indent=0) + "\n"
    atomic_write_text(target, text, RESTRICTED_FILE_MODE)
    return target


def read_subject(restricted: Path, unit: str, subject: str) -> list[tuple[str, str, str]]:
    """Every stage's identifiers of ``subject`` in job unit ``unit``."""
    base = Path(restricted) / "work" / unit / IDENTIFIERS_DIR
    out: list[tuple[str, str, str]] = []
    for f in sorted(base.glob(f"*/{subject}.json")):
        out += [tuple(v) for v in json.loads(f.read_text(encoding="utf-8"))["values"]]
    return out
