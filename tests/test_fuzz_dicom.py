"""Fuzz tests (hypothesis) for DICOM de-identification.

The invariant, for every input file: either a clean de-identified output or a quarantine reason,
never an exception escaping, never an original identifier in the output.  Concretely:

* ``deidentify_file``, and the pydicom data-set engine ``_deidentify_dataset`` on its own, return
  or raise :class:`DicomError` whose message is one line without any planted identifier;
* ``inventory.read_dicom_header`` returns or raises DicomError/OSError; ``sniff.sniff`` returns;
* an output is a Part-10 file that ``pydicom.dcmread`` reads without ``force``, marked
  PatientIdentityRemoved, holding none of the planted identifiers (raw bytes, searched as
  ASCII/latin-1 and in the file's own character set), with an action record free of them, and
  it is accepted again as input (the second output is checked the same way);
* for an intact input every element of the output decodes and no decoded text holds a planted
  identifier.  For a damaged (mutated) input the mutation may have moved an identifier into an
  element the configuration keeps as it is (K, C, an unlisted attribute, a kept private
  element, pixel data), and kept elements are copied as damaged as they were: there only the
  structure must read and only identifiers in other elements count (``_kept_by_design``).

Planted identifiers: PatientName "ZZFUZZNAME^QQPLANTED" (plus a non-ASCII part in the file's
character set), PatientID "PID98765432", InstitutionName "FUZZHOSPITALXYZ" and the UID
"1.2.826.0.1.3680043.99.123456789.1" (StudyInstanceUID, SOPInstanceUID, nested
ReferencedSOPInstanceUID / UID), also inside nested sequences, in free text (only the file's own
identifiers: the cleaner knows no others) and in private elements.  Options that retain an
identifier by design exempt it (``must_be_absent``).

Two strategies: *structured* (data sets built with pydicom: random subsets of identifying
attributes, nested sequences of depth 0-4, private blocks with random creators and VRs, public
and private sequences written as UN, character sets ISO_IR 100 / ISO_IR 192 / GB18030 /
ISO 2022 IR 87, transfer syntaxes implicit LE / explicit LE / explicit BE / deflated /
encapsulated, with or without preamble and file meta, under random profile options, private
policies and overrides) and *mutation* (byte flips, truncation, insertion, deletion, chunk
duplication and corruption of length, VR and tag fields at element boundaries, nested items
included, applied to structured files and to pydicom's bundled CT_small, MR_small, rtplan and
test-SR with identifiers planted in them).

By default (CI) the examples are derandomized and the module takes about 75 s on two cores.
``DEIDFLOW_FUZZ_EXAMPLES=N`` raises every strategy to N examples with a random seed (``make
fuzz``).  Defects found are kept as regression tests at the end
(minimal inputs built byte by byte); the property tests tolerate exactly those failure
signatures (``known_bug``, ``leaks_in``, ``check_output``) so that they keep looking for new
ones, and count them as hypothesis events (``--hypothesis-show-statistics``).
"""
from __future__ import annotations

import base64
import io
import linecache
import logging
import os
import re
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import PersonName

from deidflow import inventory, sniff
from deidflow.dicom import Scrubber, SubjectContext
from deidflow.dicomio import DicomError, _deidentify_dataset, deidentify_file
from deidflow.profile import OPTIONS, Plan, build_plan, safe_private_table
from deidflow.pseudonym import Pseudonymizer

pytestmark = [
    pytest.mark.slow,
    # the generator writes deliberately odd values (e.g. a sentence in a safe private CS element)
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]

# ------------------------------------------------------------------------------ run size

_ENV_EXAMPLES = os.environ.get("DEIDFLOW_FUZZ_EXAMPLES", "").strip()
FUZZ_EXAMPLES = int(_ENV_EXAMPLES) if _ENV_EXAMPLES else 0


def fuzz_settings(default: int) -> settings:
    """``default`` examples, derandomized (stable CI); DEIDFLOW_FUZZ_EXAMPLES raises the count
    and switches to a random seed (the failing example is printed with its reproduce blob)."""
    return settings(
        max_examples=max(default, FUZZ_EXAMPLES),
        deadline=None,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        print_blob=bool(FUZZ_EXAMPLES),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much, HealthCheck.large_base_example],
    )


# ------------------------------------------------------------------------------ planted identifiers

NAME = "ZZFUZZNAME^QQPLANTED"
NAME_PARTS = ("ZZFUZZNAME", "QQPLANTED")
PID = "PID98765432"
INST = "FUZZHOSPITALXYZ"
UID = "1.2.826.0.1.3680043.99.123456789.1"
PRIV = "PRIVSECRETQQZZ"  # only in private values: kept verbatim by private: keep (by design)
ORPHAN = "ORPHANSECRETQQ"  # private values without a creator: removed under every policy
ALL_ASCII_TOKENS = (*NAME_PARTS, PID, INST, UID, PRIV, ORPHAN)

KEY = b"fuzz-key-0123456789abcdef-0123456789"
SUBJECT = "sub-fuzz0001"
ROOT = "1.2.826.0.1.3680043.99.7"  # benign UIDs (replaced too, but not searched for)


@dataclass(frozen=True)
class Charset:
    value: tuple[str, ...] | None  # SpecificCharacterSet
    codec: str  # Python codec of the non-ASCII text, for the raw-byte search
    token: str | None  # a non-ASCII identifier planted as part of the patient's name
    filler: str  # non-identifying free text in this character set


CHARSETS = (
    Charset(None, "ascii", None, "routine head scan"),
    Charset(("ISO_IR 100",), "latin_1", "ZÜRCHERÖÄ", "Schädel Übersicht"),
    Charset(("ISO_IR 192",), "utf_8", "ÆØÅ名前字", "检查 Überblick ✓"),
    Charset(("GB18030",), "gb18030", "王小明华", "头部扫描"),
    Charset(("", "ISO 2022 IR 87"), "iso2022_jp", "山田太郎", "頭部検査"),
)


def patient_name(cs: Charset) -> str:
    if cs.token is None:
        return NAME
    if cs.codec == "iso2022_jp":
        return f"{NAME}={cs.token}"  # ideographic component group
    return f"{NAME}^{cs.token}"  # as middle name


def token_encodings(token: str, cs: Charset) -> set[bytes]:
    """Byte strings that would reveal ``token`` in a file written in ``cs``."""
    out = set()
    for codec in ("ascii", "latin_1", cs.codec):
        try:
            b = token.encode(codec)
        except UnicodeEncodeError:
            continue
        b = re.sub(rb"\x1b[$()][@A-Z]?|\x1b[$(][@A-Z]", b"", b)  # ISO 2022 escapes
        out.add(b)
    return {b for b in out if b}


# ------------------------------------------------------------------------------ plans

