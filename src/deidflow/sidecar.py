"""De-identify a BIDS sidecar (JSON) the way the DICOM profile de-identifies its header.

Used for the sidecars dcm2niix writes in the ``convert`` stage and for BIDS JSON found in the
input.  The rules are an **allow-list**: ``data/bids_sidecar_fields.tsv`` names every field
deidflow knows and its class; a field that is not listed is removed.  Classes:

``keep``            acquisition parameter, kept (a string is still cleaned of the patient's own
                    identifiers, never of generic patterns: ``ConsistencyInfo`` is a digit run)
``descriptor``      free text (SeriesDescription, ProtocolName, ImageComments, …): removed, or
                    cleaned with ``clean_descriptors`` — the rule of the DICOM descriptors
``label``           short labels BIDS needs (TaskName): kept, always cleaned
``text``            free text by the BIDS definition (BodyPartDetails, DeepLearningDetails,
                    Anaesthesia, SampleStaining …): kept, always cleaned like a label (identifiers
                    and generic patterns: another patient's birth date or MRN in a note too)
``device``          kept with ``retain_device_identity``, else removed
``institution``     kept with ``retain_institution_identity``, else removed
``characteristics`` kept with ``retain_patient_characteristics``, else removed
``age``             as ``characteristics``, in years, ages of 90 and over written as 90 (HIPAA)
``datetime``/``date`` shifted by the patient's offset with ``retain_long_modified_dates``, kept with
                    ``retain_long_full_dates``, else removed (unparseable values are removed)
``time``            time of day (``AcquisitionTime``): kept with either longitudinal option — dates
                    move by whole days, times of day are kept, as in DICOM — else removed
``uid``             kept with ``retain_uids``, else replaced by the keyed UID (``uid`` mapper),
                    removed when no mapper is given
``remove``          identity (names, IDs, birth date, …): always removed

Actions reported per field use the DICOM audit codes: ``K`` kept, ``X`` removed, ``C`` cleaned or
shifted, ``U`` UID replaced.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable, Mapping

from . import dates, textclean
from .qc.identifiers import IdentifierModel

FIELDS_TABLE = "bids_sidecar_fields.tsv"
CLASSES = ("keep", "descriptor", "label", "text", "device", "institution", "characteristics", "age",
           "datetime", "date", "time", "uid", "remove")
AGE_CAP_YEARS = 90  # HIPAA Safe Harbor: ages over 89 are aggregated into "90 or older"
# Sidecar fields whose values are the patient's own identifiers (used to clean kept text).
IDENTITY_FIELDS = ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID",
                   "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                   "DeviceSerialNumber", "ReferringPhysicianName", "OperatorsName", "PerformingPhysicianName",
                   "PatientAddress")
# Placeholder values scanners and anonymisers write; never treated as identifiers ("NONE" is an
# ImageType value as well as a typical InstitutionalDepartmentName).
PLACEHOLDERS = frozenset({"none", "unknown", "anonymized", "anonymous", "anonymised", "n/a", "na", "null",
                          "nil", "default", "removed", "deidentified", "0", "-"})
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})((?:T| )[0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?$")
_AS = re.compile(r"^(\d{1,3})([DWMY])$")


@lru_cache(maxsize=1)
def field_classes() -> dict[str, str]:
    """The allow-list: field name -> class (from ``data/bids_sidecar_fields.tsv``)."""
    text = resources.files("deidflow").joinpath("data", FIELDS_TABLE).read_text(encoding="utf-8")
    rows = csv.DictReader(io.StringIO("".join(l for l in text.splitlines(True) if not l.startswith("#"))),
                          delimiter="\t")
    out: dict[str, str] = {}
    for row in rows:
        if row["class"] not in CLASSES:
            raise ValueError(f"{FIELDS_TABLE}: unknown class {row['class']!r} for {row['field']}")
        out[row["field"]] = row["class"]
    return out


def scrub_sidecar(data: Mapping[str, Any], *, options: Iterable[str] = (),
                  date_offset_days: int | None = None,
                  uid: Callable[[str], str] | None = None,
                  identifiers: Iterable[str] = (),
                  extra: Mapping[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """De-identify one sidecar.

    ``options`` are the PS3.15 option names of the profile (``settings["options"]``);
    ``date_offset_days`` the patient's day shift (needed to shift dates with
    ``retain_long_modified_dates``; without it dates are removed); ``uid`` maps an original UID to
    its keyed replacement (``Pseudonymizer.uid``); ``identifiers`` are extra identifying strings to
    clean out of kept text (the sidecar's own PatientName, PatientID, … are always used);
    ``extra`` adds or overrides field classes (field -> class).

    Returns the scrubbed sidecar (input order kept) and the action per input field.
    """
    opts = frozenset(options)
    classes = field_classes()
    if extra:
        bad = {c for c in extra.values() if c not in CLASSES}
        if bad:
            raise ValueError(f"unknown sidecar field class(es): {sorted(bad)}")
        classes = {**classes, **extra}
    model = _identifier_model(data, identifiers)
    out: dict[str, Any] = {}
    actions: dict[str, str] = {}
    for name, value in data.items():
        cls = classes.get(name, "remove")
        code, new = _apply(cls, value, opts, date_offset_days, uid, model)
        actions[name] = code
        if code != "X":
            out[name] = new
    return out, actions


def sidecar_text(data: Mapping[str, Any]) -> str:
    """Deterministic JSON text of a sidecar (2-space indent, UTF-8, trailing newline)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def age_years(value: Any) -> float | None:
    """Age in years from a number or a DICOM AS string (``031Y``, ``006M``, ``020W``, ``010D``);
    None when it cannot be read."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    m = _AS.match(str(value).strip().upper())
    if not m:
        try:
            v = float(str(value).strip())
        except ValueError:
            return None
        return v if v >= 0 else None
    n, unit = int(m.group(1)), m.group(2)
    return {"Y": n, "M": n / 12, "W": n * 7 / 365.25, "D": n / 365.25}[unit]


def over_age_cap(value: Any) -> bool:
    """Whether an age (a number, a DICOM AS string, or text with the number first: ``92 years``,
    ``Age: 92``) is 90 years or more, which HIPAA Safe Harbor counts as an identifier: every
    format writes it as 90 in its own form."""
    years = age_years(value)
    if years is None and not isinstance(value, (int, float)):
        lead = re.search(r"\d+(?:\.\d+)?", str(value))
        years = float(lead.group()) if lead else None
    return years is not None and years >= AGE_CAP_YEARS


def capped_age(value: Any) -> int | float | None:
    """Age in years for release: whole years below 1 year kept to 2 decimals, 90 and over → 90."""
    years = age_years(value)
    if years is None:
        return None
    if years >= AGE_CAP_YEARS:
        return AGE_CAP_YEARS
    return int(years) if years >= 1 else round(years, 2)


def shift_date_value(value: str, days: int) -> str:
    """Shift an ISO (``2022-07-11``, ``2022-07-11T12:05:17.04``) or DICOM (DA/DT) date by ``days``;
    the time of day and the format are kept.  Raises :class:`dates.DateError` when not a date."""
    v = str(value).strip()
    m = _ISO_DATE.match(v)
    if m:
        try:
            d = _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3))) + _dt.timedelta(days=days)
        except ValueError:
            raise dates.DateError("not a date") from None
        return d.isoformat() + (m.group(4) or "")
    if v.isdigit() and len(v) == 8:
        return dates.shift_da(v, days)
    return dates.shift_dt(v, days)


# -- internals ------------------------------------------------------------------------------------
def _apply(cls: str, value: Any, opts: frozenset[str], offset: int | None,
           uid: Callable[[str], str] | None, model: IdentifierModel) -> tuple[str, Any]:
    if cls == "keep":  # technical strings: swept of the subject's identifiers, no generic patterns
        cleaned = _clean_values(value, model, generic=False)
        return ("K", value) if cleaned == value else ("C", cleaned)
    if cls == "descriptor":
        if "clean_descriptors" not in opts:
            return "X", None
        return "C", _clean_values(value, model, generic=True)
    if cls in ("label", "text"):
        cleaned = _clean_values(value, model, generic=True)
        return ("K", value) if cleaned == value else ("C", cleaned)
    if cls in ("device", "institution", "characteristics"):
        option = {"device": "retain_device_identity", "institution": "retain_institution_identity",
                  "characteristics": "retain_patient_characteristics"}[cls]
        return ("K", value) if option in opts else ("X", None)
    if cls == "age":
        if "retain_patient_characteristics" not in opts:
            return "X", None
        age = capped_age(value)
        if age is None:
            return "X", None
        return ("K", value) if age == value else ("C", age)
    if cls in ("datetime", "date"):
        if "retain_long_full_dates" in opts:
            return "K", value
        if "retain_long_modified_dates" in opts and offset is not None and isinstance(value, str):
            try:
                return "C", shift_date_value(value, offset)
            except dates.DateError:
                return "X", None
        return "X", None
    if cls == "time":
        if opts & {"retain_long_full_dates", "retain_long_modified_dates"}:
            return "K", value
        return "X", None
    if cls == "uid":
        if "retain_uids" in opts:
            return "K", value
        if uid is None or not isinstance(value, str) or not value.strip():
            return "X", None
        return "U", uid(value.strip())
    return "X", None  # "remove" and anything not on the allow-list


def _clean_values(value: Any, model: IdentifierModel, *, generic: bool) -> Any:
    """``value`` with the subject's identifiers replaced in every string it holds (lists and
    objects followed); with ``generic`` also generic identifier patterns (dates, long numbers).
    An object's keys are labels, never acquisition values: they are always cleaned of both."""
    if isinstance(value, str):
        value = model.redact_text(value)
        return textclean.clean_text(value) if generic else value
    if isinstance(value, list):
        return [_clean_values(v, model, generic=generic) for v in value]
    if isinstance(value, dict):
        return {_clean_values(str(k), model, generic=True): _clean_values(v, model, generic=generic)
                for k, v in value.items()}
    return value


def _identifier_model(data: Mapping[str, Any], extra: Iterable[str]) -> IdentifierModel:
    """The subject's identifier model from the sidecar's identity fields (as the DICOM attributes of
    the same names), its birth date and ``extra`` values (the inventory's)."""
    model = IdentifierModel()
    for v in extra:
        if v and str(v).strip().lower() not in PLACEHOLDERS:
            model.add_guess("known", str(v))
    for name in (*IDENTITY_FIELDS, "PatientBirthDate"):
        v = data.get(name)
        for x in (v if isinstance(v, list) else [v]):
            if x not in (None, "") and str(x).strip().lower() not in PLACEHOLDERS:
                model.add_keyword(name, str(x).strip())
    return model
