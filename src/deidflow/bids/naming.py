"""BIDS names for one subject's images: ``acq-`` for variants, ``run-`` for repeats, never a collision.

Images that land on the same datatype, suffix and entities within a session are compared by an
acquisition signature (2D/3D, slice plane, sequence name, TE, TR, TI, flip angle).  Different
signatures are *variants* and get an ``acq-`` label from the first property that tells all of them
apart, else the first pair of properties (``acq-3d``/``acq-2d``, ``acq-sag``/``acq-tra``,
``acq-te2p41``, ``acq-3dsag``…; ``acq-v1``… when nothing does); images with the same signature are *repeats* and get ``run-1``, ``run-2``… in series
order.  A rule that sets ``acq`` itself keeps it.  The names depend only on the subject's series,
so a rerun gives the same names.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable

from .dcm2niix import Output
from .heuristic import ENTITY_ORDER, Target
from .series import SeriesInfo


@dataclass
class Image:
    """One image dcm2niix wrote, its attributes, where the heuristic sends it and its final name."""

    series: SeriesInfo
    output: Output
    attrs: dict[str, Any]
    target: Target
    entities: dict[str, str] = field(default_factory=dict)
    stem: str = ""  # release path without extension, relative to the release root

    @property
    def order(self) -> tuple:
        return (self.series.get("SeriesNumber") if self.series.get("SeriesNumber") is not None else 1 << 30,
                self.series.label, self.output.tag)


def _alnum(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", str(text or "")).lower()


def _num_label(prefix: str, value: Any) -> str:
    if value in (None, ""):
        return ""
    v = round(float(value), 2)
    return prefix + (str(int(v)) if v == int(v) else str(v).replace(".", "p"))


# signature properties, in the order tried for an acq- label
_PROPERTIES: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("MRAcquisitionType", lambda a: _alnum(a.get("MRAcquisitionType"))),
    ("Plane", lambda a: _alnum(a.get("Plane"))),
    ("SequenceName", lambda a: _alnum(a.get("SequenceName"))),
    ("EchoTime", lambda a: _num_label("te", a.get("EchoTime"))),
    ("RepetitionTime", lambda a: _num_label("tr", a.get("RepetitionTime"))),
    ("InversionTime", lambda a: _num_label("ti", a.get("InversionTime"))),
    ("FlipAngle", lambda a: _num_label("fa", a.get("FlipAngle"))),
)


def assign_names(subject: str, images: list[Image]) -> None:
    """Set ``entities`` and ``stem`` of every image of one subject (all its sessions)."""
    bids = [im for im in images if im.target.datatype != "unsorted"]
    _echo_entities(bids)
    groups: dict[tuple, list[Image]] = defaultdict(list)
    for im in bids:
        im.entities = dict(im.target.entities)
        key = (im.series.session, im.target.datatype, im.target.suffix, tuple(sorted(im.entities.items())))
        groups[key].append(im)
    for members in groups.values():
        _variants_and_runs(members)
    for im in bids:
        ses = im.series.session
        parts = [subject, ses] + [f"{k}-{im.entities[k]}" for k in ENTITY_ORDER if k in im.entities]
        im.stem = f"{subject}/{ses}/{im.target.datatype}/{'_'.join(parts)}_{im.target.suffix}"
    for im in images:
        if im.target.datatype == "unsorted":
            im.stem = f"sourcedata/unsorted/{subject}/{im.series.session}/{im.series.label}{im.output.tag}"
    seen: dict[str, Image] = {}
    for im in images:
        if im.stem in seen:  # cannot happen by construction; never overwrite silently
            raise RuntimeError(f"two images of {subject} were given the name {im.stem}")
        seen[im.stem] = im


def _echo_entities(images: list[Image]) -> None:
    """Multi-echo functional series: ``echo-N`` (TE then no longer tells echoes apart as variants)."""
    echoes: dict[tuple, set[int]] = defaultdict(set)
    for im in images:
        if im.target.datatype == "func":
            echoes[(im.series.relpath, im.target.suffix)].add(int(im.attrs.get("EchoNumber") or 1))
    for im in images:
        if im.target.datatype == "func" and len(echoes[(im.series.relpath, im.target.suffix)]) > 1:
            im.target = Target(im.target.datatype, im.target.suffix,
                               {**im.target.entities, "echo": str(int(im.attrs.get("EchoNumber") or 1))},
                               im.target.rule, im.target.reason)


def _signature(im: Image) -> tuple:
    skip = {"EchoTime"} if "echo" in im.entities else set()
    return tuple(f(im.attrs) for name, f in _PROPERTIES if name not in skip)


def _variants_and_runs(members: list[Image]) -> None:
    members.sort(key=lambda im: im.order)
    if "acq" not in members[0].entities:
        sigs: list[tuple] = []
        for im in members:
            s = _signature(im)
            if s not in sigs:
                sigs.append(s)
        if len(sigs) > 1:
            labels = _acq_labels(sigs)
            for im in members:
                im.entities["acq"] = labels[_signature(im)]
    by_acq: dict[str, list[Image]] = defaultdict(list)
    for im in members:
        by_acq[im.entities.get("acq", "")].append(im)
    for group in by_acq.values():
        if len(group) > 1:
            for i, im in enumerate(group, start=1):
                im.entities["run"] = str(i)


def _acq_labels(sigs: list[tuple]) -> dict[tuple, str]:
    """Per signature, a label from the first property (else the first pair of properties, joined)
    whose values differ for all signatures; ``v1``, ``v2``… when none does."""
    n = len(sigs[0])
    for combo in [(i,) for i in range(n)] + list(combinations(range(n), 2)):
        labels = ["".join(s[i] for i in combo) for s in sigs]
        if all(labels) and len(set(labels)) == len(labels):
            return dict(zip(sigs, labels))
    return {s: f"v{k}" for k, s in enumerate(sigs, start=1)}
