"""Series → BIDS datatype, suffix and entities: ordered rules, the user's first.

The built-in rules are data (``data/bids_heuristic.yaml``, explained in docs/bids.md); a user's
``bids.mapping`` has the same format and is tried first, like heudiconv/dcm2bids users expect.
Rules see the attributes of the *de-identified* DICOM (:mod:`.series`) plus what dcm2niix found
for each image it wrote (volumes, b-values, echo, phase).  No rule matching means
``sourcedata/unsorted``.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .dcm2niix import Output
from .series import SeriesInfo

DATATYPES = ("anat", "func", "dwi", "fmap", "perf", "pet", "ct", "unsorted")
# BIDS entities deidflow writes, in the specification's order
ENTITY_ORDER = ("task", "trc", "acq", "ce", "rec", "dir", "run", "echo", "part")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_NUM = re.compile(r"^\s*(>=|<=|>|<|==)?\s*(-?\d+(?:\.\d+)?)\s*$")
_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\.\.\s*(-?\d+(?:\.\d+)?)\s*$")
_TASK = re.compile(r"task[-_]?([A-Za-z0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Condition:
    """One test on one attribute (see data/bids_heuristic.yaml for the forms)."""

    attribute: str
    spec: Any

    def holds(self, attrs: Mapping[str, Any]) -> bool:
        value = attrs.get(self.attribute)
        spec = self.spec
        if isinstance(spec, bool):
            return bool(value) is spec
        if isinstance(spec, (int, float)):
            return _number(value) == float(spec)
        text = str(spec)
        m = _RANGE.match(text)
        if m:
            v = _number(value)
            return v is not None and float(m.group(1)) <= v <= float(m.group(2))
        m = _NUM.match(text)
        if m:
            v = _number(value)
            if v is None:
                return False
            op, n = m.group(1) or "==", float(m.group(2))
            return {"<": v < n, "<=": v <= n, ">": v > n, ">=": v >= n, "==": v == n}[op]
        negate = text.startswith("!")
        pattern = _regex(text[1:] if negate else text)
        found = pattern.search(_text(value)) is not None
        return found != negate


@dataclass(frozen=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]
    datatype: str
    suffix: str = ""
    entities: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        return all(c.holds(attrs) for c in self.conditions)


@dataclass(frozen=True)
class Target:
    """Where one image goes: ``datatype`` ("unsorted" for sourcedata/unsorted), BIDS suffix and the
    entities the rule fixed (run and acq are added by :mod:`.naming`)."""

    datatype: str
    suffix: str
    entities: Mapping[str, str]
    rule: str
    reason: str = ""


def parse_rules(raw: Iterable[Mapping[str, Any]], origin: str) -> list[Rule]:
    """Rules from their YAML form; raises ValueError naming ``origin`` and the rule's index."""
    rules = []
    for i, r in enumerate(raw):
        where = f"{origin}[{i}]"
        if not isinstance(r, Mapping):
            raise ValueError(f"{where}: a rule is a mapping with match, datatype, suffix")
        match = r.get("match") or {}
        if not isinstance(match, Mapping) or not match:
            raise ValueError(f"{where}: match must name at least one attribute")
        datatype = r.get("datatype")
        if datatype not in DATATYPES:
            raise ValueError(f"{where}: datatype must be one of {', '.join(DATATYPES)}")
        suffix = str(r.get("suffix") or "")
        if datatype != "unsorted" and not re.match(r"^[A-Za-z0-9]+(\{EchoNumber\})?$", suffix):
            raise ValueError(f"{where}: suffix must be alphanumeric (e.g. T1w, bold)")
        entities = dict(r.get("entities") or {})
        for k, v in entities.items():
            if k not in ENTITY_ORDER or k == "run":
                raise ValueError(f"{where}: entity {k!r} is not one of {', '.join(e for e in ENTITY_ORDER if e != 'run')}")
            if not _LABEL.match(str(v)):
                raise ValueError(f"{where}: entity {k} label {v!r} must be alphanumeric")
        conditions = []
        for attr, spec in match.items():
            for s in (spec if isinstance(spec, list) else [spec]):
                if isinstance(s, str) and not (_RANGE.match(s) or _NUM.match(s)):
                    try:
                        _regex(s[1:] if s.startswith("!") else s)
                    except re.error as exc:
                        raise ValueError(f"{where}: bad regular expression for {attr}: {exc}") from None
                conditions.append(Condition(str(attr), s))
        rules.append(Rule(str(r.get("name") or where), tuple(conditions), datatype, suffix,
                          {k: str(v) for k, v in entities.items()}, str(r.get("reason") or "")))
    return rules


@lru_cache(maxsize=1)
def builtin_rules() -> tuple[Rule, ...]:
    text = resources.files("deidflow").joinpath("data", "bids_heuristic.yaml").read_text(encoding="utf-8")
    return tuple(parse_rules(yaml.safe_load(text)["rules"], "bids_heuristic.yaml"))