OVERRIDE_ACTIONS_NO_KEEP = ("remove", "empty", "dummy", "clean", "replace", "uid", "pseudonym")
# Attributes that may hold a planted identifier: any action but keep.
PLANTED_TARGETS = ("PatientName", "PatientID", "InstitutionName", "StudyDescription", "ImageComments",
                   "StudyInstanceUID", "SOPInstanceUID", "ReferencedSOPInstanceUID", "TextValue",
                   "OtherPatientIDs", "AccessionNumber", "PersonName", "ReferringPhysicianName")
# Sequences (keep still de-identifies every item) and attributes never holding a planted value.
FREE_TARGETS = ("ReferencedImageSequence", "ContentSequence", "RequestAttributesSequence",
                "OtherPatientIDsSequence", "ReferencedPatientSequence", "Modality", "StationName",
                "Manufacturer", "StudyDate", "PatientBirthDate", "SeriesInstanceUID")
REPLACE_VALUES = ("REPLACED", "", "1.2.3.4", "Ünïcödé 名前")


@dataclass(frozen=True)
class PlanCfg:
    options: frozenset
    private: str | None
    overrides: tuple  # ((attribute, action, value or None), ...)

    def plan(self) -> Plan:
        return _plan(self)

    def scrubber(self) -> Scrubber:
        return Scrubber(self.plan(), SubjectContext(Pseudonymizer(KEY), SUBJECT, date_offset=-42))


@lru_cache(maxsize=None)
def _plan(cfg: PlanCfg) -> Plan:
    overrides = [{"attribute": a, "action": act, **({} if v is None else {"value": v})}
                 for a, act, v in cfg.overrides]
    return build_plan(cfg.options, cfg.private, overrides)


def _attr_spec(keyword: str, form: int) -> str:
    if form == 0:
        return keyword
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if form == 1 else f"{tag:08X}"


@st.composite
def overrides(draw):
    planted = draw(st.booleans())
    keyword = draw(st.sampled_from(PLANTED_TARGETS if planted else FREE_TARGETS))
    action = draw(st.sampled_from(OVERRIDE_ACTIONS_NO_KEEP + (() if planted else ("keep",))))
    value = draw(st.sampled_from(REPLACE_VALUES)) if action == "replace" else None
    return (_attr_spec(keyword, draw(st.integers(0, 2))), action, value)


@st.composite
def plans(draw) -> PlanCfg:
    opts = set(draw(st.sets(st.sampled_from(OPTIONS))))
    if {"retain_long_full_dates", "retain_long_modified_dates"} <= opts:
        opts.discard(draw(st.sampled_from(["retain_long_full_dates", "retain_long_modified_dates"])))
    private = draw(st.sampled_from([None, "remove", "safe", "keep"]))
    ovs = draw(st.lists(overrides(), max_size=3, unique_by=lambda o: o[0]))
    return PlanCfg(frozenset(opts), private, tuple(ovs))


DEFAULT_PLAN = PlanCfg(frozenset(), None, ())


# ------------------------------------------------------------------------------ structured data sets

SEQUENCES = ("ReferencedImageSequence", "SourceImageSequence", "ReferencedPatientSequence",
             "OtherPatientIDsSequence", "ContentSequence", "RequestAttributesSequence",
             "ReferencedStudySequence", "DerivationCodeSequence", "AnatomicRegionSequence")
UNKNOWN_CREATORS = ("FUZZ PRIVATE A", "ZZ CREATOR 01 ", "ACME 1.0", "", "SIEMENS CSA HEADER")
PRIVATE_GROUPS = (0x0009, 0x0011, 0x0019, 0x0029, 0x0043, 0x2001, 0x7FD1)
PRIVATE_VRS = ("LO", "SH", "LT", "UT", "UI", "DS", "IS", "US", "FD", "OB", "UN", "UN-items", "SQ")
SAFE_ENTRIES = tuple(sorted((c, g, e, vr.split("/")[0]) for (c, g, e), vr in safe_private_table().items()
                            if c and vr.split("/")[0] in ("SQ", "LO", "SH", "CS", "DS", "IS", "US", "FD", "OB", "UI")))
SOP_CLASSES = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, BasicTextSRStorage)
TRANSFER_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                     DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit)
LAYOUTS = ("part10", "no_preamble", "bare", "preamble_no_meta")


@dataclass
class Case:
    """A generated input: the data set, how it is written and what was planted where."""

    ds: Dataset
    ts: str
    layout: str
    charset: Charset
    meta_class: str
    planted: set = field(default_factory=set)  # tokens in public attributes or private values
    priv_in_safe: bool = False  # PRIV planted in a safe-listed private element
    un: dict = field(default_factory=dict)  # top-level tag -> undefined length: written as UN
    un_sequence: bool = False  # some sequence (public or private, any depth) is written as UN

    def describe(self) -> str:
        return f"ts={self.ts} layout={self.layout} charset={self.charset.value} planted={sorted(self.planted)}"


