"""Is a piece of OCR text identifying?  The ``identifiers_only`` redaction policy.

A box is redacted when its text contains one of the patient's own identifiers, taken from the
original header (name parts, IDs, accession number, birth and study dates in the common written
forms, age, institution and staff names), or a generic identifier pattern (dates, times with
seconds, runs of five or more digits).  OCR confuses letters and digits (``D0B``, ``1D``,
``19930ct25``), so both sides are folded (O→0, I/L→1, S→5, B→8, Z→2, G→6) and compared with
a small edit-distance allowance.  Anything else, such as side markers (``L``, ``R``), probe and
caliper readings (``1.06 cm``), stays.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..qc.identifiers import date_forms

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
NAME_SOURCES = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                "NameOfPhysiciansReadingStudy", "RequestingPhysician", "PhysiciansOfRecord",
                "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "PatientAddress")
ID_SOURCES = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "IssuerOfPatientID",
              "PatientTelephoneNumbers", "MedicalRecordLocator")
DATE_SOURCES = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
AGE_SOURCE = "PatientAge"
HEADER_KEYWORDS = NAME_SOURCES + ID_SOURCES + DATE_SOURCES + (AGE_SOURCE,)

_FOLD = str.maketrans({"O": "0", "Q": "0", "D": "0", "I": "1", "L": "1", "|": "1", "!": "1",
                       "Z": "2", "S": "5", "G": "6", "B": "8"})
_NONALNUM = re.compile(r"[^0-9A-Z]+")
_MONTH_RE = "|".join(MONTHS) + "|0CT"
_GENERIC = [
    ("date", re.compile(r"\d{1,4}\s*[/.\-]\s*\d{1,2}\s*[/.\-]\s*\d{1,4}")),
    ("date", re.compile(rf"\d{{1,4}}\s*[-/.]?\s*(?:{_MONTH_RE})[A-Z]*\.?\s*[-/.,]?\s*\d{{2,4}}")),
    ("date", re.compile(rf"(?:{_MONTH_RE})[A-Z]*\.?\s*\d{{1,2}}\s*,?\s*\d{{4}}")),
    ("date", re.compile(r"(?<!\d)(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)")),
    ("time", re.compile(r"\d{1,2}:\d{2}:\d{2}")),
    ("digits", re.compile(r"\d{5,}")),
]
# letters OCR reads for digits next to digits
_DIGITISH = str.maketrans({"O": "0", "o": "0", "D": "0", "Q": "0", "I": "1", "l": "1", "|": "1", "Z": "2",
                           "S": "5", "B": "8"})
_DIGIT_CONTEXT = re.compile(r"(?<=\d)[OoDQIl|ZSB]+|[OoDQIl|ZSB]+(?=\d)")
_MIN_PART = 3


def fold(text: str) -> str:
    """Upper-case, letters and digits only, confusable characters folded together."""
    return _NONALNUM.sub("", text.upper()).translate(_FOLD)


@dataclass
class Identifiers:
    """The patient's own identifiers, folded for matching (built from the original header)."""

    tokens: list[str] = field(default_factory=list)  # folded, longest first
    ages: frozenset[str] = frozenset()  # whole-number ages, matched as separate numbers

    @classmethod
    def from_values(cls, names: Iterable[str] = (), ids: Iterable[str] = (), dates: Iterable[str] = (),
                    age: str = "") -> "Identifiers":
        raw: set[str] = set()
        for v in names:
            parts = [p for p in re.split(r"[\^=,\s/\\]+", v) if p]
            raw.update(p for p in parts if len(p) >= _MIN_PART)
            if len(parts) > 1:
                raw.add(" ".join(parts))
        for v in ids:
            if len(v.strip()) >= _MIN_PART:
                raw.add(v.strip())
        for d in dates:
            raw.update(date_forms(d))
        tokens = sorted({fold(t) for t in raw if len(fold(t)) >= _MIN_PART}, key=len, reverse=True)
        ages = set()
        m = re.fullmatch(r"0*(\d{1,3})([YMWD]?)", age.strip().upper())
        if m and (m.group(2) in ("", "Y")):
            ages.add(m.group(1))
        return cls(tokens, frozenset(ages))

    @classmethod
    def from_dataset(cls, ds: Dataset | None) -> "Identifiers":
        if ds is None:
            return cls()

        def values(keywords) -> list[str]:
            out = []
            for kw in keywords:
                try:
                    v = ds.get(kw)
                except Exception:
                    continue
                if v is None or v == "":
                    continue
                out.extend(str(x) for x in (v if isinstance(v, (list, tuple, MultiValue)) else [v]))
            return out
        age = values([AGE_SOURCE])
        return cls.from_values(values(NAME_SOURCES), values(ID_SOURCES), values(DATE_SOURCES), age[0] if age else "")


def _within(pattern: str, text: str, k: int) -> bool:
    """Whether ``pattern`` occurs in ``text`` with at most ``k`` edits (Sellers' algorithm)."""
    if k == 0 or len(pattern) <= k:
        return pattern in text
    m = len(pattern)
    prev = list(range(m + 1))
    for ch in text:
        cur = [0] * (m + 1)
        for i in range(1, m + 1):
            cost = 0 if pattern[i - 1] == ch else 1
            cur[i] = min(prev[i - 1] + cost, prev[i] + 1, cur[i - 1] + 1)
        if cur[m] <= k:
            return True
        prev = cur
    return False


def allowance(n: int) -> int:
    """Edits tolerated for a folded identifier of ``n`` characters."""
    return 0 if n < 5 else 1 if n < 9 else 2


def match(text: str, ids: Identifiers) -> str | None:
    """The rule that makes ``text`` identifying (``patient:<kind>`` or ``generic:<kind>``), or None."""
    if not text:
        return None
    folded = fold(text)
    for t in ids.tokens:
        if _within(t, folded, allowance(len(t))):
            return "patient:identifier"
    if ids.ages:
        for n in re.findall(r"(?<!\d)\d{1,3}(?!\d)", text.translate(_DIGITISH)):
            if n.lstrip("0") in ids.ages:
                return "patient:age"
    upper = _DIGIT_CONTEXT.sub(lambda m: m.group().translate(_DIGITISH), text).upper()
    for name, rx in _GENERIC:
        if rx.search(upper):
            return f"generic:{name}"
    return None
