"""``sessions.tsv`` and ``scans.tsv`` of one subject: longitudinal order without real dates.

Dates come from the conversion working copy, whose dates are the release's shifted dates
(the subject's keyed offset, :mod:`.workcopy`) or, with ``retain_long_full_dates``, the original
ones the profile releases anyway.  Never an original date otherwise:

* ``sub-X_sessions.tsv``: ``session_id`` and ``days_from_first_session`` (whole days from the
  subject's earliest session; an interval, no date), always.
* ``sub-X_ses-Y_scans.tsv``: ``filename`` of every BIDS image of the session and, only when the
  profile keeps dates (``retain_long_modified_dates``: shifted; ``retain_long_full_dates``),
  ``acq_time`` (``YYYY-MM-DDThh:mm:ss``); "n/a" where the DICOM has no date.
"""
from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, Iterable, Mapping

from .naming import Image

DATE_OPTIONS = ("retain_long_modified_dates", "retain_long_full_dates")
SESSIONS_JSON = {
    "session_id": {"Description": "Keyed pseudonym of the session (deidflow)"},
    "days_from_first_session": {
        "Description": "Whole days between this session and the participant's first session, computed from the "
                       "de-identified (shifted) acquisition dates; n/a when the DICOM has no acquisition date",
        "Units": "day"},
}
SCANS_JSON = {
    "filename": {"Description": "Image file, relative to the session folder"},
    "acq_time": {"Description": "Acquisition date and time of the first volume, with the dates shifted by the "
                                "participant's keyed offset (retain_long_modified_dates) as in the released DICOM"},
}


def acquisition_datetime(attrs: Mapping[str, Any], sidecar: Mapping[str, Any]) -> datetime | None:
    """The acquisition date and time of an image from its series attributes (working copy: shifted
    dates) and dcm2niix's sidecar (the earliest AcquisitionTime of the series)."""
    day = _date(attrs.get("AcquisitionDate") or attrs.get("SeriesDate") or attrs.get("StudyDate")
                or str(attrs.get("AcquisitionDateTime") or "")[:8])
    if day is None:
        return None
    t = _time(str(sidecar.get("AcquisitionTime") or "")) or _time(str(attrs.get("AcquisitionTime") or "")) \
        or _time(str(attrs.get("SeriesTime") or ""))
    return datetime.combine(day, t) if t is not None else datetime.combine(day, datetime.min.time())


def subject_tables(subject: str, images: Iterable[Image], when: Mapping[int, datetime | None],
                   options: Iterable[str]) -> dict[str, str]:
    """Release path (relative to the release root) -> text of the subject's sessions.tsv, its
    sidecar and each session's scans.tsv (+ sidecar).  ``when`` maps ``id(image)`` to its
    acquisition datetime."""
    with_time = any(o in DATE_OPTIONS for o in options)
    bids = [im for im in images if im.target.datatype != "unsorted"]
    sessions: dict[str, list[Image]] = {}
    for im in bids:
        sessions.setdefault(im.series.session, []).append(im)
    if not sessions:
        return {}
    first_day = {ses: min((when[id(im)].date() for im in ims if when.get(id(im))), default=None)
                 for ses, ims in sessions.items()}
    known = [d for d in first_day.values() if d is not None]
    origin = min(known) if known else None
    rows = ["session_id\tdays_from_first_session"]
    for ses in sorted(sessions):
        d = first_day[ses]
        rows.append(f"{ses}\t{(d - origin).days if d is not None and origin is not None else 'n/a'}")
    out = {f"{subject}/{subject}_sessions.tsv": "\n".join(rows) + "\n",
           f"{subject}/{subject}_sessions.json": _json(SESSIONS_JSON)}
    for ses, ims in sorted(sessions.items()):
        head = "filename\tacq_time" if with_time else "filename"
        lines = [head]
        for im in sorted(ims, key=lambda i: i.stem):
            name = im.stem.split("/", 2)[2] + ".nii.gz"  # datatype/file, relative to the session
            if with_time:
                t = when.get(id(im))
                lines.append(f"{name}\t{t.strftime('%Y-%m-%dT%H:%M:%S') if t else 'n/a'}")
            else:
                lines.append(name)
        base = f"{subject}/{ses}/{subject}_{ses}_scans"
        out[base + ".tsv"] = "\n".join(lines) + "\n"
        if with_time:
            out[base + ".json"] = _json(SCANS_JSON)
    return out


def _json(obj: Mapping) -> str:
    import json
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _date(value: Any) -> date | None:
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", str(value or "").strip())
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def _time(value: str):
    """hh:mm:ss(.f) (dcm2niix) or hhmmss(.f) (DICOM) -> time, else None."""
    m = re.fullmatch(r"(\d{2}):?(\d{2}):?(\d{2})(?:\.\d*)?", value.strip())
    if not m:
        return None
    try:
        return datetime.strptime("".join(m.groups()), "%H%M%S").time()
    except ValueError:
        return None
