"""Clean free text (the PS3.15 "C" action on descriptors and structured content).

The text keeps its meaning ("T1 MPRAGE sag") while anything that looks like the patient's own
identifiers or a generic identifier (dates, long digit runs, phone numbers, e-mail addresses,
person-name strings) is replaced by ``*``.
"""
from __future__ import annotations

import re
from typing import Iterable

REDACTED = "*"
_GENERIC = re.compile(
    r"""
      [\w.+-]+@[\w-]+\.[\w.-]+                                  # e-mail
    | \b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}\b                       # dates 12.03.1961, 1961-03-12
    | \b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b  # YYYYMMDD
    | \+?\(?\d[\d ()/-]{6,}\d                                   # phone numbers, long digit runs
    | \b\d{5,}\b                                                # IDs
    | \b[A-Za-z]+\^[A-Za-z^ ]*                                  # DICOM PN strings
    """,
    re.VERBOSE,
)
_MIN_LEN = 3


def name_parts(values: Iterable[str]) -> set[str]:
    """Split person names and IDs into the parts worth searching for (≥ 3 characters)."""
    parts: set[str] = set()
    for v in values:
        if not v:
            continue
        v = str(v)
        for p in re.split(r"[\^=,\s]+", v):
            if len(p.strip(".")) >= _MIN_LEN:
                parts.add(p.strip("."))
        if len(v) >= _MIN_LEN:
            parts.add(v)
    return parts


def date_forms(da: str) -> set[str]:
    """Common textual forms of a DA date: 19610312, 1961-03-12, 12.03.1961, 03/12/1961, 12/03/1961."""
    if len(da) != 8 or not da.isdigit():
        return set()
    y, m, d = da[:4], da[4:6], da[6:]
    return {da, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}", f"{y}/{m}/{d}"}


def compile_identifiers(identifiers: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive pattern for the given identifier strings (longest first)."""
    ids = sorted({i for i in identifiers if i and len(i) >= _MIN_LEN}, key=len, reverse=True)
    if not ids:
        return None
    return re.compile("|".join(re.escape(i) for i in ids), re.IGNORECASE)


def clean_text(text: str, identifiers: re.Pattern | None = None) -> str:
    """Replace the patient's identifiers and generic identifier patterns in ``text`` by ``*``."""
    if identifiers is not None:
        text = identifiers.sub(REDACTED, text)
    return _GENERIC.sub(REDACTED, text)