class _Gen:
    """Draws the parts of one data set."""

    def __init__(self, draw, cs: Charset, explicit: bool):
        self.draw, self.cs, self.explicit = draw, cs, explicit
        self.planted: set[str] = set()
        self.un: dict[int, bool] = {}
        self.un_sequence = False
        self.top = Dataset()
        self.text_pool: list[str] = [cs.filler, "T1 MPRAGE sag", "follow-up"]
        self.priv_in_safe = False

    def plant(self, *tokens: str) -> None:
        self.planted.update(t for t in tokens if t)

    def name(self) -> str:
        self.plant(*NAME_PARTS, self.cs.token)
        return patient_name(self.cs)

    def free_text(self) -> str:
        """Text mixing filler and the identifiers of this file's own top-level attributes (the
        cleaner can only recognise those)."""
        parts = self.draw(st.lists(st.sampled_from(self.text_pool), min_size=1, max_size=4))
        text = " ".join(parts)[:60]
        self.plant(*(t for t in (*NAME_PARTS, PID, INST, self.cs.token) if t and t in text))
        return text

    # -- sequences -------------------------------------------------------------------------
    def sequence(self, depth: int) -> Sequence:
        items = []
        for _ in range(self.draw(st.integers(0, 2))):
            it = Dataset()
            it.is_undefined_length_sequence_item = self.draw(st.booleans())
            self.item_content(it, depth)
            items.append(it)
        return Sequence(items)

    def item_content(self, it: Dataset, depth: int) -> None:
        d = self.draw
        for attr in sorted(d(st.sets(st.sampled_from(  # sorted: set order varies with PYTHONHASHSEED
                ("ref", "name", "pid", "inst", "text", "person", "uid", "code", "private")), max_size=5))):
            if attr == "ref":
                it.ReferencedSOPClassUID = CTImageStorage
                it.ReferencedSOPInstanceUID = UID if d(st.booleans()) else f"{ROOT}.5.{d(st.integers(1, 99))}"
                self.plant(UID if it.ReferencedSOPInstanceUID == UID else None)
            elif attr == "name":
                it.PatientName = self.name()
            elif attr == "pid":
                it.PatientID = PID
                self.plant(PID)
            elif attr == "inst":
                it.InstitutionName = INST
                self.plant(INST)
            elif attr == "text":
                it.ValueType = "TEXT"
                it.TextValue = self.free_text()
            elif attr == "person":
                it.PersonName = self.name()
            elif attr == "uid":
                it.UID = UID
                self.plant(UID)
            elif attr == "code":
                it.CodeValue, it.CodingSchemeDesignator, it.CodeMeaning = "T-A0100", "SRT", "Brain"
            elif attr == "private":
                self.private_block(it, max(depth - 1, 0))
        if depth > 0 and d(st.booleans()):
            kw = d(st.sampled_from(SEQUENCES))
            setattr(it, kw, self.sequence(depth - 1))
            it[kw].is_undefined_length = d(st.booleans())

    # -- private ---------------------------------------------------------------------------
    def private_block(self, ds: Dataset, depth: int) -> None:
        d = self.draw
        block = d(st.sampled_from([0x10, 0x11, 0x42, 0xFF]))
        if d(st.booleans()) and SAFE_ENTRIES:
            creator, group, low, vr = d(st.sampled_from(SAFE_ENTRIES))
            elements = [(low, vr, True)]
        else:
            creator = d(st.sampled_from(UNKNOWN_CREATORS))
            group = d(st.sampled_from(PRIVATE_GROUPS))
            lows = d(st.lists(st.integers(0, 0xFF), min_size=0, max_size=3, unique=True))
            elements = [(low, d(st.sampled_from(PRIVATE_VRS)), False) for low in lows]
        ctag = group << 16 | block
        if ctag in ds:
            return
        ds.add_new(ctag, "LO", creator)
        for low, vr, safe in elements:
            self.private_element(ds, group << 16 | block << 8 | low, vr, safe, depth)

    def private_element(self, ds: Dataset, tag: int, vr: str, safe: bool, depth: int) -> None:
        d = self.draw
        if vr == "SQ":
            ds.add_new(tag, "SQ", self.sequence(depth))
            ds[tag].is_undefined_length = d(st.booleans())
            return
        if vr == "UN-items":  # a private sequence written as UN (implicit VR little endian items)
            self.un_sequence = True
            ds.add_new(tag, "SQ", self.sequence(depth))
            ds[tag].is_undefined_length = d(st.booleans())
            if ds is self.top and self.explicit:
                self.un[tag] = ds[tag].is_undefined_length
            else:  # nested (or implicit VR): the items as a defined-length value
                ds[tag].is_undefined_length = False
                ds[tag] = DataElement(tag, "UN", implicit_value(ds[tag], self.cs))
            return
        kind = d(st.sampled_from(["priv", "uid", "benign"]))
        text = {"priv": f"{PRIV} x", "uid": f"ref {UID} ", "benign": "42"}[kind]
        if vr in ("LO", "SH", "LT", "UT", "CS"):
            if vr in ("SH", "CS") and kind == "uid":  # a UID does not fit
                text, kind = "X1", "benign"
            ds.add_new(tag, vr, text[:16] if vr in ("SH", "CS") else text)
        elif vr == "UI":
            kind = "uid" if kind == "uid" else "benign"
            ds.add_new(tag, "UI", UID if kind == "uid" else f"{ROOT}.9")
        elif vr in ("DS", "IS", "US", "FD"):
            kind = "benign"
            ds.add_new(tag, vr, {"DS": "42", "IS": "42", "US": 42, "FD": [1.5, -2.0]}[vr])
        else:  # OB / UN: the text embedded in binary
            ds.add_new(tag, vr, b"\x01\x00" + text.encode("ascii") + b"\x00\xff")
        if kind == "priv":
            self.plant(PRIV)
            self.priv_in_safe |= safe
        elif kind == "uid":
            self.plant(UID)

    def orphans(self, ds: Dataset) -> None:
        """Private elements without a creator, and in the reserved element ranges."""
        for tag in sorted(self.draw(st.sets(st.sampled_from([0x00311001, 0x00310005, 0x00310150, 0x00091ABC]),
                                            max_size=2))):
            if (tag >> 16) << 16 | (tag >> 8 & 0xFF) in ds:
                continue
            ds.add_new(tag, "LO", f"{ORPHAN} y")
            self.plant(ORPHAN)


