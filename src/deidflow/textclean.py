"""Clean free text (the PS3.15 "C" action on descriptors and structured content).

The text keeps its meaning ("T1 MPRAGE sag") while anything that looks like a generic identifier
(dates, long digit runs, phone numbers, e-mail addresses, person-name strings) is replaced by ``*``;
the patient's own identifiers are removed by the subject's identifier model first.
"""
from __future__ import annotations

import re

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
# A decimal number standing alone (a matrix entry, a step, an origin: "-7.16717377411551"); a
# date's dots ("23.04.1961") and a version's ("1.2.3") make no such number.
_DECIMAL = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?:[eE][-+]?\d+)?(?![\w.])")


def restore_decimals(original: str, cleaned: str) -> str:
    """``cleaned`` (a same-length cleaning of ``original``) with the decimal numbers of
    ``original`` and the white space between them put back: the generic digit patterns take a
    fraction's long digit runs, and a row of numbers, for IDs and phone numbers, which in technical
    text (an embedded transform's matrix) destroys the values.  The matcher never finds an
    identifier inside a decimal number, so nothing it removed comes back."""
    if len(original) != len(cleaned) or original == cleaned:
        return cleaned
    out = list(cleaned)
    for m in _DECIMAL.finditer(original):
        out[m.start():m.end()] = original[m.start():m.end()]
    for i, c in enumerate(original):
        if c.isspace():
            out[i] = c
    return "".join(out)


def clean_text(text: str) -> str:
    """Replace generic identifier patterns in ``text`` by ``*`` (the patient's own identifiers are
    removed first by the subject's identifier model, :class:`deidflow.qc.identifiers.IdentifierModel`)."""
    return _GENERIC.sub(REDACTED, text)
