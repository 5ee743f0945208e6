"""The conversion working copy: de-identified DICOM that keeps what dcm2niix needs.

The released DICOM follows ``dicom.private`` (remove, safe or keep).  dcm2niix, however, reads
vendor private elements for the mosaic slice count, scaling, timing, diffusion and phase
encoding, so converting the released files loses research data whenever they are removed.  The
``dicom`` stage therefore writes, for every DICOM file of a BIDS run, a second de-identified copy
into the restricted folder (never the release) with the same public-attribute profile, the same
keyed UIDs and dates, and the private elements of the vendor table
``data/bids_private.tsv`` (whole blocks of the creators dcm2niix reads, plus single elements).
Free text inside kept protocol blobs (the Siemens Phoenix protocol of the CSA series header and
of the XA ``SIEMENS MR SDS 01`` XProtocol) is blanked in place, byte for byte, except the
acquisition entries dcm2niix reports (``PROTOCOL_TEXT_KEEP``); embedded UIDs are replaced as in
the release.  What leaves the restricted folder from the working copy is only dcm2niix's NIfTI
and its sidecar reduced to the allow-list of :mod:`deidflow.sidecar`.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator, Mapping

from ..dicom import Scrubber, SubjectContext
from ..dicomio import DicomError, deidentify_path
from ..fsutil import RESTRICTED_DIR_MODE, RESTRICTED_FILE_MODE, publish_dir, staging_dir_for
from ..profile import Plan, build_plan, safe_private_table
from ..qc.identifiers import IdentifierCollector

TABLE = "bids_private.tsv"


class VendorTable(Mapping):
    """(creator, group, element low byte) -> VR, where a row with element ``*`` keeps the whole
    block of that creator.  Used as :attr:`Plan.safe_private` of the working-copy plan."""

    def __init__(self, elements: Mapping[tuple[str, int, int], str], blocks: frozenset[tuple[str, int]]):
        self._elements = dict(elements)
        self.blocks = blocks

    def __contains__(self, key) -> bool:
        return key in self._elements or (key[0], key[1]) in self.blocks

    def __getitem__(self, key) -> str:
        if key in self._elements:
            return self._elements[key]
        if (key[0], key[1]) in self.blocks:
            return ""
        raise KeyError(key)

    def __iter__(self) -> Iterator:
        return iter(self._elements)

    def __len__(self) -> int:
        return len(self._elements)


@lru_cache(maxsize=1)
def vendor_table() -> VendorTable:
    """The PS3.15 safe private attributes (data/private_safe.tsv) plus the conversion table."""
    elements = dict(safe_private_table())
    blocks = set()
    text = resources.files("deidflow.data").joinpath(TABLE).read_text(encoding="utf-8")
    rows = csv.DictReader((line for line in text.splitlines() if not line.startswith("#")), delimiter="\t")
    for r in rows:
        group = int(r["group"], 16)
        if r["element"] == "*":
            blocks.add((r["creator"], group))
        else:
            elements[(r["creator"], group, int(r["element"], 16))] = r["vr"]
    return VendorTable(elements, frozenset(blocks))


# Added to the release options in the working copy: per-slice acquisition times are what dcm2niix
# derives slice timing (and the multiband factor) from on classic DICOM, and the shifted dates give
# sessions.tsv / scans.tsv their order.  Neither reaches the release unless the release options
# retain them: the sidecar allow-list removes times and dates by the release options, and the
# NIfTI description's "Time=" is zeroed by the convert job.
WORKING_COPY_OPTIONS = frozenset({"retain_long_modified_dates", "retain_safe_private"})


def conversion_plan(options, overrides=()) -> Plan:
    """The release profile (``options``, ``overrides``) with :data:`WORKING_COPY_OPTIONS` and the
    vendor table as its private policy."""
    extra = WORKING_COPY_OPTIONS - ({"retain_long_modified_dates"} if "retain_long_full_dates" in options else set())
    plan = build_plan(set(options) | extra, "safe", overrides)
    return dataclasses.replace(plan, safe_private=vendor_table())


# Phoenix protocol entries whose text dcm2niix reports as acquisition fields (PulseSequenceDetails,
# ConsistencyInfo, ReceiveCoilName, nucleus and RF pulse names); every other quoted value is blanked.
PROTOCOL_TEXT_KEEP = re.compile(
    rb"^(tSequenceFileName|sProtConsistencyInfo\.t(Measured)?BaselineString|sProtConsistencyInfo\.tSystemType"
    rb"|.*sCoilElementID\.t(CoilID|Element)|.*sCoilStringForConversion|.*\.tNucleus|sTXSPEC\.aRFPULSE\[\d+\]\.tName)$")
_ASCCONV = re.compile(rb"### ASCCONV BEGIN.*?### ASCCONV END ###", re.S)
_ASC_LINE = re.compile(rb"^([^\s=]+)([ \t]*=[ \t]*)(\"+)([^\"\r\n]*)(\"+)", re.M)
_QUOTED = re.compile(rb"\"([\x20\x21\x23-\x7e\x80-\xff]*)\"")  # text only: never across binary fields


def _blank(text: bytes) -> bytes:
    return b" " * len(text)


def clean_protocol_text(value: bytes) -> bytes:
    """Blank, in place and byte for byte, the free text of a Siemens protocol blob: every quoted
    value outside the ASCCONV section, and inside it every quoted value of an entry not in
    :data:`PROTOCOL_TEXT_KEEP` (tProtocolName, tdefaultEVAProt, sWipMemBlock.tFree …).
    Returns ``value`` itself when it holds no protocol."""
    if b"ASCCONV" not in value and b"<XProtocol>" not in value:
        return value
    out = bytearray(value)
    spans = [(m.start(), m.end()) for m in _ASCCONV.finditer(value)]
    for a, b in spans:
        for m in _ASC_LINE.finditer(value, a, b):
            if not PROTOCOL_TEXT_KEEP.match(m.group(1)):
                out[m.start(4):m.end(4)] = _blank(m.group(4))
    pos = 0
    for a, b in [*spans, (len(value), len(value))]:
        for m in _QUOTED.finditer(value, pos, a):
            out[m.start(1):m.end(1)] = _blank(m.group(1))
        pos = b
    return bytes(out)


class WorkingCopyScrubber(Scrubber):
    """The release profile with the vendor table for private elements and protocol text blanked
    (each large blob once per subject: :meth:`Scrubber.clean_private`)."""

    def __init__(self, plan: Plan, ctx: SubjectContext):
        # same keys, date offset and UID map as the release; its own record of what it removed
        super().__init__(plan, dataclasses.replace(ctx, identifiers=IdentifierCollector()))

    def scrub_blob(self, value: bytes) -> bytes:
        new = clean_protocol_text(super().scrub_blob(value))
        return value if new == value else new


class WorkingCopy:
    """The working copy of one subject, staged in ``restricted`` and published as
    ``work_root/<subject>`` (same relative paths as the released DICOM) by the ``dicom`` job."""

    def __init__(self, plan: Plan, ctx: SubjectContext, work_root: Path, restricted: Path):
        """``plan``: from :func:`conversion_plan`."""
        self.scrubber = WorkingCopyScrubber(plan, ctx)
        self.final = Path(work_root) / ctx.subject
        self.restricted = Path(restricted)
        self.stage: Path | None = None  # created with the first file

    def add(self, src: Path, relpath: str, released: Path, pixels_changed: bool) -> None:
        """Write the working copy of ``src``.  A file whose pixels the release changed (burned-in
        text), or that the working-copy profile cannot write, is converted from the released file.
        Restricted modes (0600 files, 0700 folders), like everything in the restricted folder."""
        if self.stage is None:
            self.stage = staging_dir_for(self.final, self.restricted / "tmp" / "stage-bids-dicom")
        dst = self.stage / relpath
        written = False
        if not pixels_changed:
            try:
                deidentify_path(src, dst, self.scrubber)
                written = True
            except (DicomError, OSError):
                dst.unlink(missing_ok=True)
        if not written:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(released, dst)
        os.chmod(dst, RESTRICTED_FILE_MODE)
        for folder in dst.relative_to(self.stage).parents:
            os.chmod(self.stage / folder, RESTRICTED_DIR_MODE)

    def scan_entries(self, entries: list[list[str]]) -> list[list[str]]:
        """The release's leak-scan identifiers without the private values the working copy keeps
        on purpose and classified as ``id`` (coil strings, prescan settings…): dcm2niix reports them
        as acquisition fields of the sidecar allow-list.  Names, UIDs, dates and every public
        attribute's values stay."""
        removed = set(self.scrubber.collect.values) if self.scrubber.collect is not None else set()
        return [e for e in entries
                if not (e[0] == "id" and e[1].startswith("(") and (e[0], e[2]) not in removed)]

    def publish(self) -> None:
        """The subject's working copy in one rename (an earlier one is replaced; none left when
        the subject has no DICOM file now)."""
        if self.stage is not None and any(self.stage.iterdir()):
            publish_dir(self.stage, self.final)
        else:
            if self.stage is not None:
                self.stage.rmdir()
            shutil.rmtree(self.final, ignore_errors=True)
        self.stage = None

    def discard(self) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