def implicit_value(elem: DataElement, cs: Charset) -> bytes:
    """The value bytes of ``elem`` encoded in implicit VR little endian (what UN holds)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    encodings = pydicom.charset.convert_encodings(list(cs.value) if cs.value else None)
    write_data_element(fp, elem, encodings)
    raw = fp.getvalue()
    return raw[8:-8] if elem.is_undefined_length else raw[8:]  # without header and delimiter


@st.composite
def cases(draw) -> Case:
    cs = draw(st.sampled_from(CHARSETS))
    ts = draw(st.sampled_from(TRANSFER_SYNTAXES))
    layouts = LAYOUTS if ts != DeflatedExplicitVRLittleEndian else ("part10", "no_preamble")
    layout = draw(st.sampled_from(layouts))
    g = _Gen(draw, cs, explicit=ts != ImplicitVRLittleEndian)
    ds = g.top
    if cs.value:
        ds.SpecificCharacterSet = list(cs.value) if len(cs.value) > 1 else cs.value[0]
    sop_class = draw(st.sampled_from(SOP_CLASSES))
    if draw(st.integers(0, 9)):
        ds.SOPClassUID = sop_class
    if draw(st.integers(0, 14)):
        planted_sop = draw(st.integers(0, 3)) == 0
        ds.SOPInstanceUID = UID if planted_sop else f"{ROOT}.1.{draw(st.integers(1, 999))}"
        g.plant(UID if planted_sop else None)
    if draw(st.integers(0, 6)):
        ds.StudyInstanceUID = UID
        g.plant(UID)
    ds.SeriesInstanceUID = f"{ROOT}.3"
    ds.Modality, ds.Manufacturer, ds.StationName, ds.StudyDate = "CT", "ACME", "STATION1", "20200315"
    # identifying attributes (their values also feed the free-text pool)
    sources = draw(st.sets(st.sampled_from(("name", "pid", "inst", "other_ids", "referring",
                                            "accession", "birth"))))
    if "name" in sources:
        ds.PatientName = g.name()
        g.text_pool += [*NAME_PARTS, *(t for t in [cs.token] if t)]
    if "pid" in sources:
        ds.PatientID = PID
        g.plant(PID)
        g.text_pool.append(PID)
    if "inst" in sources:
        ds.InstitutionName = INST
        g.plant(INST)
        g.text_pool.append(INST)
    if "other_ids" in sources and "pid" in sources:
        ds.OtherPatientIDs = [PID, "OTHER-1"]
    if "referring" in sources:
        ds.ReferringPhysicianName = g.name()
    if "accession" in sources and "pid" in sources:
        ds.AccessionNumber = PID
    if "birth" in sources:
        ds.PatientBirthDate = "19610312"
    for kw in sorted(draw(st.sets(st.sampled_from(("StudyDescription", "SeriesDescription", "ImageComments",
                                                   "PatientComments", "AdditionalPatientHistory"))))):
        setattr(ds, kw, g.free_text())
    if draw(st.integers(0, 4)) == 0:  # graphics overlay with a description
        ds.add_new(0x60000010, "US", 4)
        ds.add_new(0x60000011, "US", 4)
        ds.add_new(0x60000022, "LO", g.free_text())
        ds.add_new(0x60000040, "CS", "G")
        ds.add_new(0x60000050, "SS", [1, 1])
        ds.add_new(0x60000100, "US", 1)
        ds.add_new(0x60000102, "US", 0)
        ds.add_new(0x60003000, "OW", b"\x0f\xf0")
    for kw in draw(st.lists(st.sampled_from(SEQUENCES), max_size=3, unique=True)):
        setattr(ds, kw, g.sequence(draw(st.integers(0, 4))))
        ds[kw].is_undefined_length = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        g.private_block(ds, draw(st.integers(0, 2)))
    g.orphans(ds)
    if ts == JPEGBaseline8Bit or draw(st.booleans()):
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 4, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if ts == JPEGBaseline8Bit:
            ds.PixelData = encapsulate([b"\xff\xd8FAKEJPEGFRAME\xff\xd9"])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = bytes(range(16))
            ds["PixelData"].VR = "OB"
    # some public elements written as UN (explicit VR only): their value as implicit VR LE
    if ts != ImplicitVRLittleEndian and draw(st.integers(0, 3)) == 0:
        keys = [int(t) for t in ds.keys() if not (int(t) >> 16) & 1 and int(t) != 0x7FE00010]
        for tag in sorted(draw(st.sets(st.sampled_from(keys), max_size=3))):
            g.un[tag] = ds[tag].VR == "SQ" and ds[tag].is_undefined_length
            g.un_sequence |= ds[tag].VR == "SQ"
    return Case(ds, ts, layout, cs, sop_class, g.planted, g.priv_in_safe, g.un, g.un_sequence)


def encode(case: Case) -> bytes:
    """The file bytes of ``case`` (data set in its transfer syntax, in its layout)."""
    ts = case.ts
    little = ts != ExplicitVRBigEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, ts == ImplicitVRLittleEndian
    charset = case.ds.get("SpecificCharacterSet")
    encodings = pydicom.charset.convert_encodings(charset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in sorted(case.ds.keys()):
            elem = case.ds[tag]
            if tag in case.un:  # pydicom would write the dictionary VR: header by hand
                undefined = case.un[tag]
                value = implicit_value(elem, case.charset)
                e = "<" if little else ">"
                fp.write(struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, b"UN", 0,
                                     0xFFFFFFFF if undefined else len(value)) + value)
                if undefined:
                    fp.write(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # implicit VR LE, as the value
            else:
                write_data_element(fp, elem, encodings)
        body = fp.getvalue()
        if ts == DeflatedExplicitVRLittleEndian:
            z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = z.compress(body) + z.flush()
            body += b"\x00" * (len(body) % 2)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = case.meta_class
        meta.MediaStorageSOPInstanceUID = str(case.ds.get("SOPInstanceUID", f"{ROOT}.1.0"))
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = f"{ROOT}.100"
        mfp = DicomBytesIO()
        mfp.is_little_endian, mfp.is_implicit_VR = True, False
        write_file_meta_info(mfp, meta, enforce_standard=True)
    preamble = b"\x00" * 128 + b"DICM"
    return {"part10": preamble + mfp.getvalue() + body, "no_preamble": mfp.getvalue() + body,
            "bare": body, "preamble_no_meta": preamble + body}[case.layout]


# ------------------------------------------------------------------------------ bundled files

BUNDLED = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm")
BUNDLED_TOKENS = frozenset((*NAME_PARTS, PID, INST, UID))


@lru_cache(maxsize=None)
def bundled(name: str) -> bytes:
    """A pydicom test file (its own transfer syntax) with identifiers planted at the top level and
    in a nested sequence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.PatientName, ds.PatientID, ds.InstitutionName, ds.StudyInstanceUID = NAME, PID, INST, UID
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = UID
        inner = Dataset()
        inner.PatientName = NAME
        inner.ReferencedSOPInstanceUID = UID
        ref.SourceImageSequence = [inner]
        ds.ReferencedImageSequence = [ref]
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------ mutation

_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV"}


@dataclass(frozen=True)
class Field:
    kind: str  # "tag", "vr" or "len"
    offset: int
    size: int
    little: bool


@dataclass(frozen=True)
class Span:
    tag: int
    vr: bytes | None
    vstart: int
    vend: int
    ancestors: tuple = ()  # ((tag, vr), ...) of the elements it is nested in, outermost first


