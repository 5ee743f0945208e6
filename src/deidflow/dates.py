"""Shift DICOM dates (DA, DT) by a whole number of days; times of day are kept."""
from __future__ import annotations

import datetime as _dt
import re

_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$")


class DateError(ValueError):
    """A value that is not a valid DICOM date."""


def shift_da(value: str, days: int) -> str:
    """Shift a DA value ``YYYYMMDD`` (also the ACR-NEMA ``YYYY.MM.DD`` form) by ``days``."""
    v = value.strip()
    if len(v) == 10 and v[4] == "." and v[7] == ".":
        v = v.replace(".", "")
    try:
        d = _dt.date(int(v[0:4]), int(v[4:6]), int(v[6:8])) if len(v) == 8 and v.isdigit() else None
    except ValueError:
        d = None
    if d is None:
        raise DateError("not a DA value")
    return (d + _dt.timedelta(days=days)).strftime("%Y%m%d")


def shift_dt(value: str, days: int) -> str:
    """Shift a DT value ``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]`` by ``days``, keeping its precision."""
    v = value.strip()
    m = _DT_RE.match(v)
    if not m:
        raise DateError("not a DT value")
    year, month, day, time, tz = m.groups()
    try:
        d = _dt.date(int(year), int(month or 1), int(day or 1)) + _dt.timedelta(days=days)
    except ValueError:
        raise DateError("not a DT value") from None
    out = f"{d.year:04d}"
    if month:
        out += f"{d.month:02d}"
    if day:
        out += f"{d.day:02d}"
    return out + (time or "") + (tz or "")


def shift(value: str, vr: str, days: int) -> str:
    """Shift each backslash-separated value of a DA or DT element."""
    fn = shift_da if vr == "DA" else shift_dt
    return "\\".join(fn(v, days) if v.strip() else v for v in value.split("\\"))