def rules_for(mapping: Iterable[Mapping[str, Any]] | None) -> list[Rule]:
    """The user's ``bids.mapping`` rules followed by the built-in heuristic."""
    return [*parse_rules(mapping or [], "bids.mapping"), *builtin_rules()]


def image_attributes(series: SeriesInfo, out: Output) -> dict[str, Any]:
    """Everything a rule may test for one image dcm2niix wrote from ``series``."""
    attrs: dict[str, Any] = dict(series.attrs)
    sc = out.sidecar
    attrs["Description"] = " ".join(str(series.attrs.get(k, "")) for k in ("SeriesDescription", "ProtocolName")).strip()
    attrs["Plane"] = series.plane
    attrs["ConverterTag"] = out.tag
    attrs["Volumes"] = nifti_volumes(out.nifti)
    bvals = out.bvals
    attrs["HasBValues"] = bool(bvals) and out.bvec is not None
    attrs["BValueMax"] = max(bvals) if bvals else 0.0
    attrs["EchoNumber"] = int(sc.get("EchoNumber") or 1)
    image_type = [str(x).upper() for x in (sc.get("ImageType") or [])]
    attrs["IsPhase"] = "P" in image_type or "PHASE" in image_type or "_ph" in out.tag
    for key in ("PhaseEncodingDirection", "ArterialSpinLabelingType"):
        if sc.get(key):
            attrs[key] = sc[key]
    for key in ("EchoTime", "RepetitionTime", "InversionTime"):  # per image (multi-echo), in ms
        if isinstance(sc.get(key), (int, float)):
            attrs[key] = float(sc[key]) * 1000.0
    for key in SIDECAR_FALLBACK:  # enhanced/XA DICOM keep some of these in vendor sequences only
        if not attrs.get(key) and sc.get(key):
            attrs[key] = _text(sc[key])
    attrs["EPI"] = is_epi(attrs)
    return attrs


# Attributes taken from dcm2niix's sidecar when the DICOM's public attributes lack them.
SIDECAR_FALLBACK = ("SequenceName", "ScanningSequence", "SequenceVariant", "ScanOptions", "ImageType",
                    "MRAcquisitionType", "PulseSequenceDetails")
_EPI_SEQUENCE = re.compile(r"^\*?(ep|epi)|epi|ep2d|ep3d|bold|fmri", re.IGNORECASE)


def is_epi(attrs: Mapping[str, Any]) -> bool:
    """Echo-planar: ScanningSequence EP, an EPI ImageType, or an EPI sequence name (Siemens ``epfid``,
    ``ep_b``, GE ``epiRT``, ``%SiemensSeq%\\ep2d_bold``)."""
    if re.search(r"(^|\\)EP(\\|$)", _text(attrs.get("ScanningSequence")), re.IGNORECASE):
        return True
    if re.search(r"(^|\\)EPI(\\|$)", _text(attrs.get("ImageType")), re.IGNORECASE):
        return True
    seq = _text(attrs.get("SequenceName")) + " " + _text(attrs.get("PulseSequenceDetails")).split("\\")[-1]
    return bool(_EPI_SEQUENCE.search(seq.strip()))


def classify(attrs: Mapping[str, Any], rules: Iterable[Rule]) -> Target:
    """The first matching rule's target; ``unsorted`` when none matches."""
    if "EPI" not in attrs:
        attrs = {**attrs, "EPI": is_epi(attrs)}
    for rule in rules:
        if rule.matches(attrs):
            entities = dict(rule.entities)
            suffix = rule.suffix.replace("{EchoNumber}", str(attrs.get("EchoNumber") or 1))
            if rule.datatype in ("func",) and "task" not in entities:
                entities["task"] = task_label(attrs)
            return Target(rule.datatype, suffix, entities, rule.name, rule.reason)
    return Target("unsorted", "", {}, "", "no BIDS rule matched")


def task_label(attrs: Mapping[str, Any]) -> str:
    """``task-`` label of a functional series: ``task-<x>`` in its description, "rest" when the
    description says rest, else "unknown" (descriptions survive only with clean_descriptors)."""
    text = str(attrs.get("Description") or "")
    m = _TASK.search(text)
    if m:
        return m.group(1)
    return "rest" if re.search(r"rest", text, re.IGNORECASE) else "unknown"


def nifti_volumes(path: Path) -> int:
    """Number of volumes (dim[4], at least 1) from a NIfTI-1/2 header, without nibabel."""
    with open(path, "rb") as fh:
        head = fh.read(540)
    for order in ("<", ">"):
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            return max(1, dims[4]) if dims[0] >= 4 else 1
        if size == 540:
            dims = struct.unpack(order + "8q", head[16:80])
            return max(1, dims[4]) if dims[0] >= 4 else 1
    return 1


@lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)
