"""DICOM de-identification rules: the PS3.15 profile applied to a data set.

:class:`Scrubber` walks a pydicom data set (and its sequences, to any depth), applies the
resolved :class:`~deidflow.profile.Plan` to every element and marks the data set as
de-identified.  Reading and writing files, with pixel data streamed untouched, lives in
:mod:`deidflow.dicomio`.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_keyword, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from . import __version__, dates, textclean, vendorblobs
from .profile import Plan, Rule, method_codes
from .sidecar import AGE_CAP_YEARS, over_age_cap
from .pseudonym import Pseudonymizer

if TYPE_CHECKING:
    from .qc.identifiers import IdentifierCollector, IdentifierModel

_TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE", "UR"}
# Values the residual sweep searches: every VR that holds characters other than numbers, dates and UIDs.
SWEEP_VRS = frozenset(("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"))
_CODE_VRS = frozenset(("CS", "AE", "UR"))  # "*" is not a valid character there
_PLAIN_TEXT_VRS = frozenset(("CS", "LO", "SH", "LT", "ST", "UT", "UC"))
_BINARY_VRS = frozenset(("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"))


@lru_cache(maxsize=1)
def _identifying_tags() -> tuple[tuple[int, str], ...]:
    """(tag, VR) of every public non-sequence attribute whose values identify (see
    :func:`deidflow.qc.identifiers.element_kind`)."""
    from pydicom.datadict import DicomDictionary
    from .qc.identifiers import SWEEP_KINDS, element_kind
    out = []
    for tag, entry in DicomDictionary.items():
        vr = entry[0].split(" or ")[0]
        if not (tag >> 16) & 1 and vr != "SQ" and element_kind(tag, vr)[0] in SWEEP_KINDS:
            out.append((tag, vr))
    return tuple(out)


def source_tags(plan: Plan) -> frozenset[int]:
    """The top-level attributes whose original values feed a subject's identifier model: those
    that identify a person, study, institution or device (and dates) and that the profile with
    its options does not keep (a value the profile keeps is not an identifier to be swept).  A
    user's ``keep`` override does not take a value out of the model (``plan.user_kept``): a kept
    PatientName is swept like any other kept value holding the name, a kept birth date is found by
    the leak scan.  Cached on the plan."""
    cached = plan.__dict__.get("_source_tags")
    if cached is None:
        out = set()
        for tag, vr in _identifying_tags():
            rule = plan.rule_for(tag)
            if (rule is None and vr == "PN") or (rule is not None and rule.action != "K") or tag in plan.user_kept:
                out.add(tag)
        from .qc.identifiers import element_kind
        for tag in plan.user_kept:  # a kept UID too: not swept, but searched by the leak scan
            info = _dict_info(tag)
            if info is not None and info[0] != "SQ" and element_kind(tag, info[0])[0] is not None:
                out.add(tag)
        cached = plan.__dict__["_source_tags"] = frozenset(out)
    return cached


@dataclass
class SubjectContext:
    """Everything the engine needs to know about the subject a file belongs to."""

    pseudo: Pseudonymizer
    subject: str
    date_offset: int
    uid_map: dict[str, str] = field(default_factory=dict)  # original -> new, for restricted/mapping
    # Original values the profile removes or replaces, for the leak scan (restricted); None: not collected.
    identifiers: "IdentifierCollector | None" = None
    # The subject's identifier model: what the residual sweep removes from every kept value.
    model: "IdentifierModel" = field(default_factory=lambda: _new_model())


def _new_model() -> "IdentifierModel":
    from .qc.identifiers import IdentifierModel
    return IdentifierModel()


# A UID embedded in binary or text: at least six numeric components, not part of a longer number.
# A UID inside a binary value: six or more numeric components, or three or more (UUID-derived
# "2.25.<n>" has three) in at least EMBEDDED_UID_MIN characters, so version strings such as "4.2.2"
# stay as they are.
BLOB_CACHE_MIN, _BLOB_CACHE_ENTRIES = 1024, 64  # Scrubber.clean_private: values this large, per subject
_UNCHANGED = object()
_EMBEDDED_UID = re.compile(rb"(?<![0-9.])(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*)){2,}(?![0-9.])")
EMBEDDED_UID_MIN = 16


def is_embedded_uid(text: str) -> bool:
    """Whether a dotted number found in a binary value is taken for a UID (see _EMBEDDED_UID)."""
    return text.count(".") >= 5 or len(text) >= EMBEDDED_UID_MIN


def looks_like_items(value) -> bool:
    """True when an unknown-VR value starts with a sequence item tag (FFFE,E000), little endian."""
    return isinstance(value, (bytes, bytearray)) and value[:4] == b"\xfe\xff\x00\xe0"


@lru_cache(maxsize=4096)
def _dict_info(tag: int) -> tuple[str, str] | None:
    """(VR, keyword) of a public tag from the data dictionary, None when unknown."""
    try:
        return dictionary_VR(tag), dictionary_keyword(tag)
    except KeyError:
        return None


def _tag_label(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# Dates and times PS3.15 does not list (ExpiryDate, SecondaryReviewDate, StudyUpdateDateTime…) are
# handled like the acquisition's: removed, shifted under retain_long_modified_dates, kept under
# retain_long_full_dates.
_DATE_PROXIES = {"DA": 0x00080022, "DT": 0x0008002A, "TM": 0x00080032}


class Scrubber:
    """Apply a :class:`Plan` to datasets of one subject (reusable across that subject's files)."""

    def __init__(self, plan: Plan, ctx: SubjectContext):
        self.plan = plan
        self.ctx = ctx
        self.shift_dates = "retain_long_modified_dates" in plan.options
        self.model = ctx.model
        self.source_tags = source_tags(plan)
        self.seen_sources: set = set()  # identifying values (raw) already in the model (streaming path)
        self._markers: Dataset | None = None
        self.actions: dict[str, str] = {}
        self.collect = ctx.identifiers  # deidflow.qc.identifiers.IdentifierCollector or None
        if self.collect is not None and "retain_uids" in plan.options:
            self.collect.uids = False  # the UIDs are released as they are: none is searched for
        self._blobs: dict[tuple, object] = {}  # clean_private's results for large values

    # -- public -------------------------------------------------------------------------------
    def scrub(self, ds: Dataset) -> dict[str, str]:
        """De-identify ``ds`` in place; return the actions taken (attribute path -> code)."""
        self.begin(ds)
        self._walk(ds, "")
        self._mark(ds)
        return self.actions

    # -- walking ------------------------------------------------------------------------------
    def _walk(self, ds: Dataset, prefix: str) -> None:
        creators: dict[int, str] = {}  # (group << 8 | block) -> creator
        kept_blocks: set[int] = set()
        for btag in list(ds.keys()):
            tag = int(btag)
            group, elem = tag >> 16, tag & 0xFFFF
            if group & 1:
                self._private(ds, tag, group, elem, creators, kept_blocks, prefix)
            elif elem == 0 or group == 0x0002:
                del ds[tag]  # group lengths (recomputed) and misplaced file meta
            elif self._malformed(ds, tag):
                del ds[tag]
                self._record(prefix, _tag_label(tag), "X")
            else:
                rule = self.plan.rule_for(tag)
                if rule is None:
                    self._unlisted(ds, tag, prefix)
                else:
                    self._apply(ds, tag, rule, prefix)
                self.sweep_element(ds, tag, prefix)
        for key in set(creators) - kept_blocks:  # creators whose block lost every element
            ctag = ((key >> 8) << 16) | (key & 0xFF)
            if ctag in ds:
                del ds[ctag]

    def _private(self, ds, tag, group, elem, creators, kept_blocks, prefix) -> None:
        policy = self.plan.private_policy
        if 0x10 <= elem <= 0xFF:
            if policy != "remove":
                creators[(group << 8) | elem] = str(ds[tag].value or "").strip()
                return  # kept for now; dropped at the end if its block keeps nothing
            del ds[tag]
            self._record(prefix, _tag_label(tag), "X")
            return
        block = (group << 8) | (elem >> 8)
        creator = creators.get(block) if elem >= 0x1000 else None
        keep = creator is not None and (
            policy == "keep" or (policy == "safe" and self.plan.is_safe_private(creator, group, elem)))
        if not keep:
            if self.collect is not None:
                self._collect(ds, tag)
            del ds[tag]
            self._record(prefix, _tag_label(tag), "X")
            return
        kept_blocks.add(block)
        vr = self._vr(ds, tag)
        if vr == "UN":
            raw = ds.get_item(tag)
            vr = self.plan.private_vr(creator, tag) or (
                "SQ" if looks_like_items(getattr(raw, "value", None)) else "UN")
            if vr == "SQ" and getattr(raw, "is_raw", False):
                ds[tag] = raw._replace(VR="SQ")  # implicit VR: parse it as the sequence it is
        if vr == "SQ":  # public attributes nested in a kept private sequence
            self._recurse(ds, tag, prefix + _tag_label(tag))
            return
        raw = ds.get_item(tag)
        if getattr(raw, "is_raw", False) and raw.value:
            new = self.clean_private(creator, tag, raw.value)
            if new is not raw.value:
                ds[tag] = raw._replace(value=new)
                self._record(prefix, _tag_label(tag), "C")

    def _unlisted(self, ds: Dataset, tag: int, prefix: str) -> None:
        """Attributes the profile does not list: kept, with four conservative exceptions."""
        info = _dict_info(tag)
        if info is None:
            del ds[tag]  # unknown public attribute: its meaning (and content) cannot be judged
            self._record(prefix, _tag_label(tag), "X")
            return
        vr, keyword = info
        raw_vr = self._vr(ds, tag)
        if raw_vr == "SQ":
            self._recurse(ds, tag, prefix + keyword)
        elif raw_vr == "PN":
            self._apply(ds, tag, Rule("Z", keyword), prefix)
        elif raw_vr == "UI" and not keyword.endswith(("ClassUID", "SyntaxUID")):
            self._apply(ds, tag, Rule("U", keyword), prefix)
        elif raw_vr in _DATE_PROXIES:  # a date or time: as the acquisition's (options included)
            self._apply(ds, tag, Rule(self.plan.rule_for(_DATE_PROXIES[raw_vr]).action, keyword), prefix)

    def _apply(self, ds: Dataset, tag: int, rule: Rule, prefix: str) -> None:
        code = rule.action
        name = self._name(tag, rule)
        if code == "K":
            if self._vr(ds, tag) == "SQ":
                self._recurse(ds, tag, prefix + name)
            return
        if code == "X":
            if self.collect is not None:
                self._collect(ds, tag)
            del ds[tag]
            self._record(prefix, name, "X")
            return
        vr = self._vr(ds, tag)
        if self.collect is not None and vr != "SQ" and code in ("Z", "P", "R", "D", "C"):
            original = self._original(ds, tag)
        if vr == "SQ":
            if code == "Z":
                if self.collect is not None:
                    self._collect(ds, tag)
                ds[tag] = DataElement(tag, "SQ", Sequence([]))
                self._record(prefix, name, "Z")
            elif code in ("D", "P", "R"):  # dummy items: the structure, none of the original values
                if self.collect is not None:
                    self._collect(ds, tag)
                ds[tag] = DataElement(tag, "SQ", Sequence([self._dummy_item(i) for i in ds[tag].value or ()]))
                self._record(prefix, name, "D")
            else:  # U, C on a sequence: keep its structure, de-identify every item
                if code == "C":  # an SR text item may name an observer of a later item
                    self._names_to_model(ds[tag].value or ())
                self._recurse(ds, tag, prefix + name)
            return
        if code in ("Z", "P", "R"):
            self._set(ds, tag, vr, self.new_value(code, vr, rule))
        elif code == "D":
            if self._is_empty(ds, tag):
                return
            if vr == "UI":
                return self._apply(ds, tag, Rule("U", rule.name), prefix)
            self._set(ds, tag, vr, self.new_value(code, vr, rule))
        elif code == "U":
            if not self._replace_uids(ds, tag):
                return
        elif code == "C":
            if not self._clean(ds, tag, vr):
                return
        if self.collect is not None and code in ("Z", "P", "R", "D", "C"):
            self.collect.element(tag, vr, original)
        self._record(prefix, name, code)

    def new_value(self, code: str, vr: str, rule: Rule) -> str | None:
        """The value written by Z, P, R and D, none of which depends on the original value."""
        if code == "Z":
            return None
        if code == "P":
            return self.ctx.subject
        if code == "R":
            return rule.value
        return self.plan.dummy.get(vr)

    def map_uid(self, value: str) -> str:
        """The keyed replacement of one UID; registered (well-known) UIDs stay as they are."""
        v = value.strip("\x00 ")
        if not v or v in UID_dictionary:
            return v
        new = self.ctx.pseudo.uid(v)
        self.ctx.uid_map[v] = new
        if self.collect is not None:
            self.collect.add("uid", "UID", v)
        return new

    def scrub_blob(self, value: bytes) -> bytes:
        """Replace UIDs embedded in a kept private value (e.g. the Siemens CSA protocol's
        reference-image UIDs, which also carry the device serial number) by keyed UIDs of the
        same length, so binary offsets stay valid.  Returns ``value`` itself when nothing changed."""
        if not _EMBEDDED_UID.search(value):
            return value

        def replace(m: re.Match) -> bytes:
            uid = m.group().decode("ascii")
            if not is_embedded_uid(uid):
                return m.group()
            if self.collect is not None:
                self.collect.add("uid", "embedded UID", uid)
            return self.ctx.pseudo.same_length_uid(uid).encode("ascii")
        return _EMBEDDED_UID.sub(replace, value)

    def clean_private(self, creator: str, tag: int, value: bytes, swept: bool = True) -> bytes:
        """A kept private value: embedded UIDs keyed, vendor blobs cleaned (:mod:`deidflow.vendorblobs`)
        and, unless ``swept`` is False (the caller knows it holds no identifier), the residual sweep.
        Returns ``value`` itself when nothing changed.

        Every file of a series repeats the same large blobs (Siemens CSA series header 120 kB, XA
        protocol): a large value is cleaned once per subject and identifier model (the model only
        grows, so its size tells its state); what cleaning records, the embedded UIDs, is recorded
        on the first time."""
        key = None
        if len(value) >= BLOB_CACHE_MIN:
            key = (creator, tag, swept, len(self.model.entries), hashlib.blake2b(value, digest_size=20).digest())
            hit = self._blobs.get(key)
            if hit is not None:
                return value if hit is _UNCHANGED else hit
        new = self._clean_private(creator, tag, value, swept)
        if key is not None:
            if len(self._blobs) >= _BLOB_CACHE_ENTRIES:
                self._blobs.clear()
            self._blobs[key] = _UNCHANGED if new is value else new
        return new

    def _clean_private(self, creator: str, tag: int, value: bytes, swept: bool) -> bytes:
        new = self.scrub_blob(value)
        key = (creator.strip(), tag >> 16, tag & 0xFF)
        if key == vendorblobs.GE_PDB or key == vendorblobs.GE_USER_DATA or key in vendorblobs.SIEMENS_CSA:
            # a compressed block (GE's) is cleaned inside: its embedded UIDs keyed too
            new = vendorblobs.clean(key, bytes(new), lambda text: self.model.redact(self.scrub_blob(text)),
                                    keep_characteristics="retain_patient_characteristics" in self.plan.options)
        if swept:
            new = self.sweep_blob(new)
        return value if new == value else new

    def sweep_blob(self, value: bytes) -> bytes:
        """A kept private value with the subject's identifiers replaced by ``*`` of the same length
        (binary offsets stay valid); ``value`` itself when none is found."""
        new = self.model.redact(bytes(value))
        return value if new == value else new

    def sweep_element(self, ds: Dataset, tag: int, prefix: str = "") -> None:
        """The residual sweep of one kept public element: the subject's identifiers (in any written
        form, see :class:`deidflow.qc.identifiers.Matcher`) are replaced wherever they remain."""
        if tag not in ds or not self.model.entries:
            return
        vr = self._vr(ds, tag)
        if vr not in SWEEP_VRS:
            return
        try:
            elem = ds[tag]
            value = elem.value
        except Exception:
            return
        if value in (None, "", b""):
            return
        multi = isinstance(value, (list, tuple, MultiValue))
        parts = [str(p) for p in (value if multi else [value])]
        fill = "X" if vr in _CODE_VRS else "*"
        new = [self.model.redact_text(p, fill) for p in parts]
        if new != parts:
            elem.value = new if multi else new[0]
            info = _dict_info(tag)
            self._record(prefix, info[1] if info and info[1] else _tag_label(tag), "C")

    def _dummy_item(self, item: Dataset) -> Dataset:
        """An item with the structure of ``item`` and no original value: text, names, dates and
        numbers become the VR's dummy, UIDs keyed UIDs, coded strings (CS) stay (swept), nested
        sequences dummy items; private and unknown elements go."""
        out = Dataset()
        for elem in _safe_elements(item):
            tag = int(elem.tag)
            if (tag >> 16) & 1 or not tag & 0xFFFF or _dict_info(tag) is None:
                continue
            vr = elem.VR
            try:
                value = elem.value
            except Exception:
                continue
            if vr == "SQ":
                out[tag] = DataElement(tag, "SQ", Sequence([self._dummy_item(i) for i in value or ()]))
            elif value in (None, "", b"") or vr in _BINARY_VRS:
                out[tag] = DataElement(tag, vr, value if value in (None, "", b"") else value)
            elif vr == "UI":
                vals = value if isinstance(value, (list, MultiValue)) else [value]
                out[tag] = DataElement(tag, vr, [self.map_uid(str(v)) for v in vals] if len(vals) > 1
                                       else self.map_uid(str(vals[0])))
            elif vr == "CS":
                out[tag] = DataElement(tag, vr, value)
                self.sweep_element(out, tag)
            elif vr in self.plan.dummy:
                out[tag] = DataElement(tag, vr, self.plan.dummy[vr])
        return out

    def _names_to_model(self, items) -> None:
        """The person names the profile does not keep, in ``items`` at any depth, into the sweep.
        Only PN and SQ elements are decoded: a private value still raw is cleaned as bytes later
        (:meth:`_private`), which a decoded one would escape."""
        for item in items:
            for tag in list(item.keys()):
                try:
                    if tag.is_private:
                        continue
                    vr = getattr(item.get_item(tag), "VR", None) or (_dict_info(int(tag)) or ("",))[0]
                    if vr not in ("SQ", "PN"):
                        continue
                    elem = item[tag]
                    if elem.VR == "SQ":
                        self._names_to_model(elem.value or ())
                    elif elem.VR == "PN":
                        rule = self.plan.rule_for(int(tag))
                        if rule is None or rule.action != "K":
                            self.model.add_element(int(tag), "PN", elem.value)
                except Exception:  # an undecodable value: removed by the profile, nothing to sweep for
                    continue

    def _recurse(self, ds: Dataset, tag: int, path: str) -> None:
        for i, item in enumerate(ds[tag].value or ()):
            self._walk(item, f"{path}[{i}].")

    # -- actions ------------------------------------------------------------------------------
    def _replace_uids(self, ds: Dataset, tag: int) -> bool:
        elem = ds[tag]
        vals = elem.value
        if not vals:
            return False
        multi = not isinstance(vals, str)
        out = [self.map_uid(str(v)) for v in (vals if multi else [vals])]
        elem.value = out if multi else out[0]
        return True

    def _clean(self, ds: Dataset, tag: int, vr: str) -> bool:
        elem = ds[tag]
        value = elem.value
        if value in (None, "", b""):
            return False
        if vr in ("DA", "DT"):  # cleaning a date = shifting it by the patient's offset
            try:
                elem.value = dates.shift(str(value) if isinstance(value, str) else "\\".join(map(str, value)),
                                         vr, self.ctx.date_offset)
            except dates.DateError:
                elem.value = self.plan.dummy[vr]  # unparseable: cannot be shifted, so replaced
            return True
        if vr == "TM":
            if self.shift_dates:
                return False  # whole-day shifts keep the time of day (Modified Dates option)
            elem.value = self.plan.dummy["TM"]
            return True
        if vr == "PN":
            elem.value = self.plan.dummy["PN"]
            return True
        if vr == "UI":
            return self._replace_uids(ds, tag)
        if vr == "AS":  # an age over 89 years is an identifier (HIPAA Safe Harbor): 090Y
            if over_age_cap(value or ""):
                elem.value = f"{AGE_CAP_YEARS:03d}Y"
                return True
            return False
        if vr in _TEXT_VRS:
            parts = [value] if isinstance(value, str) else list(value)
            self.model.add_element(tag, vr, value)  # an identifying attribute cleaned: its own value
            cleaned = [textclean.clean_text(self.model.redact_text(str(p))) for p in parts]
            if vr in ("SH", "CS", "AE"):
                cleaned = [c[:16] for c in cleaned]
            elem.value = cleaned[0] if isinstance(value, str) else cleaned
            return cleaned != [str(p) for p in parts]
        return False

    def _mark(self, ds: Dataset) -> None:
        """Record what was done in the data set itself (PS3.15 E.1.1, PS3.3 C.12.1)."""
        for elem in self.marker_dataset():
            ds[elem.tag] = copy.deepcopy(elem)

    def marker_dataset(self) -> Dataset:
        """PatientIdentityRemoved, DeidentificationMethod(CodeSequence) and
        LongitudinalTemporalInformationModified for this plan (built once)."""
        if self._markers is None:
            m = Dataset()
            m.PatientIdentityRemoved = "YES"
            m.DeidentificationMethod = [f"deidflow {__version__}"[:64], "PS3.15 2024b E.1-1 Basic Profile",
                                        f"private attributes: {self.plan.private_policy}"]
            seq = []
            for value, meaning in method_codes(self.plan):
                item = Dataset()
                item.CodeValue = value
                item.CodingSchemeDesignator = "DCM"
                item.CodeMeaning = meaning
                seq.append(item)
            m.DeidentificationMethodCodeSequence = seq
            if "retain_long_full_dates" in self.plan.options:
                m.LongitudinalTemporalInformationModified = "UNMODIFIED"
            elif self.shift_dates:
                m.LongitudinalTemporalInformationModified = "MODIFIED"
            else:
                m.LongitudinalTemporalInformationModified = "REMOVED"
            self._markers = m
        return self._markers

    def begin(self, identifier_source: Dataset | None) -> None:
        """Start a new file: reset the action record; add the file's identifying values (top-level
        elements :data:`source_tags`, still original in ``identifier_source``) to the subject's model."""
        self.actions = {}
        if identifier_source is None:
            return
        for tag in self.source_tags.intersection(int(t) for t in identifier_source.keys()):
            try:
                elem = identifier_source[tag]
                self.model.add_element(tag, elem.VR, elem.value)
                if self.collect is not None and tag in self.plan.user_kept:
                    self.collect.element(tag, elem.VR, elem.value)  # searched for by the leak scan too
            except Exception:  # an undecodable value: removed by the profile, nothing to sweep for
                continue

    def fast_action(self, tag: int, vr: str | None) -> str | None:
        """``K`` or ``X`` when a public element can be kept or dropped without decoding it,
        else None (the element must go through :meth:`apply_to`)."""
        if vr is not None and vr != "UN" and self.vr_mismatch(tag, vr):
            return "X"
        rule = self.plan.rule_for(tag)
        if rule is None:
            info = _dict_info(tag)
            if info is None:
                return "X"
            vr = vr or info[0]
            if vr in ("SQ", "PN", "UN") or vr in _DATE_PROXIES or (
                    vr == "UI" and not info[1].endswith(("ClassUID", "SyntaxUID"))):
                return None
            return "K"
        if rule.action == "X":
            return "X"
        if rule.action == "K" and vr not in ("SQ", "UN", None):
            return "K"
        return None

    def _malformed(self, ds: Dataset, tag: int) -> bool:
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        return vr not in (None, "UN") and self.vr_mismatch(tag, vr)

    @staticmethod
    def vr_mismatch(tag: int, vr: str) -> bool:
        """True when a public element is encoded with a VR its dictionary entry does not allow
        (e.g. a sequence written as OB): its content cannot be judged, so it is removed.  Text
        written with another text VR (Siemens XA writes the SR's Type 1 CompletionFlag, a CS, as
        LO) is not a mismatch: it is judged (and swept) as the text it is."""
        info = _dict_info(tag)
        if info is None:
            return False
        allowed = info[0].split(" or ")
        return vr not in allowed and not (vr in _PLAIN_TEXT_VRS and allowed[0] in _PLAIN_TEXT_VRS)

    def apply_to(self, ds: Dataset, tag: int) -> None:
        """Apply the plan to the public element ``tag`` of ``ds`` (decoding it as needed)."""
        rule = self.plan.rule_for(tag)
        if rule is None:
            self._unlisted(ds, tag, "")
        else:
            self._apply(ds, tag, rule, "")
        self.sweep_element(ds, tag)

    def record_drop(self, tag: int) -> None:
        """Record that top-level element ``tag`` was removed without decoding it."""
        self.record_change(tag, "X")

    def record_change(self, tag: int, code: str) -> None:
        """Record action ``code`` on top-level element ``tag`` (streaming path)."""
        info = None if (tag >> 16) & 1 else _dict_info(tag)
        self._record("", info[1] if info and info[1] else _tag_label(tag), code)

    def recurse_private(self, ds: Dataset, tag: int) -> None:
        """Apply the profile to public attributes nested in a kept private sequence."""
        self._recurse(ds, tag, _tag_label(tag))

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _vr(ds: Dataset, tag: int) -> str:
        """The element's VR: as encoded, else (implicit VR or UN) from the data dictionary."""
        raw = ds.get_item(tag)
        vr = raw.VR if raw is not None else None
        if vr is None or (vr == "UN" and not (tag >> 16) & 1):
            info = _dict_info(tag)
            if info is not None:
                vr = info[0].split(" or ")[0]
        if vr is None or vr == "UN":
            undefined = raw is not None and getattr(raw, "is_undefined_length", False)
            return "SQ" if undefined else "UN"
        return vr

    @staticmethod
    def _original(ds: Dataset, tag: int):
        """The decoded value of an element, None when it cannot be decoded."""
        try:
            return ds[tag].value
        except Exception:
            return None

    def _collect(self, ds: Dataset, tag: int) -> None:
        """Hand the original value(s) of an element about to be removed to the collector."""
        vr = self._vr(ds, tag)
        try:
            if vr == "SQ":
                for item in ds[tag].value or ():
                    self.collect.dataset(item)
            else:
                self.collect.element(tag, vr, ds[tag].value)
        except Exception:  # an undecodable value cannot be searched for; removing it is what matters
            pass

    @staticmethod
    def _is_empty(ds: Dataset, tag: int) -> bool:
        raw = ds.get_item(tag)
        return raw is None or raw.value in (None, b"", "", [])

    @staticmethod
    def _set(ds: Dataset, tag: int, vr: str, value) -> None:
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            value = None if value in ("", None) else (0 if vr not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") else b"")
        ds[tag] = DataElement(tag, vr, value)

    def _record(self, prefix: str, name: str, code: str) -> None:
        self.actions[prefix + name] = code

    @staticmethod
    def _name(tag: int, rule: Rule) -> str:
        info = None if (tag >> 16) & 1 else _dict_info(tag)
        return info[1] if info and info[1] else rule.name


def _safe_elements(ds: Dataset):
    for tag in list(ds.keys()):
        try:
            yield ds[tag]
        except Exception:
            continue