def scan(data: bytes, limit: int = 4000) -> tuple[list[Field], list[Span]]:
    """Tag, VR and length fields at element boundaries (file meta, data set, sequence items) and
    the value span of every element; tolerant: stops where the structure stops making sense."""
    out: list[Field] = []
    spans: list[Span] = []
    n = len(data)
    pos = 132 if n >= 132 and data[128:132] == b"DICM" else 0
    ts = None
    while pos + 8 <= n and data[pos:pos + 2] == b"\x02\x00" and len(out) < limit:
        el = struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4:pos + 6]
        out += [Field("tag", pos, 4, True), Field("vr", pos + 4, 2, True)]
        if vr in _LONG_VRS:
            out.append(Field("len", pos + 8, 4, True))
            length, vstart = struct.unpack_from("<L", data, pos + 8)[0] if pos + 12 <= n else 0, pos + 12
        else:
            out.append(Field("len", pos + 6, 2, True))
            length, vstart = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        spans.append(Span(0x00020000 | el, vr, vstart, min(n, vstart + length)))
        if el == 0x0010:
            ts = data[vstart:vstart + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = vstart + length
    if ts == DeflatedExplicitVRLittleEndian or pos + 8 > n:
        return out, spans
    implicit = ts == ImplicitVRLittleEndian if ts else not data[pos + 4:pos + 6].isalpha()
    little = ts != ExplicitVRBigEndian

    def walk(pos: int, end: int, implicit: bool, little: bool, depth: int, ancestors: tuple = ()) -> int:
        e = "<" if little else ">"
        while pos + 8 <= end and len(out) < limit:
            group, el = struct.unpack_from(e + "HH", data, pos)
            if (group, el) in ((0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)):
                out.append(Field("len", pos + 4, 4, little))
                return pos + 8
            out.append(Field("tag", pos, 4, little))
            vr = None
            if implicit or group == 0xFFFE:
                out.append(Field("len", pos + 4, 4, little))
                length, vstart = struct.unpack_from(e + "L", data, pos + 4)[0], pos + 8
            else:
                vr = data[pos + 4:pos + 6]
                out.append(Field("vr", pos + 4, 2, little))
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        return end
                    out.append(Field("len", pos + 8, 4, little))
                    length, vstart = struct.unpack_from(e + "L", data, pos + 8)[0], pos + 12
                else:
                    out.append(Field("len", pos + 6, 2, little))
                    length, vstart = struct.unpack_from(e + "H", data, pos + 6)[0], pos + 8
            tag = group << 16 | el
            inner = (*ancestors, (tag, vr))  # the ancestors of its items' elements
            items = vr == b"SQ" or length == 0xFFFFFFFF or data[vstart:vstart + 4] in (
                b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")
            if items and depth < 8:
                sub_implicit, sub_little = (True, True) if vr == b"UN" else (implicit, little)
                stop = end if length == 0xFFFFFFFF else min(end, vstart + length)
                p = vstart
                while p + 8 <= stop and len(out) < limit:  # items
                    g2, e2, ln = struct.unpack_from(("<" if sub_little else ">") + "HHL", data, p)
                    out.append(Field("tag", p, 4, sub_little))
                    out.append(Field("len", p + 4, 4, sub_little))
                    if (g2, e2) == (0xFFFE, 0xE0DD):
                        p += 8
                        break
                    if (g2, e2) != (0xFFFE, 0xE000):
                        spans.append(Span(tag, vr, vstart, stop, ancestors))
                        return end
                    if ln == 0xFFFFFFFF:
                        p = walk(p + 8, stop, sub_implicit, sub_little, depth + 1, inner)
                    else:
                        walk(p + 8, min(stop, p + 8 + ln), sub_implicit, sub_little, depth + 1, inner)
                        p += 8 + ln
                pos = p if length == 0xFFFFFFFF else vstart + length
                spans.append(Span(tag, vr, vstart, min(pos, n), ancestors))
            elif length == 0xFFFFFFFF:
                spans.append(Span(tag, vr, vstart, end, ancestors))
                return end
            else:
                spans.append(Span(tag, vr, vstart, min(n, vstart + length), ancestors))
                pos = vstart + length
        return pos

    try:
        walk(pos, n, implicit, little, 0)
    except struct.error:
        pass
    return out, spans


def fields(data: bytes) -> list[Field]:
    return scan(data)[0]


INTERESTING_LENGTHS = (0, 1, 2, 3, 7, 0xFF, 0xFFFE, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)
VR_CHOICES = (b"UN", b"SQ", b"OB", b"UT", b"LO", b"PN", b"UI", b"AT", b"OV", b"XX", b"ob", b"\x00\x00", b"  ")
GROUPS = (0x0000, 0x0002, 0x0008, 0x0009, 0x0010, 0x0020, 0x7FE0, 0xFFFE, 0xFFFF)

mutation_ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.one_of(
        st.binary(min_size=1, max_size=16),
        st.sampled_from([b"\xff\xff\xff\xff", b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0",
                         b"\x10\x00\x10\x00PN\x04\x00"]))),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 64)),
    st.tuples(st.just("duplicate"), st.integers(0, 2**31), st.integers(1, 256), st.integers(0, 2**31)),
    st.tuples(st.just("length"), st.integers(0, 2**31), st.one_of(
        st.sampled_from(INTERESTING_LENGTHS), st.integers(-16, 16).map(lambda d: ("delta", d)),
        st.integers(0, 2**32 - 1))),
    st.tuples(st.just("vr"), st.integers(0, 2**31), st.sampled_from(VR_CHOICES)),
    st.tuples(st.just("tag"), st.integers(0, 2**31), st.sampled_from(GROUPS), st.integers(0, 0xFFFF)),
)


def mutate(data: bytes, ops) -> bytes:
    """Apply ``ops`` in turn; boundary ops pick a field of the original structure."""
    fs = fields(data)
    buf = bytearray(data)
    for op in ops:
        kind, a = op[0], op[1]
        n = len(buf)
        if kind in ("length", "vr", "tag"):
            field_kind = "len" if kind == "length" else kind
            cands = [f for f in fs if f.kind == field_kind and f.offset + f.size <= n]
            if not cands:
                continue
            f = cands[a % len(cands)]
            fmt = ("<" if f.little else ">") + ("L" if f.size == 4 else "H")
            if kind == "length":
                old = struct.unpack_from(fmt, buf, f.offset)[0]
                new = old + op[2][1] if isinstance(op[2], tuple) else op[2]
                struct.pack_into(fmt, buf, f.offset, new % (1 << (8 * f.size)))
            elif kind == "vr":
                buf[f.offset:f.offset + 2] = op[2]
            else:
                struct.pack_into(("<" if f.little else ">") + "HH", buf, f.offset, op[2], op[3])
        elif n == 0:
            if kind == "insert":
                buf[:] = op[2]
        elif kind == "flip":
            buf[a % n] ^= op[2]
        elif kind == "truncate":
            del buf[a % n:]
        elif kind == "insert":
            buf[a % (n + 1):a % (n + 1)] = op[2]
        elif kind == "delete":
            del buf[a % n:a % n + op[2]]
        elif kind == "duplicate":
            start = a % n
            chunk = bytes(buf[start:start + op[2]])
            at = op[3] % (n + 1)
            buf[at:at] = chunk
    return bytes(buf)


# ------------------------------------------------------------------------------ the checks

@dataclass(frozen=True)
class Ctx:
    """What the checks of one input need to know."""

    cfg: PlanCfg
    absent: frozenset  # planted tokens that must not survive
    cs: Charset
    damaged: bool  # mutated: identifiers may have moved into elements kept by design
    be_un_sequence: bool = False  # big endian with a sequence written as UN (PS3.5 6.2.2 items)


def must_be_absent(planted, plan: Plan, priv_in_safe: bool) -> set[str]:
    """Planted tokens the configuration must remove (retention options keep some by design)."""
    absent = set(planted)
    if "retain_institution_identity" in plan.options:
        absent.discard(INST)
    if "retain_uids" in plan.options:
        absent.discard(UID)
    if plan.private_policy == "keep" or (plan.private_policy == "safe" and priv_in_safe):
        absent.discard(PRIV)
    return absent


