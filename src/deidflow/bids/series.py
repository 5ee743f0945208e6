"""What the heuristic may know about a series: attributes of the *de-identified* DICOM.

Read with pydicom up to the pixel data from the first file of the series folder (the ``dicom``
stage's output); enhanced multi-frame objects keep most MR parameters in the shared or first
per-frame functional group, which are searched too.  Values are plain Python (str, float, int).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# keyword -> kind; times in DICOM are milliseconds and stay so here
ATTRIBUTES = {
    "Modality": str, "SeriesNumber": int, "SeriesDescription": str, "ProtocolName": str,
    "SequenceName": str, "PulseSequenceName": str, "ScanningSequence": str, "SequenceVariant": str,
    "ScanOptions": str, "ImageType": str, "MRAcquisitionType": str, "EchoTime": float,
    "EffectiveEchoTime": float, "RepetitionTime": float, "InversionTime": float, "FlipAngle": float,
    "Manufacturer": str, "BodyPartExamined": str, "NumberOfFrames": int, "NumberOfTemporalPositions": int,
    "PatientSex": str, "PatientAge": str, "ContrastBolusAgent": str,
    "SOPClassUID": str, "PhotometricInterpretation": str,   # face selection (deidflow.face.select)
    # for sessions.tsv / scans.tsv (the working copy's shifted dates; never released as such)
    "AcquisitionDate": str, "SeriesDate": str, "StudyDate": str, "AcquisitionDateTime": str,
    "AcquisitionTime": str, "SeriesTime": str,
}
_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


@dataclass
class SeriesInfo:
    """One series folder of the de-identified DICOM (``ses-XXXXXX/<MOD><nnn>-<key>``)."""

    session: str
    label: str  # the series folder name (keyed, no original value)
    path: Path
    n_files: int
    attrs: dict[str, Any] = field(default_factory=dict)
    plane: str = ""  # "sag", "cor", "tra" or "" (from ImageOrientationPatient)

    @property
    def relpath(self) -> str:
        return f"{self.session}/{self.label}"

    def get(self, key: str, default=None):
        return self.attrs.get(key, default)


def read_series(session_dir: Path, label: str) -> SeriesInfo:
    """Attributes of the series folder ``session_dir/label``; raises ``ValueError`` when its first
    file cannot be read."""
    folder = Path(session_dir) / label
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")
    info = SeriesInfo(Path(session_dir).name, label, folder, len(files))
    if not files:
        return info
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types; the file is our own output
        raise ValueError(f"cannot read {label}: {type(exc).__name__}") from None
    for kw, kind in ATTRIBUTES.items():
        value = _find(ds, kw)
        if value is None:
            continue
        try:
            info.attrs[kw] = _convert(value, kind)
        except (TypeError, ValueError):
            continue
    if "EchoTime" not in info.attrs and "EffectiveEchoTime" in info.attrs:
        info.attrs["EchoTime"] = info.attrs["EffectiveEchoTime"]
    if "SequenceName" not in info.attrs and "PulseSequenceName" in info.attrs:
        info.attrs["SequenceName"] = info.attrs["PulseSequenceName"]
    info.plane = _plane(_find(ds, "ImageOrientationPatient"))
    return info


def list_series(subject_dir: Path) -> list[SeriesInfo]:
    """Every series folder below ``subject_dir`` (``ses-*/<series>``), in name order."""
    out = []
    for ses in sorted(p for p in Path(subject_dir).iterdir() if p.is_dir()):
        for ser in sorted(p for p in ses.iterdir() if p.is_dir()):
            out.append(read_series(ses, ser.name))
    return out


def _find(ds: Dataset, keyword: str):
    """``keyword`` at the top level, else in the shared / first per-frame functional group."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for group in _GROUPS:
        seq = ds.get(group)
        if not seq:
            continue
        for macro in seq[0]:
            if macro.VR != "SQ" or not macro.value:
                continue
            item = macro.value[0]
            if keyword in item and item[keyword].value not in (None, ""):
                return item[keyword].value
    return None


def _convert(value, kind):
    if isinstance(value, (list, tuple, MultiValue)):
        if kind is str:
            return "\\".join(str(v) for v in value)
        value = value[0]
    if kind is str:
        return str(value).strip()
    return kind(float(value)) if kind is int else float(value)


def _plane(iop) -> str:
    try:
        r = [float(v) for v in iop[:3]]
        c = [float(v) for v in iop[3:6]]
    except (TypeError, ValueError, IndexError):
        return ""
    n = [abs(r[1] * c[2] - r[2] * c[1]), abs(r[2] * c[0] - r[0] * c[2]), abs(r[0] * c[1] - r[1] * c[0])]
    return ("sag", "cor", "tra")[n.index(max(n))]