def _mentions(text: str, tokens) -> list[str]:
    return [t for t in tokens if t in text]


def _decoded_text(ds: Dataset) -> list[str]:
    """Every element of ``ds`` decoded (the items of sequences too); the string values.  Private
    elements in implicit VR are decoded with pydicom's private dictionary, whose VR may not be
    the one they were written with: those may fail."""
    out = []
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except Exception:
            if tag.is_private:
                continue
            raise
        if elem.VR == "SQ":
            for item in elem.value:
                out += _decoded_text(item)
            continue
        v = elem.value
        for x in (v if isinstance(v, (list, MultiValue)) else [v]):
            if isinstance(x, (str, PersonName)):
                out.append(str(x))
    return out


def _kept_by_design(span: Span, plan: Plan) -> bool:
    """True when the configuration keeps the element's value as it is (K, C, an unlisted
    attribute kept, a kept private element, pixel data): where a damaged input may have moved
    an identifier without any defect of the de-identifier."""
    tag = span.tag
    group = tag >> 16
    if tag in (0x7FE00008, 0x7FE00009, 0x7FE00010):
        return True
    if group & 1:
        return plan.private_policy != "remove"
    if group == 0x0002:
        return False
    rule = plan.rule_for(tag)
    if rule is not None:
        return rule.action in ("K", "C")
    info = _dictionary(tag)
    if info is None:
        return False  # unknown public attribute: always removed
    dict_vr, keyword = info
    vr = span.vr.decode("latin-1") if span.vr and span.vr != b"UN" else dict_vr
    return vr not in ("SQ", "PN") and not (vr == "UI" and not keyword.endswith(("ClassUID", "SyntaxUID")))


def _dictionary(tag: int) -> tuple[str, str] | None:
    try:
        return pydicom.datadict.dictionary_VR(tag).split(" or ")[0], pydicom.datadict.dictionary_keyword(tag)
    except KeyError:
        return None


def leaks_in(raw: bytes, ctx: Ctx) -> tuple[list[str], set[str]]:
    """Planted identifiers found in ``raw``: (unexplained ones, ids of the known defects that
    explain the others).  For a damaged input those inside elements kept by design (see
    :func:`_kept_by_design`) do not count."""
    found, known = [], set()
    spans = scan(raw)[1]
    plan = ctx.cfg.plan()
    for t in sorted(ctx.absent):
        for b in token_encodings(t, ctx.cs):
            for m in re.finditer(re.escape(b), raw):
                inside = [sp for sp in spans if sp.vstart <= m.start() and m.end() <= sp.vend]
                where = min(inside, key=lambda sp: sp.vend - sp.vstart) if inside else None
                if where is not None and ctx.damaged and _kept_by_design(where, plan):
                    continue
                found.append(f"{t} at byte {m.start()}" + (
                    f" in ({where.tag >> 16:04X},{where.tag & 0xFFFF:04X})" if where else ""))
    return found, known


def check_output(raw: bytes, result, ctx: Ctx, again: bool = True) -> str | None:
    """Check one output; returns the id of a known defect it shows, else None (or fails)."""
    assert raw[128:132] == b"DICM", "output is not a Part-10 file"
    try:
        ds = pydicom.dcmread(io.BytesIO(raw))  # no force
        if ctx.damaged:  # kept values are copied as they are: from a damaged input, as damaged
            assert len(ds)  # (e.g. an unknown VR): the structure must read, values may not decode
        else:
            texts = _decoded_text(ds)  # every element, nested ones too, decodes
    except Exception:
        raise
    assert ds.file_meta.TransferSyntaxUID
    assert ds.get("PatientIdentityRemoved") == "YES"
    leaks, known = leaks_in(raw, ctx)
    assert not leaks, f"planted identifiers in the output: {leaks}"
    if not ctx.damaged and not known:
        decoded = sorted({t for t in ctx.absent for s in texts if t in s})
        assert not decoded, f"planted identifiers in the decoded output: {decoded}"
    actions = " ".join(f"{k}={v}" for k, v in result.actions.items())
    assert not _mentions(actions, ctx.absent), "identifier in the action record"
    bug = min(known) if known else None
    if again:  # a de-identified file is itself a valid input
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "out.dcm"
            path.write_bytes(raw)
            state, value = attempt(deidentify_file, path, ctx.cfg)
            if state == "ok":
                bug = check_output(value[1], value[0], ctx, again=False) or bug
            elif state == "quarantine":
                assert ctx.damaged, f"the output of an intact input is quarantined when read again: {value}"
                check_reason(value, ctx.absent)
            else:
                bug = bug or state
    return bug


def check_reason(exc: DicomError, absent) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, f"quarantine reason not one line: {msg!r}"
    assert not _mentions(msg, [*absent, *ALL_ASCII_TOKENS]), f"identifier in the quarantine reason: {msg!r}"


ENGINES = (("stream", deidentify_file), ("dataset", _deidentify_dataset))


# ------------------------------------------------------------------------------ known defects

def _frames(exc: BaseException, lines: bool = False):
    """(file name, function) - with ``lines``: (file name, function, source line) - of every
    frame the exception passed through, chained exceptions included."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            name = Path(code.co_filename).name
            if lines:
                yield name, code.co_name, linecache.getline(code.co_filename, tb.tb_lineno).strip()
            else:
                yield name, code.co_name
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__


def known_bug(exc: BaseException) -> str | None:
    """The id of a documented, still open defect that the escaped exception ``exc`` is, else None.
    All defects this fuzzer found are fixed (their regression tests are at the end of this module);
    a new one must be added here only together with a strict xfail regression test."""
    return None


def attempt(engine, path: Path, cfg: PlanCfg):
    """("ok", (result, bytes)) / ("quarantine", DicomError) / (known defect id, exception)."""
    out = io.BytesIO()
    try:
        result = engine(path, out, cfg.scrubber())
    except DicomError as exc:
        return "quarantine", exc
    except Exception as exc:
        bug = known_bug(exc)
        if bug is None:
            raise
        return bug, exc
    return "ok", (result, out.getvalue())


def exercise(data: bytes, ctx: Ctx, label: str) -> dict:
    """Run sniff, the header reader and both engines on ``data`` and check the invariant.
    Returns what happened per function: "ok", "quarantine" or a known defect id (the counts
    are hypothesis events: see ``--hypothesis-show-statistics``)."""
    outcome = {}
    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)  # pydicom logs every invalid value it meets
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = Path(tmp) / "in.dcm"
            src.write_bytes(data)
            assert isinstance(sniff.sniff(src), str)
            try:
                inventory.read_dicom_header(src)
                outcome["header"] = "ok"
            except DicomError as exc:
                check_reason(exc, ctx.absent)
                outcome["header"] = "quarantine"
            except OSError:
                outcome["header"] = "oserror"
            except Exception as exc:
                outcome["header"] = known_bug(exc)
                if outcome["header"] is None:
                    raise
            for name, engine in ENGINES:
                state, value = attempt(engine, src, ctx.cfg)
                if state == "ok":
                    state = check_output(value[1], value[0], ctx) or "ok"
                elif state == "quarantine":
                    check_reason(value, ctx.absent)
                outcome[name] = state
    finally:
        log.setLevel(level)
    if currently_in_test_context():
        for name, res in outcome.items():
            event(f"{label}: {name} {res}")
    return outcome


def run_case(data: bytes, ctx: Ctx, label: str) -> None:
    note(f"input ({len(data)} bytes, base64): "
         f"{base64.b64encode(data).decode() if len(data) <= 8000 else '(large)'}")
    note(f"plan: {ctx.cfg}")
    exercise(data, ctx, label)


# ------------------------------------------------------------------------------ property tests


@fuzz_settings(1300)
@given(case=cases(), cfg=plans())
def test_structured(case, cfg):
    """Generated data sets, every encoding and layout, random configurations."""
    data = encode(case)
    note(case.describe())
    absent = must_be_absent(case.planted, cfg.plan(), case.priv_in_safe)
    be_un = case.ts == ExplicitVRBigEndian and case.un_sequence
    run_case(data, Ctx(cfg, frozenset(absent), case.charset, False, be_un), "structured")


@fuzz_settings(2000)
@given(source=st.one_of(st.sampled_from(BUNDLED), cases()), ops=st.lists(mutation_ops, min_size=1, max_size=4),
       cfg=plans())
def test_mutation(source, ops, cfg):
    """Damaged files: the invariant holds whatever the bytes are."""
    if isinstance(source, str):
        base, planted, cs, priv_in_safe, be_un = bundled(source), BUNDLED_TOKENS, CHARSETS[0], False, False
        if source == "CT_small.dcm":
            cs = CHARSETS[1]
    else:
        base, planted, cs, priv_in_safe = encode(source), source.planted, source.charset, source.priv_in_safe
        be_un = source.ts == ExplicitVRBigEndian and source.un_sequence
        note(source.describe())
    data = mutate(base, ops)
    note(f"ops: {ops}")
    absent = must_be_absent(planted, cfg.plan(), priv_in_safe)
    run_case(data, Ctx(cfg, frozenset(absent), cs, True, be_un), "mutation")


# ------------------------------------------------------------------------------ fixed inputs


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("private", ["remove", "safe", "keep"])
def test_bundled_files_with_planted_identifiers(name, private):
    """The unmutated mutation bases de-identify cleanly in both engines."""
    cfg = PlanCfg(frozenset(), private, ())
    cs = CHARSETS[1] if name == "CT_small.dcm" else CHARSETS[0]
    ctx = Ctx(cfg, frozenset(must_be_absent(BUNDLED_TOKENS, cfg.plan(), False)), cs, False)
    assert exercise(bundled(name), ctx, name) == {"header": "ok", "stream": "ok", "dataset": "ok"}


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_leak_check_finds_every_planted_identifier_in_the_input(case):
    """The checker itself: run on the (undeflated) input, it finds every planted identifier."""
    if case.ts == DeflatedExplicitVRLittleEndian:
        case.ts = ExplicitVRLittleEndian
    ctx = Ctx(DEFAULT_PLAN, frozenset(case.planted), case.charset, damaged=False)
    found, _known = leaks_in(encode(case), ctx)
    assert {f.split(" at byte")[0] for f in found} == case.planted


@pytest.mark.parametrize("op", [("length", 3, 0xFFFFFFFF), ("length", 5, ("delta", 2)), ("vr", 7, b"XX"),
                                ("tag", 2, 0x0009, 0x1234)])
def test_boundary_mutations_change_the_field(op):
    """Each boundary operation rewrites exactly the bytes of one field of its kind."""
    data = bundled("MR_small.dcm")
    out = mutate(data, [op])
    diff = [i for i in range(len(data)) if data[i] != out[i]]
    assert len(out) == len(data) and diff
    kind = "len" if op[0] == "length" else op[0]
    assert any(f.kind == kind and f.offset <= diff[0] and diff[-1] < f.offset + f.size for f in fields(data))


def test_mutation_fields_cover_nested_items():
    """The boundary finder reaches length fields inside sequence items (so corruption does)."""
    data = bundled("CT_small.dcm")
    fs = fields(data)
    assert sum(f.kind == "len" for f in fs) > 50
    assert any(data[f.offset:f.offset + 4] == b"\xfe\xff\x00\xe0" for f in fs if f.kind == "tag")


# ------------------------------------------------------------------------------ regressions (defects found)
#
# Minimal inputs built byte by byte, so that each reproduction is exact.  Each was a defect the
# fuzzer found (escaped exception or leak); all are fixed and kept as regression tests.

_LONG = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV")
ITEM_DELIM = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


def _el(group: int, elem: int, vr: bytes, value: bytes, little: bool = True) -> bytes:
    """One explicit VR element, little or big endian."""
    e = "<" if little else ">"
    if vr in _LONG:
        return struct.pack(e + "HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack(e + "HH2sH", group, elem, vr, len(value)) + value


def _item(content: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + content + ITEM_DELIM
    return b"\xfe\xff\x00\xe0" + struct.pack("<L", len(content)) + content


def _part10(body: bytes, ts_vr: bytes = b"UI", ts: str = ExplicitVRLittleEndian) -> bytes:
    """Preamble, file meta (transfer syntax ``ts``, its element written with VR ``ts_vr``) and
    ``body``."""
    ts_value = ts.encode() + b"\x00" * (len(ts) % 2)
    meta = (_el(2, 1, b"OB", b"\x00\x01") + _el(2, 2, b"UI", CTImageStorage.encode() + b"\x00")
            + _el(2, 3, b"UI", f"{ROOT}.1.1".encode()) + _el(2, 0x10, ts_vr, ts_value))
    return b"\x00" * 128 + b"DICM" + _el(2, 0, b"UL", struct.pack("<L", len(meta))) + meta + body


# SOPClassUID and SOPInstanceUID: the least a data set needs to be de-identified
_SOP = _el(8, 0x16, b"UI", CTImageStorage.encode() + b"\x00") + _el(8, 0x18, b"UI", f"{ROOT}.1.1".encode())
_NAME = _el(0x10, 0x10, b"PN", NAME.encode())


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "in.dcm"
    path.write_bytes(data)
    return path


def _deid(engine: str, path: Path, cfg: PlanCfg = DEFAULT_PLAN) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dict(ENGINES)[engine](path, out, cfg.scrubber())
    return out.getvalue()


def _quarantined_or_clean(engine: str, path: Path, cfg: PlanCfg = DEFAULT_PLAN) -> None:
    """The invariant for one file: DicomError, or an output that reads and holds no name."""
    try:
        raw = _deid(engine, path, cfg)
    except DicomError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmread(io.BytesIO(raw))
    assert b"ZZFUZZNAME" not in raw


def test_regression_inputs_are_what_they_claim(tmp_path):
    """The helpers build readable files: the defects below come from the one damaged field."""
    data = _part10(_SOP + _el(8, 0x60, b"CS", b"CT") + _NAME)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.PatientName == NAME and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for engine in ("stream", "dataset"):
        _quarantined_or_clean(engine, _write(tmp_path, data))


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_unknown_vr_on_replaced_element(tmp_path, engine):
    """PatientName with the (alphabetic, upper-case, unknown) VR "XX": the stream engine raises
    NotImplementedError("write_data_element: unknown Value Representation 'XX'")."""
    path = _write(tmp_path, _part10(_SOP + _el(0x10, 0x10, b"XX", NAME.encode())))
    _quarantined_or_clean(engine, path)


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_replace_value_unencodable_in_file_charset(tmp_path, engine):
    """A ``replace`` override whose value the file's character set cannot encode (no
    SpecificCharacterSet, a CJK value): the stream engine raises UnicodeEncodeError."""
    path = _write(tmp_path, _part10(_SOP + _el(8, 0x60, b"CS", b"CT")))
    _quarantined_or_clean(engine, path, PlanCfg(frozenset(), None, (("Modality", "replace", "名前"),)))


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_uid_action_on_sequence_encoded_as_ob(tmp_path, engine):
    """ReferencedImageSequence (U under the basic profile) written with VR OB, holding one item:
    the stream engine raises TypeError("a bytes-like object is required, not 'MultiValue'")."""
    path = _write(tmp_path, _part10(_SOP + _el(8, 0x1140, b"OB", _item(_NAME))))
    _quarantined_or_clean(engine, path)


@pytest.mark.parametrize("function", ["deidentify_file", "read_dicom_header"])
def test_regression_transfer_syntax_with_unknown_vr(tmp_path, function):
    """(0002,0010) TransferSyntaxUID written with VR "XX" instead of UI."""
    path = _write(tmp_path, _part10(_SOP + _NAME, ts_vr=b"XX"))
    try:
        if function == "deidentify_file":
            _deid("stream", path)
        else:
            inventory.read_dicom_header(path)
    except DicomError:
        pass


_SCRUB_DECODE = (
    "BUG scrub-decode-uncaught: both engines turn only ValueError, TypeError and KeyError raised "
    "while the Scrubber decodes values into a DicomError; pydicom also raises NotImplementedError "
    "(unknown VR) and OSError (damaged nested items), which escape")


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_uid_with_unknown_vr(tmp_path, engine):
    """(0020,000D) StudyInstanceUID (action U) written with VR "XX" instead of UI."""
    path = _write(tmp_path, _part10(_SOP + _NAME + _el(0x20, 0x0D, b"XX", UID.encode())))
    _quarantined_or_clean(engine, path)


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_empty_dummy_element_with_unknown_vr(tmp_path, engine):
    """(0008,0021) SeriesDate (action D, which leaves an empty value empty), empty, VR "XX"."""
    path = _write(tmp_path, _part10(_SOP + _el(8, 0x21, b"XX", b"")))
    _quarantined_or_clean(engine, path)


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_damaged_nested_sequence_delimiter(tmp_path, engine):
    """ReferencedImageSequence (defined length) > item (undefined length) > SourceImageSequence
    (undefined length) whose sequence delimiter reads (FFFF,E0DD) instead of (FFFE,E0DD)."""
    nested = struct.pack("<HH2sHL", 8, 0x2112, b"SQ", 0, 0xFFFFFFFF) + b"\xff\xff\xdd\xe0\x00\x00\x00\x00"
    path = _write(tmp_path, _part10(_SOP + _el(8, 0x1140, b"SQ", _item(nested, undefined=True))))
    _quarantined_or_clean(engine, path)


def test_regression_charset_with_wrong_vr_makes_output_unreadable(tmp_path):
    """(0008,0005) SpecificCharacterSet "ISO_IR 100" written with VR AT instead of CS."""
    path = _write(tmp_path, _part10(_el(8, 5, b"AT", b"ISO_IR 100") + _SOP + _NAME))
    _quarantined_or_clean("stream", path)


@pytest.mark.parametrize("engine", ["stream", "dataset"])
@pytest.mark.parametrize("keyword, tag, options", [
    ("DerivationCodeSequence", 0x9215, frozenset()),
    ("ReferencedImageSequence", 0x1140, frozenset({"retain_uids"})),
])
def test_regression_kept_sequence_encoded_as_ob_leaks_nested_name(tmp_path, engine, keyword, tag, options):
    """The sequence written with VR OB, one item holding PatientName."""
    path = _write(tmp_path, _part10(_SOP + _el(8, tag, b"OB", _item(_NAME))))
    _quarantined_or_clean(engine, path, PlanCfg(options, None, ()))


@pytest.mark.parametrize("layout", ["part10-dataset-engine", "bare"])
def test_regression_sop_class_uid_with_unknown_vr(tmp_path, layout):
    """(0008,0016) SOPClassUID written with VR "TI" instead of UI (one flipped bit)."""
    body = (_el(8, 8, b"CS", b"ORIGINAL")  # a valid first element: pydicom guesses the encoding from it
            + _el(8, 0x16, b"TI", CTImageStorage.encode() + b"\x00")
            + _el(8, 0x18, b"UI", f"{ROOT}.1.1".encode()) + _NAME)
    if layout == "bare":  # no preamble, no file meta: deidentify_file uses the dataset engine
        _quarantined_or_clean("stream", _write(tmp_path, body))
    else:
        _quarantined_or_clean("dataset", _write(tmp_path, _part10(body)))


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_regression_un_sequence_in_big_endian_file_leaks_nested_name(tmp_path, engine):
    """SourceImageSequence (0008,2112) as UN, defined length, one item with PatientName."""
    item = _item(struct.pack("<HHL", 0x10, 0x10, len(NAME)) + NAME.encode())  # implicit VR LE
    body = (_el(8, 0x16, b"UI", CTImageStorage.encode() + b"\x00", little=False)
            + _el(8, 0x18, b"UI", f"{ROOT}.1.1".encode(), little=False)
            + _el(8, 0x2112, b"UN", item, little=False))
    _quarantined_or_clean(engine, _write(tmp_path, _part10(body, ts=ExplicitVRBigEndian)))
