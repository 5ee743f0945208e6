"""Original identifying values seen while de-identifying: collected by the stages, kept in the
restricted folder, searched for by the leak scan (:mod:`deidflow.qc.leakscan`).

A stage writes one file per subject, ``restricted/work/<unit>/identifiers/<stage>/<subject>.json``::

    {"subject": "sub-X", "stage": "dicom", "values": [["name", "PatientName", "DOE^JOHN"], ...]}

Each value is ``[kind, field, value]``; ``kind`` is one of :data:`KINDS` and decides how the value is
searched (names are split into parts, dates are searched in their common textual forms, …).
The DICOM engine fills an :class:`IdentifierCollector` while it scrubs (only values the profile
removes or replaces, so a value the profile keeps is never reported as a leak); the non-DICOM
formats return ``ScrubResult.identifiers`` (field -> value), which :func:`from_fields` classifies.
Original file and folder names are read from the unit's manifest at scan time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir
from .folding import (DATE_CHARS, FOLD_EXTRA, base64_views, compressed_views, fold_accents, legacy_views,
                      script_views, utf16_views, wide_space_views)

KINDS = ("name", "date", "datetime", "time", "uid", "id", "path")
IDENTIFIERS_DIR = "identifiers"
# Text attributes (besides every PN, DA, DT, TM and UI) whose removed or replaced values identify a
# person, a place or an encounter.  Descriptions and comments are not listed: what identifies in
# them is a name, ID or date, which is searched for in its own right.
ID_KEYWORDS = frozenset((
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
    "PatientTelecomInformation", "MedicalRecordLocator", "MilitaryRank", "BranchOfService",
    "RegionOfResidence", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "StationName", "StationAETitle", "PerformedStationAETitle", "ScheduledStationAETitle",
    "PerformedStationName", "ScheduledStationName", "PerformedLocation", "ScheduledProcedureStepLocation",
    "DeviceSerialNumber", "DeviceUID", "DetectorID", "GantryID", "AccessionNumber", "StudyID",
    "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequestRetired", "FillerOrderNumberImagingServiceRequestRetired",
    "AdmissionID", "IssuerOfAdmissionID", "ServiceEpisodeID", "RequestingService",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PersonAddress",
    "PersonTelephoneNumbers", "VerifyingOrganization", "ContentCreatorName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialSiteName", "ClinicalTrialSiteID",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "RetrieveAETitle", "SourceApplicationEntityTitle", "IssuerOfTheContainerIdentifier",
    "ContainerIdentifier", "SpecimenIdentifier",
))
_TEXT_VRS = frozenset(("LO", "SH", "ST", "LT", "UT", "UC", "AE", "CS"))
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*)){3,}")
_DATE = re.compile(r"(?:1[89]|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])")
_NOT_REGISTERED = ("ClassUID", "SyntaxUID")


@lru_cache(maxsize=8192)
def element_kind(tag: int, vr: str | None) -> tuple[str | None, str]:
    """(kind, field) of an element whose value the profile removes or replaces; kind None when its
    values are not searched for.  Private elements are of unknown meaning: only their UIDs (which
    are exact and unambiguous) are searched for."""
    from ..dicom import _dict_info, _tag_label
    if (tag >> 16) & 1:
        return ("uid" if vr == "UI" else None), _tag_label(tag)
    info = _dict_info(tag)
    if info is None:
        return None, _tag_label(tag)
    dict_vr, keyword = info
    vr = vr if vr not in (None, "UN") else dict_vr.split(" or ")[0]
    keyword = keyword or _tag_label(tag)
    if vr == "PN":
        return "name", keyword
    if vr == "DA":
        return "date", keyword
    if vr == "DT":
        return "datetime", keyword
    if vr == "TM":
        return "time", keyword
    if vr == "UI":
        return (None if keyword.endswith(_NOT_REGISTERED) else "uid"), keyword
    if vr in _TEXT_VRS and keyword in ID_KEYWORDS:
        return "id", keyword
    return None, keyword


def _registered(uid: str) -> bool:
    from pydicom.uid import UID_dictionary
    return uid in UID_dictionary


def _strings(value) -> list[str]:
    """The text values of a decoded element value (multi-values split)."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [s for v in value for s in _strings(v)]
    s = str(value).strip("\x00 ")
    return [s] if s else []


class IdentifierCollector:
    """The identifying values of one subject, as the scrubber meets them (restricted).

    Cheap enough to run inside the streaming engine: raw values are decoded only the first time a
    (tag, bytes) pair is seen, and only for tags whose values can identify."""

    __slots__ = ("values", "_seen", "uids")

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], str] = {}  # (kind, value) -> field it was first seen in
        self._seen: set = set()
        # False under retain_uids: the release keeps the UIDs (a private copy of one, the file meta's
        # SOP Instance UID, an embedded reference are the same UIDs), so none is searched for
        self.uids = True

    def add(self, kind: str, field: str, value: str) -> None:
        value = value.strip("\x00 \t\r\n")
        if value and not (kind == "uid" and (not self.uids or _registered(value))):
            self.values.setdefault((kind, value), field)

    def element(self, tag: int, vr: str | None, value) -> None:
        """A decoded value (pydicom path) that the profile is about to remove or replace."""
        kind, field = element_kind(tag, vr)
        if kind is None:
            return
        for s in _strings(value):
            self._add_value(kind, field, s)

    def _add_value(self, kind: str, field: str, value: str) -> None:
        """One value of an element of ``kind``."""
        self.add(kind, field, value)

    def dataset(self, ds) -> None:
        """Every identifying value inside a removed sequence item (any depth)."""
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    self.dataset(item)
            elif elem.tag & 0xFFFF and not (elem.tag >> 16 == 0x0002):
                try:
                    self.element(int(elem.tag), elem.VR, elem.value)
                except Exception:  # an undecodable value cannot be searched for either
                    continue

    def file_meta(self, meta, ae_titles: bool = True) -> None:
        """The AE titles and instance UIDs of a file meta group that is rebuilt; the AE titles only
        with ``ae_titles`` (they name the station: device identity, which
        retain_device_identity keeps as StationName, often the same string)."""
        try:
            for elem in meta:
                kind = {"AE": "id" if ae_titles else None, "UI": "uid"}.get(elem.VR)
                if kind and (kind == "id" or elem.keyword == "MediaStorageSOPInstanceUID"):
                    for s in _strings(elem.value):
                        self.add(kind, elem.keyword, s)
        except Exception:
            pass

    def raw(self, tag: int, vr: str | None, buf, start: int, end: int, encodings) -> None:
        """An encoded value (streaming path) that the profile removes or replaces."""
        if end <= start:
            return
        kind, field = element_kind(tag, vr)
        if kind is None:
            return
        data = bytes(buf[start:end])
        key = (tag, data)
        if key in self._seen:
            return
        self._seen.add(key)
        if data.isascii() and b"\x1b" not in data:  # ISO 2022 text is 7-bit too: decoded below
            text = data.decode("ascii")
        else:
            from pydicom.charset import decode_bytes
            try:
                text = decode_bytes(data, encodings, {0x5C, 0x5E, 0x3D} if kind == "name" else {0x5C})
            except Exception:
                text = data.decode("latin-1")
        for s in text.split("\\"):
            s = s.strip("\x00 ")
            if s:
                self._add_value(kind, field, s)

    def entries(self) -> list[list[str]]:
        return sorted([kind, field, value] for (kind, value), field in self.values.items())


_FIELD_NAME = re.compile(r"patient.?name|full.?name|birth.?name|physician|operator|referring|performing|"
                         r"artist|author|user|technologist|reader|nurse", re.IGNORECASE)
_FIELD_ID = re.compile(r"patient.?id|identification|accession|institution|department|station|serial|"
                       r"device|address|phone|telecom|barcode|scanscope.?id|image.?id|study.?id|"
                       r"host|site|admission|mrn|medical.?record", re.IGNORECASE)


def field_kind(field: str, value: str) -> str | None:
    """The kind of an original value a non-DICOM scrubber found in ``field`` (its name as the
    format spells it), None when the field does not identify a person, study, institution or
    device (protocol names, descriptions, free text and technical blobs are not searched for: the
    names, IDs and dates inside them are, in their own right)."""
    if _FIELD_NAME.search(field) or ("name" in field.lower() and "^" in value):
        return "name"
    if "uid" in field.lower() or (_UID.fullmatch(value) and "." in value):
        return "uid"
    if "birth" in field.lower() or ("date" in field.lower() and _DATE.match(value.replace("-", ""))):
        return "date"
    if _FIELD_ID.search(field):
        return "id"
    return None


def from_fields(fields: Mapping[str, str]) -> list[list[str]]:
    """``[kind, field, value]`` entries for a non-DICOM ScrubResult's ``identifiers`` (field -> value);
    fields of no identifying kind (see :func:`field_kind`) are left out."""
    out = []
    for field, value in sorted(fields.items()):
        value = str(value).strip("\x00 ")
        kind = field_kind(field, value) if value else None
        if kind == "date":
            value = value.replace("-", "")[:8]
        if kind:
            out.append([kind, field, value])
    return out


def path(restricted: Path, unit: str, stage: str, subject: str) -> Path:
    return Path(restricted) / "work" / unit / IDENTIFIERS_DIR / stage / f"{subject}.json"


def write(restricted: Path, unit: str, stage: str, subject: str, entries: Iterable[Iterable[str]]) -> Path:
    """Write one subject's identifiers for ``stage`` (restricted folder, mode 0600)."""
    target = path(restricted, unit, stage, subject)
    make_restricted_dir(target.parent.parent.parent)
    make_restricted_dir(target.parent.parent)
    make_restricted_dir(target.parent)
    values = sorted({tuple(e) for e in entries if len(e) == 3 and e[0] in KINDS and e[2]})
    text = json.dumps({"subject": subject, "stage": stage, "values": [list(v) for v in values]},
                      ensure_ascii=False, indent=0) + "\n"
    atomic_write_text(target, text, RESTRICTED_FILE_MODE)
    return target


def read_unit(restricted: Path, unit: str) -> dict[str, list[tuple[str, str, str]]]:
    """Every stage's identifiers of every subject of job unit ``unit`` (subject -> values, the
    stages in name order): each stage folder is listed once, not searched once per subject."""
    base = Path(restricted) / "work" / unit / IDENTIFIERS_DIR
    out: dict[str, list[tuple[str, str, str]]] = {}
    if not base.is_dir():
        return out
    for stage in sorted(e.path for e in os.scandir(base) if e.is_dir()):
        for name in sorted(n for n in os.listdir(stage) if n.endswith(".json")):
            values = json.loads(Path(stage, name).read_text(encoding="utf-8"))["values"]
            out.setdefault(name[:-len(".json")], []).extend(tuple(v) for v in values)
    return out


# ------------------------------------------------------------------------------------------------
# The identifier model: the searchable forms of a subject's values, and one matcher for many subjects
# ------------------------------------------------------------------------------------------------
# Which element values feed the model: only attributes that identify a person, a study, an
# institution or a device (and dates, UIDs).  Coded values, protocol and sequence names, numbers and
# private values of unknown meaning are never searched for: they recur in every clean release.
SWEEP_KINDS = frozenset(("name", "id", "date", "datetime"))
_MONTH_NAMES = {
    "en": ("january february march april may june july august september october november december",
           "jan feb mar apr may jun jul aug sep oct nov dec"),
    "de": ("januar februar märz april mai juni juli august september oktober november dezember",
           "jan feb mär apr mai jun jul aug sep okt nov dez"),
    "fr": ("janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
           "janv févr mars avr mai juin juil août sept oct nov déc"),
    "es": ("enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
           "ene feb mar abr may jun jul ago sep oct nov dic"),
    "it": ("gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre",
           "gen feb mar apr mag giu lug ago set ott nov dic"),
    "nl": ("januari februari maart april mei juni juli augustus september oktober november december",
           "jan feb mrt apr mei jun jul aug sep okt nov dec"),
    "pt": ("janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro",
           "jan fev mar abr mai jun jul ago set out nov dez"),
    "sv": ("januari februari mars april maj juni juli augusti september oktober november december",
           "jan feb mar apr maj jun jul aug sep okt nov dec"),
    "da": ("januar februar marts april maj juni juli august september oktober november december",
           "jan feb mar apr maj jun jul aug sep okt nov dec"),
    "no": ("januar februar mars april mai juni juli august september oktober november desember",
           "jan feb mar apr mai jun jul aug sep okt nov des"),
    # Slavic and Greek dates name the month in the genitive ("23 апреля 1961"); the second list is
    # the nominative (a form's heading) or the abbreviation
    "ru": ("января февраля марта апреля мая июня июля августа сентября октября ноября декабря",
           "январь февраль март апрель май июнь июль август сентябрь октябрь ноябрь декабрь"),
    "ru.": ("янв фев мар апр мая июн июл авг сен окт ноя дек", "янв февр март апр май июнь июль авг сент окт нояб дек"),
    "pl": ("stycznia lutego marca kwietnia maja czerwca lipca sierpnia września października listopada grudnia",
           "styczeń luty marzec kwiecień maj czerwiec lipiec sierpień wrzesień październik listopad grudzień"),
    "cs": ("ledna února března dubna května června července srpna září října listopadu prosince",
           "leden únor březen duben květen červen červenec srpen září říjen listopad prosinec"),
    "tr": ("ocak şubat mart nisan mayıs haziran temmuz ağustos eylül ekim kasım aralık",
           "oca şub mar nis may haz tem ağu eyl eki kas ara"),
    "el": ("ιανουαρίου φεβρουαρίου μαρτίου απριλίου μαΐου ιουνίου ιουλίου αυγούστου σεπτεμβρίου οκτωβρίου "
           "νοεμβρίου δεκεμβρίου",
           "ιανουάριος φεβρουάριος μάρτιος απρίλιος μάιος ιούνιος ιούλιος αύγουστος σεπτέμβριος οκτώβριος "
           "νοέμβριος δεκέμβριος"),
}
_MONTHS = tuple(_MONTH_NAMES["en"][0].split())
# ASCII transliterations a person typing the value may have used (beyond dropping the accents).
_TRANSLIT = {"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "ø": "oe", "æ": "ae", "å": "aa", "œ": "oe",
             "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "Ø": "Oe", "Æ": "Ae", "Å": "Aa", "Œ": "Oe", "ẞ": "SS"}


# Greek in Latin letters (ELOT 743 / passport spelling; the classical spellings as the other one):
# Διονύσιος → Dionysios, Dionisios; Παπαδόπουλος → Papadopoulos; Χρήστος → Christos, Hristos.
_GREEK = dict(zip("αβγδεζηικλμνξοπρσςτυφω", "avgdeziiklmnxoprsstyfo"))
_GREEK.update({"θ": "th", "χ": "ch", "ψ": "ps", "ου": "ou", "αυ": "av", "ευ": "ev", "μπ": "b", "ντ": "d",
               "γκ": "gk", "γγ": "ng"})
_GREEK_ALT = {"β": "b", "η": "e", "υ": "i", "χ": "h", "φ": "ph", "ξ": "ks", "ου": "u", "αυ": "af",
              "ευ": "ef", "μπ": "mp", "ντ": "nt", "γκ": "g", "γγ": "gg", "ω": "o"}
_CYRILLIC_LETTER = re.compile("[\u0400-\u04ff]")


def _latin_of_script(value: str) -> set[str]:
    """A Cyrillic value in Latin letters (:func:`cyrillic_spellings`), a Greek one in two common
    spellings and without its accents (ΠΑΠΑΔΟΠΟΥΛΟΣ for Παπαδόπουλος); empty for other scripts."""
    if _CYRILLIC_LETTER.search(value):
        return cyrillic_spellings(value)
    low = value.lower()
    for first, last, main, alt in (("\u0370", "\u03ff", _GREEK, _GREEK_ALT),):
        if any(first <= c <= last for c in low):
            # accents (tonos, dialytika): not in Latin letters, nor in capitals
            bare = "".join(c for c in unicodedata.normalize("NFD", value) if not unicodedata.combining(c))
            plain = {bare} if bare != value else set()
            low = bare.lower()
            out = set()
            for table in (main, {**main, **alt}):
                text, i = [], 0
                while i < len(low):
                    pair = low[i:i + 2]
                    if pair in table:
                        text.append(table[pair])
                        i += 2
                    else:
                        text.append(table.get(low[i], low[i]))
                        i += 1
                out.add("".join(text))
            return {o for o in out if o.isascii()} | plain
    return set()


def _combinations(options: list[list[str]], cap: int) -> list[tuple[str, ...]]:
    """Ways of choosing one option per position, the usual ones (each position's first options)
    first: in order of the sum of the chosen options' ranks, at most ``cap``."""
    import heapq
    if any(not o for o in options):
        return []
    start = (0,) * len(options)
    heap, seen, out = [(0, start)], {start}, []
    while heap and len(out) < cap:
        rank, idx = heapq.heappop(heap)
        out.append(tuple(o[i] for o, i in zip(options, idx)))
        for k, o in enumerate(options):
            if idx[k] + 1 < len(o):
                nxt = idx[:k] + (idx[k] + 1,) + idx[k + 1:]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (rank + 1, nxt))
    return out


CYRILLIC_SPELLINGS_MAX = 16  # Latin spellings of a value of several words at most
CYRILLIC_WORD_MAX = 32  # of one word at most
_CYRILLIC_SYSTEMS = 5  # BGN/PCGN, ICAO, scholarly, German, French: the table's columns before "other"
_CYRILLIC_IOTATING = set("аеёиоуыэюяєіїьъ")  # е after these is written ye, je, ie
_CYRILLIC_RUN = re.compile("[\u0400-\u04ff]+")


@lru_cache(maxsize=1)
def _cyrillic_table() -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]]:
    """``data/cyrillic_latin.tsv``: (sequence, where) -> (its spelling in each system, every spelling
    of it, the systems' first)."""
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "cyrillic_latin.tsv").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            seq, where, *cols = line.split("\t")
            systems = tuple("" if c == "-" else c for c in cols[:_CYRILLIC_SYSTEMS])
            other = tuple(c for c in cols[_CYRILLIC_SYSTEMS].split() if c != "-")
            out[(seq, where)] = (systems, tuple(dict.fromkeys(systems + other)))
    return out


@lru_cache(maxsize=4096)
def _cyrillic_word(word: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The Latin spellings of one lower-case Cyrillic word: in each system (one per system), and
    every spelling, the systems' first, then mixes (the systems' spellings of each letter first),
    at most :data:`CYRILLIC_WORD_MAX`."""
    table = _cyrillic_table()
    positions, i = [], 0
    while i < len(word):
        for size in (2, 1):
            seq = word[i:i + size]
            if len(seq) < size:
                continue
            wheres = (("$",) if i + size == len(word) else ()) + (
                ("^",) if i == 0 or word[i - 1] in _CYRILLIC_IOTATING else ()) + ("*",)
            entry = next((table[(seq, w)] for w in wheres if (seq, w) in table), None)
            if entry:
                break
        else:
            size, entry = 1, ((word[i],) * _CYRILLIC_SYSTEMS, (word[i],))  # a letter of no table: as written
        positions.append(entry)
        i += size
    systems = tuple("".join(p[0][k] for p in positions) for k in range(_CYRILLIC_SYSTEMS))
    mixed = ["".join(c) for c in _combinations([list(p[1]) for p in positions], CYRILLIC_WORD_MAX)]
    return systems, tuple(dict.fromkeys(systems + tuple(mixed)))[:CYRILLIC_WORD_MAX]


def cyrillic_spellings(value: str) -> set[str]:
    """A value written in Cyrillic as Latin-script documents spell it (lower case): in BGN/PCGN,
    ICAO passports, the scholarly system and ISO 9 (without diacritics), German and French, and
    mixes of them (``data/cyrillic_latin.tsv``): Щербаков^Алексей → shcherbakov^aleksey,
    shtcherbakov, scherbakov, scerbakov (Ščerbakov), schtscherbakow, chtcherbakov …, alexei,
    alexey, aleksej …; -ий/-ый as -y, -i, -iy, -ij; final -в as -v, -w, -ff.  A word in at most
    :data:`CYRILLIC_WORD_MAX` spellings; a value of several words in each system throughout and
    the usual mixes, at most :data:`CYRILLIC_SPELLINGS_MAX` (a name's words are forms of their own,
    each in all its spellings).  Empty without Cyrillic letters."""
    low = value.lower()
    texts, systems, every, pos = [], [], [], 0  # the text between words, each word's spellings
    for m in _CYRILLIC_RUN.finditer(low):
        texts.append(low[pos:m.start()])
        spelled, all_of_it = _cyrillic_word(m.group())
        systems.append(spelled)
        every.append(list(all_of_it))
        pos = m.end()
    if not every:
        return set()
    texts.append(low[pos:])

    def join(words) -> str:
        return "".join(t + w for t, w in zip(texts, words)) + texts[-1]
    # one word: all its spellings; several: each system throughout, then the usual mixes (each
    # word is a form of its own with all its spellings)
    cap = CYRILLIC_WORD_MAX if len(every) == 1 else CYRILLIC_SPELLINGS_MAX
    out = [join(w[k] for w in systems) for k in range(_CYRILLIC_SYSTEMS)]
    out += [join(c) for c in _combinations(every, cap)]
    return {s for s in list(dict.fromkeys(out))[:cap] if s.isascii()}


def transliterations(value: str) -> set[str]:
    """ASCII spellings of a value with accented letters: Müller → Muller, Mueller; Ødegård → Odegard,
    Oedegaard; ß → ss; Cyrillic and Greek in Latin letters (Щербаков → Shcherbakov, Shtcherbakov,
    Schtscherbakow, Chtcherbakov, Scerbakov (Ščerbakov); Διονύσιος → Dionysios; Greek also without
    its accents).  Empty for ASCII values."""
    if value.isascii():
        return set()
    latin = _latin_of_script(value)
    if latin:
        return latin

    def strip(s: str) -> str:
        s = "".join(FOLD_EXTRA.get(c, c) for c in s)
        return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    out = {strip(value), strip("".join(_TRANSLIT.get(c, c) for c in value))}
    return {o for o in out if o.isascii() and o.strip()}


def _month_number_table() -> dict[bytes, int]:
    """Every month name and abbreviation (all languages above, their ASCII spellings, upper and
    lower case, UTF-8 and Latin-1) → month number."""
    table: dict[bytes, int] = {}
    for full, short in _MONTH_NAMES.values():
        for names in (full.split(), short.split()):
            for i, name in enumerate(names, 1):
                for v in {name, *transliterations(name)}:
                    for w in (v, v.upper(), v.capitalize()):
                        for enc in ("utf-8", "latin-1"):
                            try:
                                table[w.encode(enc).lower()] = i
                            except UnicodeEncodeError:
                                pass
    return table


_ROMAN_MONTHS = ("i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix", "x", "xi", "xii")
_MONTH_NO = {**_month_number_table(), **{r.encode(): i for i, r in enumerate(_ROMAN_MONTHS, 1)}}  # 17. III. 1958
_MONTH_RE = b"|".join(re.escape(m) for m in sorted(_MONTH_NO, key=len, reverse=True))
_NB = rb"(?<![0-9])"
_NA = rb"(?![0-9]|\.[0-9])"
_CJK_YEAR, _CJK_MONTH = "(?:年|년)".encode(), "(?:月|월)".encode()  # 1961年4月23日, 1961년 4월 23일
_DATE_TEXT = re.compile(
    rb"(?P<c8>" + _NB + rb"(?<!\.)\d{8}" + _NA + rb")"
    rb"|" + _NB + rb"(?<!\.)(?P<a>\d{1,4})(?P<s>[./ -]) ?(?P<b>\d{1,2})(?P=s) ?(?P<c>\d{4}|\d{2})" + _NA +
    rb"|" + _NB + rb"(?P<d1>\d{1,2})(?:\.|st|nd|rd|th)?[ /-]?(?:de |of )?(?<![a-z])(?P<m1>" + _MONTH_RE +
    rb")(?![a-z])\.?,?[ /-]?(?:de )?(?P<y1>\d{4}|\d{2})" + _NA +
    rb"|(?<![a-z])(?P<m2>" + _MONTH_RE + rb")(?![a-z])\.? ?(?P<d2>\d{1,2})(?:st|nd|rd|th)?,? (?P<y2>\d{4})" + _NA +
    rb"|" + _NB + rb"(?P<y3>\d{4})[ /.-]?(?<![a-z])(?P<m3>" + _MONTH_RE + rb")(?![a-z])\.?[ /.-]?(?P<d3>\d{1,2})" + _NA +
    rb"|" + _NB + rb"(?P<y4>\d{4}) ?" + _CJK_YEAR + rb" ?(?P<m4>\d{1,2}) ?" + _CJK_MONTH + rb" ?(?P<d4>\d{1,2})(?![0-9])",
    re.IGNORECASE)
# Japanese era dates (昭和36年4月23日 is 1961-04-23; 元年 is the first year): era → the year before its
# first, in UTF-8 (other character sets are decoded to UTF-8 before the search)
_ERAS = {"明治": 1867, "大正": 1911, "昭和": 1925, "平成": 1988, "令和": 2018}
_ERA_DATE = re.compile(
    rb"(?P<era>" + b"|".join(e.encode() for e in _ERAS) + rb") ?(?P<y>[0-9]{1,2}|\xe5\x85\x83) ?" + _CJK_YEAR +
    rb" ?(?P<m>[0-9]{1,2}) ?" + _CJK_MONTH + rb" ?(?P<d>[0-9]{1,2})(?![0-9])")
_CJK_YEAR_UTF8 = "年".encode()


def _ymd(y: str, m: int, d: int) -> str | None:
    if not (1 <= m <= 12 and 1 <= d <= 31):
        return None
    return f"{int(y):04d}{m:02d}{d:02d}"


def _years(y: bytes) -> list[str]:
    s = y.decode()
    return [s] if len(s) == 4 else [f"19{s}", f"20{s}"]


def _separated(a: str, month: int, c: bytes, swap: bool = True) -> set[str]:
    """Candidate dates of numbers written ``a``, ``month``, ``c``: year first when ``a`` has four
    digits, else day first, or month first (``swap``: ``month`` is a number that may be the day);
    a two-digit year in both centuries."""
    if len(a) == 4 and len(c) <= 2:
        return {d} if (d := _ymd(a, month, int(c))) else set()
    if len(a) <= 2:
        return {x for y in _years(c) for x in (_ymd(y, month, int(a)), _ymd(y, int(a), month) if swap else None) if x}
    return set()


def _day_or_month_first(v: str) -> set[str]:
    """Candidate dates of eight digits written DDMMYYYY or MMDDYYYY."""
    return {x for x in (_ymd(v[4:], int(v[2:4]), int(v[:2])), _ymd(v[4:], int(v[:2]), int(v[2:4]))) if x}


def era_dates_in(low: bytes) -> Iterator[tuple[int, int, set[str]]]:
    """(start, end, {YYYYMMDD}) of every Japanese era date in ``low`` (UTF-8): 昭和36年4月23日,
    平成元年1月8日.  Its Gregorian year is not written, so it lies outside the year windows
    :class:`Matcher` reads :func:`dates_in` in."""
    if _CJK_YEAR_UTF8 not in low:  # every era date holds 年 (one search: this runs on every text)
        return
    for m in _ERA_DATE.finditer(low):
        y = 1 if m["y"] == "元".encode() else int(m["y"])
        d = _ymd(str(_ERAS[m["era"].decode()] + y), int(m["m"]), int(m["d"]))
        if d and y:
            yield m.start(), m.end(), {d}


def dates_in(low: bytes) -> Iterator[tuple[int, int, set[str]]]:
    """(start, end, candidate YYYYMMDD dates) of every written date in lower-cased ``low``:
    19610312, 12031961, 03121961, 1961-03-12, 12.03.1961, 03/12/61 (both day-month orders), 12 March 1961, 12. März
    1961, March 12, 1961, 12-MAR-1961, 12 de marzo de 1961, 1961 Mar 12, 1961Mar12, 23 апреля 1961, 1961年4月23日,
    1961년 4월 23일 …"""
    for m in _DATE_TEXT.finditer(low):
        out: set[str] = set()
        g = m.groupdict()
        if g["c8"]:
            v = g["c8"].decode()
            out.add(v)  # 19610312, and day or month first as forms and file names write it: 12031961
            out |= _day_or_month_first(v)
        elif g["a"]:
            a, b, c = g["a"].decode(), int(g["b"]), g["c"]
            if g["s"] == b" " and len(a) + len(c) != 6:
                continue  # space-separated numbers are a date only with a 4-digit year: 17 03 1958
            out |= _separated(a, b, c)
        elif g["y4"]:
            out |= {x for x in [_ymd(g["y4"].decode(), int(g["m4"]), int(g["d4"]))] if x}
        else:
            day, mon, year = ((g["d1"], g["m1"], g["y1"]) if g["m1"] else (g["d2"], g["m2"], g["y2"]) if g["m2"]
                              else (g["d3"], g["m3"], g["y3"]))
            mo = _MONTH_NO.get(mon.lower())
            if mo:
                for y in _years(year):
                    d = _ymd(y, mo, int(day))
                    if d:
                        out.add(d)
        if out:
            yield m.start(), m.end(), out


# A birth date right after a word that announces one is recognised in looser forms than anywhere
# else (where six digits or a two-digit year are too common to take for a date): DOB 230461,
# born 610423, d.o.b. 04/23/61, geb. 23-4-61, *23.4.61, né le 23 IV 61.
# in other scripts (UTF-8; other character sets are decoded to UTF-8 before the search): Japanese,
# Chinese, Korean, Russian (д.р.: дата рождения), Greek
_BIRTH_WORDS_UTF8 = ("生年月日", "出生年月日", "出生日期", "誕生日", "생년월일", "(?:д|Д)ата рождения", "ДАТА РОЖДЕНИЯ",
                     "(?:д|Д)\\.? ?р\\.", "(?:р|Р)од(?:\\.|ил(?:ся|ась))", "(?:η|Η)μερομηνία γέννησης",
                     "ΗΜΕΡΟΜΗΝΙΑ ΓΕΝΝΗΣΗΣ")  # (alternatives, not classes: a class of bytes is not of characters)
_BIRTH_WORD = re.compile(
    rb"(?<![a-z])(?:d\.? ?o\.? ?b|dob|birth ?date|birthday|date of birth|born|geb(?:oren|urtsdatum|dat)?|"
    rb"n(?:\xc3\xa9|\xe9)e?(?: le)?|nee? le|nat[oa]|nacid[oa]|fecha de nacimiento|f\. ?nac|nascid[oa]|"
    rb"data di nascita|date de naissance|f(?:\xc3\xb8|\xf8)dt|f(?:\xc3\xb6|\xf6)dd|ur\.|urodzon[ya])(?![a-z])"
    rb"|(?<![0-9a-z])\*(?= ?[0-9])")  # (accented words in UTF-8 and Latin-1; UTF-16 text is read as Latin-1)
# read in values that are not ASCII: the engines' sweep reads every text value on its own (and the leak
# scan every value of a file in another character set); finding them in megabytes of header bytes too
# cost about 7 ms a megabyte
_BIRTH_WORD_UTF8 = re.compile("|".join(_BIRTH_WORDS_UTF8).encode())
# where a birth word can start (found with bytes.find: one regex over megabytes of header bytes
# costs as much as the rest of the search)
_BIRTH_STARTS = (b"d.o", b"d. o", b"d o", b"dob", b"birth", b"date of", b"born", b"geb", b"n\xc3\xa9", b"n\xe9",
                 b"nee le", b"ne le", b"nato", b"nata", b"nacid", b"fecha", b"f. nac", b"f.nac", b"nascid", b"data di",
                 b"date de", b"f\xc3", b"f\xf8", b"f\xf6", b"ur.", b"urodz", b"*")
_BIRTH_SHORT = 4096  # a text shorter than this is searched with the regex alone (a value the sweep cleans)
_BIRTH_DATE = re.compile(
    rb"(?:[\s:.=,)(-]|\xef\xbc\x9a){0,4}(?:(?P<c>[0-9]{6}|[0-9]{8})|(?P<a>[0-9]{1,4})(?P<s>[ ./-]) ?(?P<b>[0-9]{1,2}|[ivx]{1,4})"
    rb"\.?(?P=s) ?(?P<y>[0-9]{4}|[0-9]{2})"
    rb"|(?P<m>" + _MONTH_RE + rb")(?![a-z])\.?[ ./-]? ?(?P<md>[0-9]{1,2})(?:st|nd|rd|th)?,?[ ./-]? ?(?P<my>[0-9]{4}|[0-9]{2})"
    rb"|(?P<era>[mtshr])(?P<ey>[0-9]{1,2})[./-](?P<em>[0-9]{1,2})[./-](?P<ed>[0-9]{1,2}))"  # Japanese era: S36.4.23
    rb"(?![0-9]|\.[0-9])")
_ERA_LETTERS = {b"m": "明治", b"t": "大正", b"s": "昭和", b"h": "平成", b"r": "令和"}


# the values whose loose forms birth_dates_in reads: birth dates (and a folder's date, which is one)
_BIRTH_FIELD = re.compile(r"(?i)birth|identity")


def birth_dates_in(low: bytes) -> Iterator[tuple[int, int, set[str]]]:
    """(start, end, candidate YYYYMMDD dates) of each date written right after a word announcing
    a birth date in lower-cased ``low``: six or eight digits as day-month-year, month-day-year or
    year-month-day; separated numbers day or month first, or year first (four digits, or two
    followed by two more); a month's name first (Apr 23 61); two-digit years in both centuries;
    Roman months."""
    if len(low) < 7:
        return
    if len(low) < _BIRTH_SHORT:  # a value: words in any script
        ends = {w.end() for w in _BIRTH_WORD.finditer(low)}
        if not low.isascii():
            ends |= {w.end() for w in _BIRTH_WORD_UTF8.finditer(low)}
    else:  # a file's header bytes (the leak scan): Latin-script words; the sweep read each value
        ends = set()
        for key in _BIRTH_STARTS:
            i = low.find(key)
            while i >= 0:
                if (w := _BIRTH_WORD.match(low, i)) is not None:
                    ends.add(w.end())
                i = low.find(key, i + 1)
    for end in sorted(ends):
        m = _BIRTH_DATE.match(low, end)
        if not m:
            continue
        out: set[str] = set()
        if m["c"]:
            v = m["c"].decode()
            if len(v) == 8:
                out |= {x for x in [_ymd(v[:4], int(v[4:6]), int(v[6:]))] if x} | _day_or_month_first(v)
            else:
                for y, mo, d in ((v[4:], v[2:4], v[:2]), (v[4:], v[:2], v[2:4]), (v[:2], v[2:4], v[4:])):
                    out |= {x for yy in _years(y.encode()) if (x := _ymd(yy, int(mo), int(d)))}
        elif m["era"]:
            y = _ERAS[_ERA_LETTERS[m["era"]]] + int(m["ey"])
            out |= {x for x in [_ymd(str(y), int(m["em"]), int(m["ed"]))] if x and int(m["ey"])}
        elif m["m"]:  # month first: Apr 23 61, apr-23-1961
            out |= {x for yy in _years(m["my"]) if (x := _ymd(yy, _MONTH_NO[m["m"]], int(m["md"])))}
        else:
            a, b, y = m["a"].decode(), m["b"].decode(), m["y"]
            mo = _ROMAN_MONTHS.index(b) + 1 if b.isalpha() and b in _ROMAN_MONTHS else int(b) if b.isdigit() else 0
            out |= _separated(a, mo, y, swap=b.isdigit())
            if len(a) == 2 and len(y) == 2:  # 61-04-23
                out |= {x for yy in _years(m["a"]) if (x := _ymd(yy, mo, int(y)))}
        if out:
            yield m.start("c" if m["c"] else "m" if m["m"] else "era" if m["era"] else "a"), m.end(), out


def date_forms(yyyymmdd: str) -> set[str]:
    """Textual forms of a date (what :func:`dates_in` recognises, for documentation and for the
    free-text cleaners): 19640716, 1964-07-16, 16.07.1964, 07/16/1964, 16 Jul 1964, July 16, 1964 …"""
    if len(yyyymmdd) != 8 or not yyyymmdd.isdigit():
        return set()
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:]
    if not (1 <= int(m) <= 12 and 1 <= int(d) <= 31):
        return {yyyymmdd}
    mi, di = int(m), int(d)
    full = _MONTHS[mi - 1]
    short = full[:3]
    return {yyyymmdd, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}",
            f"{m}/{d}/{y}", f"{d}-{m}-{y}", f"{m}-{d}-{y}", f"{di}.{mi}.{y}", f"{mi}/{di}/{y}",
            f"{di}/{mi}/{y}", f"{d} {short} {y}", f"{d}-{short}-{y}", f"{di} {short} {y}",
            f"{full} {di}, {y}", f"{short} {di}, {y}", f"{short} {d} {y}", f"{di} {full} {y}",
            f"{d}. {full} {y}", f"{di}. {full} {y}", f"{d}.{m}.{y[2:]}", f"{m}/{d}/{y[2:]}", f"{y} {short} {d}",
            f"{d}-{short}-{y[2:]}", f"{d}{m}{y}", f"{m}{d}{y}"}


def name_forms(value: str) -> set[str]:
    """A DICOM person name (``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``, ``=`` between representations)
    or a plain name: the whole value, each representation, each component and word in it, and
    ``given family``, ``family given``, ``family, given``, ``family^given``, ``G. family``,
    ``family, G.`` (parts too short to search alone are searched in these combinations)."""
    out = {value}
    for group in value.split("="):
        if not group:
            continue
        out.add(group)
        comps = [c.strip() for c in group.split("^")]
        for c in comps:
            if c:
                out.add(c)
                out.update(w.strip(".") for w in _SPLIT_WORDS.split(c) if w.strip("."))
                if len(parts := [w for w in _SPLIT_WORDS.split(c) if w]) > 1:
                    out.add("".join(parts))  # VANDERBERG, GarciaLopez: a part of several words as one
        family, given, middle = (comps + ["", "", ""])[:3]
        if family and given:
            g0 = given[0]
            out |= _whole(family, given, middle) | {f"{g0}. {family}", f"{family}, {g0}.", f"{family} {g0}."}
            if family.isalpha() and family.isascii() and len(family) >= 5:
                out |= {f"{family}{g0}", f"{g0}{family}"}  # ZebrowskiK, KZebrowski (labels, folder names)
            if middle:
                out.add(f"{given} {middle[0]}. {family}")
        if "^" not in group and " " in group.strip():  # a plain "Given Family" name
            out.update(w for w in group.split() if w)
    out |= {v for o in list(out) for v in punctuation_spellings(o)}
    out |= {v for o in list(out) for v in gaelic_spellings(o)}
    # a long name part cut to a field's length (SH and many vendor fields hold 16 characters)
    out.update(w[:TRUNCATED_AT] for w in list(out) if " " not in w and "^" not in w and len(w) > TRUNCATED_AT)
    return {o.strip() for o in out if o.strip()}


TRUNCATED_AT = 16
_APOSTROPHES = "'’‘`´"
_NAME_PUNCT = re.compile(f"[-{_APOSTROPHES}]")


def punctuation_spellings(name: str) -> set[str]:
    """A name with hyphens or apostrophes as free text writes it: O'Brien-Smith → O’Brien-Smith,
    OBrien Smith, O Brien Smith, OBrienSmith …, and each part alone (Brien, Smith; parts too short
    to search alone are left to the exclusion rules)."""
    if not _NAME_PUNCT.search(name):
        return set()
    out = {p for p in _NAME_PUNCT.split(name) for p in p.split() if p}
    words = {w for w in re.split(r"[-\s]+", name) if w}  # O'Brien of O'Brien-Smith
    for apo in ("'", "’", "", " "):
        for hyphen in ("-", " ", ""):
            for text in (name, *words):
                v = re.sub(f"[{_APOSTROPHES}]", apo, text).replace("-", hyphen)
                out.add(" ".join(v.split()))
    return out


_GAELIC = re.compile(r"\b(ma?c)[ -]?([a-z]{3,})\b", re.IGNORECASE)


def gaelic_spellings(name: str) -> set[str]:
    """A Mc or Mac name as records write it apart or together, and with the other prefix:
    MCDONALD → Mc Donald, Mc-Donald, MacDonald, Mac Donald (clerks mix them); Mac Gregor →
    MacGregor, McGregor.  Empty for a name without one."""
    if not _GAELIC.search(name):
        return set()
    out = set()
    for prefix in ("Mc", "Mac"):
        for sep in ("", " ", "-"):
            out.add(_GAELIC.sub(lambda m: f"{prefix}{sep}{m.group(2)}", name))
    out.discard(name)
    return out


def _whole(family: str, given: str, middle: str = "") -> set[str]:
    """A name written whole, family and given name together, in the orders text uses (CJK names
    family-given without a space too: 王小东)."""
    out = {f"{given} {family}", f"{family} {given}", f"{family}, {given}", f"{family}^{given}",
           f"{family},{given}", f"{given}, {family}"}
    if not (family + given).isascii():
        out.add(f"{family}{given}")
    return out | _run_together(family, given) | ({f"{given} {middle} {family}"} if middle else set())


def _run_together(family: str, given: str) -> set[str]:
    """An ASCII name written as one word, as folder names and labels do: AbernathyLucinda,
    LUCINDAABERNATHY (eight letters or more: LeeAnn is a given name, not Lee^Ann)."""
    fam, giv = (b"".join(_TOKEN.findall(p.lower().encode("ascii", "ignore"))).decode() for p in (family, given))
    if not (family + given).isascii() or len(fam) < 3 or len(giv) < 3 or len(fam + giv) < 8:
        return set()
    return {fam + giv, giv + fam}


def _representations(value: str) -> Iterator[tuple[str, str, str]]:
    """(family, given, middle) of each representation of a person name (``=`` between them); a
    plain name of two or more words has its last word as the family name."""
    for group in value.split("="):
        comps = [c.strip() for c in group.split("^")]
        family, given, middle = (comps + ["", "", ""])[:3]
        if family and given:
            yield family, given, middle
        elif "^" not in group and len(words := group.split()) >= 2:
            yield words[-1], " ".join(words[:-1]), ""


def whole_name_anchors(value: str) -> set[bytes] | None:
    """The words the :func:`whole_name_forms` of an ASCII name are found by (:func:`anchor`: a
    form's longest word), worked out without making the forms: each form recombines the words of
    one representation's family and given name (one form adds the middle name), so its anchor is
    one of their longest words.  None for a name with accented, hyphen or apostrophe spellings,
    or not ASCII (make its forms)."""
    if not value.isascii() or _ACCENT_DIGRAPH.search(value) or _NAME_PUNCT.search(value):
        return None
    out: set[bytes] = set()
    for family, given, middle in _representations(value):
        for text in (f"{family} {given}", *([f"{family} {given} {middle}"] if middle else [])):
            ws = words(text.lower().encode("ascii"))
            longest = max(map(len, ws), default=0)
            out |= {w for w in ws if len(w) == longest}
        out |= {w.encode() for w in _run_together(family, given)}
    return out


@lru_cache(maxsize=1 << 14)
def script_name_anchors(value: str) -> frozenset[bytes] | None:
    """The words the Latin spellings of a name written only in Cyrillic or only in Han characters
    can be found by (a superset of the anchors, :func:`anchor`, of its :func:`whole_name_forms`'
    spellings), worked out from the spellings of the forms' words without spelling the forms:
    each word of a Cyrillic form's spelling spells one of its words (the forms written together
    included, :func:`cyrillic_spellings`), perhaps with accents (:func:`accented_spellings`); each
    word of a Han form's pinyin is a reading of one of its runs of characters, of its family name
    or of its given name (:func:`pinyin_spellings`).  None for a name with letters of another
    script or of two (its forms are made).  Each spelled word contributes its own anchor: a form's
    longest (first) word is the longest (first) word of the spelled word it lies in."""
    if value.isascii():
        return None
    letters = [c for c in value if c.isalpha()]
    cyrillic = all("\u0400" <= c <= "\u04ff" for c in letters)
    if not cyrillic and not all(_HAN_LETTER.fullmatch(c) for c in letters):
        return None
    out: set[bytes] = set()

    def add(spellings) -> None:  # a form's anchor is the anchor of the spelling of one of its words
        for v in spellings:
            if found := anchor(v.lower().encode("utf-8")):
                out.add(found[1])
    surnames = _han_surnames()
    for form in whole_name_forms(value):
        low = form.lower()
        out |= words(low.encode("utf-8"))  # digits beside the words
        if cyrillic:
            for m in _CYRILLIC_RUN.finditer(low):
                add(v for spelled in _cyrillic_word(m.group())[1] for v in {spelled} | _accent_variants(spelled))
            continue
        runs = [m.group() for m in _HAN_RUN.finditer(form)]
        for run in runs:
            add(_pinyin_given(run) + _pinyin_family(run[:1]) + _pinyin_given(run[1:]))
            if len(run) >= 2 and run[:2] in surnames:
                add(_pinyin_family(run[:2]) + _pinyin_given(run[2:]))
            if len(run) == 1 or run in surnames:
                add(_pinyin_family(run))
    return frozenset(out)


def whole_name_forms(value: str) -> set[str]:
    """The forms of a person name that write it whole (DOE^JOHN, John Doe, Doe, John …), not its
    parts or initials: what another subject's name is searched as (a family name alone, or an
    initial, is shared by many of thousands of subjects).  A plain name of two or more words is
    also searched with its last word first."""
    out = {g for g in value.split("=") if "^" not in g and len(g.split()) >= 2}  # a plain name as written
    for family, given, middle in _representations(value):
        out |= _whole(family, given, middle)
    out |= {v for o in list(out) for v in punctuation_spellings(o) if one_person(v)}
    return {o.strip() for o in out if o.strip()}


def one_person(form: str) -> bool:
    """Whether a name form holds two words of two letters or more, or is a CJK name of three
    characters or more (王小东): a form a text holds by chance only for that person."""
    words = re.findall(r"[^\W\d_]{2,}", form)
    return len(words) >= 2 or (len(words) == 1 and len(words[0]) >= 3 and all(ord(c) >= 0x2E80 for c in words[0]))


def time_forms(value: str) -> set[str]:
    """A DICOM TM value: as written, HHMMSS and HH:MM:SS."""
    v = value.strip()
    out = {v}
    hms = v.split(".")[0]
    if len(hms) == 6 and hms.isdigit():
        out |= {hms, f"{hms[:2]}:{hms[2:4]}:{hms[4:]}"}
    return out


_ID_SEPARATORS = re.compile(r"[\s()./_:+-]+")
# An ID whose one run of digits (at least six) has a prefix or suffix (a site or system code): the
# digits are written alone too.
_ID_DIGITS = re.compile(r"\D*(\d{6,})\D*")


def forms(kind: str, value: str) -> set[str]:
    """Every literal form of one original value that is searched for (dates are recognised in
    any written form by :func:`dates_in` instead, see :class:`Matcher`), with the ASCII spellings
    of values with accented letters; a value stored decomposed (NFD: macOS folder names) also
    composed, whose forms hold those spellings (Müller decomposed: Mueller), and Hangul and kana
    forms also decomposed."""
    value = value.strip()
    composed = unicodedata.normalize("NFC", value)
    out = _forms(kind, value) | (_forms(kind, composed) if composed != value else set())
    if _KANA_OR_HANGUL.search(composed):  # Hangul and kana written decomposed (the accent folding is for Latin)
        out |= {d for f in out if (d := unicodedata.normalize("NFD", f)) != f}
    return out


def _forms(kind: str, value: str) -> set[str]:
    if kind == "name":
        out = name_forms(value)
    elif kind in ("whole_name", "whole_name_script"):
        out = whole_name_forms(value)
        if kind == "whole_name_script":  # as written only (see leakscan.UnitMatcher)
            return out
    elif kind == "date":
        out = {value}
    elif kind == "datetime":
        out = {value, value[:14]}
    elif kind == "time":
        out = time_forms(value)
    elif kind == "id":
        out = {value}
        compact = _ID_SEPARATORS.sub("", value)
        if compact != value:
            out.add(compact)  # 123-45-6789 also as 123456789, P-968-287 as P968287
        core = _ID_DIGITS.fullmatch(compact)  # A44120987 also as 44120987, NHS 943 476 5919 as 9434765919
        digits = core.group(1) if core else compact
        if digits != compact:
            out.add(digits)
        if digits.isdigit() and digits.startswith("0") and len(digits.lstrip("0")) >= 6:
            out.add(digits.lstrip("0"))  # 0004711923 also as 4711923
        for part in re.split(r"[\r\n,;^\\]+", value):  # address and institution lines one by one
            if part.strip() and part.strip() != value:
                out.add(part.strip())
    elif kind == "path":  # the name without its extension(s): "0001.dcm" is judged as "0001"
        stem = value.split(".")[0] if not value.startswith(".") else value
        out = {stem}
        for tok in re.split(r"[_\s-]+", stem):  # DOE_JOHN_MRN8284194: the ID in it on its own
            digits = sum(c.isdigit() for c in tok)
            # a letters-and-digits token (MRN8284194) or a long number (not a series number, not a date)
            if tok != stem and len(tok) >= 6 and digits and (any(c.isalpha() for c in tok) or (
                    digits >= 9 and not _DATE.fullmatch(tok))):
                out.add(tok)
    else:
        out = {value}
    for o in list(out):
        out |= transliterations(o)
    if kind in ("name", "whole_name"):
        chinese = not _KANA_OR_HANGUL.search(value)  # a Japanese or Korean name's kanji are not read in pinyin
        for o in list(out):
            out |= (accented_spellings(o) | kana_spellings(o) | han_variants(o) | hangul_spellings(o)
                    | (pinyin_spellings(o) if chinese else set()))
    return out


@lru_cache(maxsize=1)
def _kana_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Full-width katakana → half-width, and the two voicing marks."""
    half = {}
    for cp in range(0xFF66, 0xFF9E):
        full = unicodedata.normalize("NFKC", chr(cp))
        if len(full) == 1:
            half[full] = chr(cp)
    return half, {"\u3099": "\uff9e", "\u309a": "\uff9f"}


def kana_spellings(value: str) -> set[str]:
    """A Japanese phonetic name in its other kana: hiragana やまだ ↔ katakana ヤマダ, and full-width
    ↔ half-width katakana ﾔﾏﾀﾞ (what older systems print).  Empty for values without kana."""
    if not any("\u3041" <= c <= "\u30ff" or "\uff66" <= c <= "\uff9f" for c in value):
        return set()
    full = unicodedata.normalize("NFKC", value)
    kata = "".join(chr(ord(c) + 0x60) if "\u3041" <= c <= "\u3096" else c for c in full)
    hira = "".join(chr(ord(c) - 0x60) if "\u30a1" <= c <= "\u30f6" else c for c in full)
    half, marks = _kana_tables()
    narrow = "".join(half.get(c, marks.get(c, c)) for c in unicodedata.normalize("NFD", kata))
    return {v for v in (full, kata, hira, narrow) if v != value}


@lru_cache(maxsize=1)
def _han_classes() -> dict[str, str]:
    """Each Han character that has variants → every character of its class (``data/han_variants.tsv``)."""
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "han_variants.tsv").read_text(encoding="utf-8")
    return {c: line for line in text.splitlines() if line and not line.startswith("#") for c in line}


# Hangul in Latin letters: Revised Romanization of each syllable's initial, vowel and final consonant,
# and the spelling older records and passports use (Kyung, Sung, Soo, Hyun, Young, Joon).
_HANGUL_INITIAL = ("g", "kk", "n", "d", "tt", "r", "m", "b", "pp", "s", "ss", "", "j", "jj", "ch", "k", "t", "p", "h")
_HANGUL_VOWEL = ("a", "ae", "ya", "yae", "eo", "e", "yeo", "ye", "o", "wa", "wae", "oe", "yo", "u", "wo", "we", "wi",
                 "yu", "eu", "ui", "i")
_HANGUL_FINAL = ("", "k", "k", "k", "n", "n", "n", "t", "l", "k", "m", "l", "l", "l", "p", "l", "m", "p", "p", "t",
                 "t", "ng", "t", "t", "k", "t", "p", "t")
_HANGUL_POPULAR_VOWEL = {"eo": "u", "yeo": "yu", "u": "oo", "ui": "ee"}
HANGUL_SPELLINGS_MAX = 32  # Latin spellings of one form at most


def _hangul_syllable(c: str, popular: bool) -> str:
    i = ord(c) - 0xAC00
    lead, vowel, tail = _HANGUL_INITIAL[i // 588], _HANGUL_VOWEL[i % 588 // 28], _HANGUL_FINAL[i % 28]
    if popular:
        if lead == "g":
            lead = "k"
        if vowel == "yeo" and tail == "ng":  # 영 Young; 경 Kyung, 병 Byung, 명 Myung
            vowel = "you" if lead == "" else "yu"
        vowel = _HANGUL_POPULAR_VOWEL.get(vowel, vowel) if not (lead == "" and vowel == "u") else "woo"
    return lead + vowel + tail


@lru_cache(maxsize=1)
def _korean_surnames() -> dict[str, list[str]]:
    """``data/korean_surnames.tsv``: a family name syllable → its usual Latin spellings."""
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "korean_surnames.tsv").read_text(encoding="utf-8")
    return {k: v.split() for k, v in (line.split("\t") for line in text.splitlines() if line and not line.startswith("#"))}


_HANGUL_RUN = re.compile("[\uac00-\ud7a3]+")


def hangul_spellings(value: str) -> set[str]:
    """A Korean name stored only in Hangul as Latin-script records write it: 홍^길동 as Hong^Gildong,
    Hong Gil-dong, HONG GIL DONG; 김영수 as Kim Youngsoo, Gim Yeongsu.  A one-syllable word that is a
    family name takes its usual spellings (``data/korean_surnames.tsv``: 이 Lee, Yi, Rhee), as does
    the first syllable of a three-syllable word (a whole name written together); other words are
    spelled in the Revised Romanization and the popular spelling, joined, hyphenated and spaced.
    At most :data:`HANGUL_SPELLINGS_MAX`; empty without Hangul, and for one syllable alone: a family
    name alone (Min, Song, Moon) is a common word in Latin letters, and in Hangul too short to search."""
    runs = list(_HANGUL_RUN.finditer(value))
    if sum(len(m.group()) for m in runs) < 2:
        return set()
    surnames = _korean_surnames()

    def given(word: str) -> list[str]:
        out = []
        for popular in (False, True):
            parts = [_hangul_syllable(c, popular) for c in word]
            out += ["".join(parts)] + (["-".join(parts), " ".join(parts)] if len(parts) > 1 else [])
        return list(dict.fromkeys(out))

    def spell(word: str) -> list[str]:
        if len(word) == 1 and word in surnames:
            return surnames[word]
        if len(word) == 3 and word[0] in surnames:  # 홍길동: family name and given name written together
            return [f"{s} {g}" for s in surnames[word[0]][:2] for g in given(word[1:])]
        return given(word)

    out = [""]
    pos = 0
    for m in runs:
        out = [o + value[pos:m.start()] + s.capitalize() for o in out for s in spell(m.group())][:HANGUL_SPELLINGS_MAX]
        pos = m.end()
    return {o + value[pos:] for o in out}


PINYIN_SPELLINGS_MAX = 64  # Latin spellings of one form at most
_HAN_RUN_CLASS = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"
_HAN_RUN = re.compile(_HAN_RUN_CLASS + "+")
_HAN_LETTER = re.compile(_HAN_RUN_CLASS)
_KANA_OR_HANGUL = re.compile("[\u3040-\u30ff\uff66-\uff9f\uac00-\ud7a3]")


@lru_cache(maxsize=1)
def _han_readings() -> dict[str, tuple[str, ...]]:
    """``data/han_readings.tsv``: a Han character -> its Mandarin readings (pinyin without tones,
    the usual one first)."""
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "han_readings.tsv").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            readings, chars = line.split("\t")
            out.update(dict.fromkeys(chars, tuple(readings.split())))
    return out


@lru_cache(maxsize=1)
def _han_surnames() -> dict[str, tuple[str, ...]]:
    """``data/han_surnames.tsv``: a family name read otherwise than its characters usually are
    (曾 Zeng, 单 Shan), or of two characters (欧阳 Ouyang) -> its readings."""
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "han_surnames.tsv").read_text(encoding="utf-8")
    return {k: tuple(v.split()) for k, v in (line.split("\t") for line in text.splitlines()
                                                if line and not line.startswith("#"))}


@lru_cache(maxsize=1)
def _wade_giles() -> dict[str, str]:
    """``data/pinyin_wade_giles.tsv``: a pinyin syllable -> its Wade-Giles spelling (Taiwan)."""
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "pinyin_wade_giles.tsv").read_text(encoding="utf-8")
    return dict(line.split("\t") for line in text.splitlines() if line and not line.startswith("#"))


def _syllables(c: str) -> list[str]:
    """A Han character's readings as Latin-script names write them: ü as u, yu (passports: LYU),
    v and ü (lü -> lu, lyu, lv, lü: the accent folding does not reach a word of two letters); then
    in Wade-Giles as Taiwan writes them (张 Chang, 谢 Hsieh, 志 Chih).  Empty for a character
    without a reading."""
    out = []
    readings = _han_readings().get(c, ())
    for r in readings:
        out += [r.replace("ü", u) for u in ("u", "yu", "v", "ü")] if "ü" in r else [r]
    wg = _wade_giles()
    out += [wg[r] for r in readings if r in wg]
    return list(dict.fromkeys(out))


def _pinyin_family(run: str) -> list[str]:
    """The readings of a family name of one or two characters, its reading as a family name first."""
    table = _han_surnames()
    first = [r.capitalize() for r in table.get(run, ())]
    rest = ["".join(c).capitalize() for c in _combinations([_syllables(c) for c in run], PINYIN_SPELLINGS_MAX)]
    return list(dict.fromkeys(first + rest))


def _pinyin_given(run: str) -> list[str]:
    """The readings of a given name (or any run of characters): its syllables joined, hyphenated
    and spaced (Xiaoming, Xiao-Ming, Xiao Ming)."""
    out = []
    for c in _combinations([_syllables(c) for c in run], PINYIN_SPELLINGS_MAX // 3):
        parts = [p.capitalize() for p in c]
        out += ["".join(parts).capitalize(), "-".join(parts), " ".join(parts)]
    return list(dict.fromkeys(out))


def pinyin_spellings(value: str) -> set[str]:
    """A Chinese name stored only in Han characters as Latin-script text writes it, in pinyin
    without tones (``data/han_readings.tsv``) and in Wade-Giles as Taiwan writes it
    (``data/pinyin_wade_giles.tsv``: 张^志明 as Chang^Chih-Ming): 王^小明 as Wang^Xiaoming, 小明 王 as Xiao-Ming Wang,
    王 小明 as Wang Xiao Ming; a character with several readings in each (曾 Zeng, Ceng), a family
    name in its reading as one first (``data/han_surnames.tsv``: 单 Shan, 欧阳 Ouyang).  A form of
    one run of two to four characters (王小明, a whole name written together) is also spelled
    split after its family name: Wang Xiaoming, Xiaoming Wang, Wang, Xiaoming.  At most
    :data:`PINYIN_SPELLINGS_MAX`; empty without Han characters, with kana or Hangul (a Japanese or
    Korean name), for one character alone and for a family name alone: Wang, Li, Zhang are words
    and names everywhere, and in Han characters too short to search."""
    if value.isascii() or _KANA_OR_HANGUL.search(value):
        return set()
    runs = list(_HAN_RUN.finditer(value))
    if sum(len(m.group()) for m in runs) < 2:
        return set()
    surnames = _han_surnames()
    if len(runs) == 1 and runs[0].group() == value.strip():  # one word: a given name, or a whole name
        run = runs[0].group()
        if run in surnames:
            return set()  # a family name of two characters alone (Ouyang)
        out = _pinyin_given(run)[:PINYIN_SPELLINGS_MAX // 2]
        if len(run) <= 4:
            k = 2 if len(run) >= 3 and run[:2] in surnames else 1
            for f, g in _combinations([_pinyin_family(run[:k]), _pinyin_given(run[k:])], PINYIN_SPELLINGS_MAX // 8):
                out += [f"{f} {g}", f"{g} {f}", f"{f}, {g}", f"{f}^{g}"]
        # written together, four letters or fewer (Nana, Lina) are in binary values by chance (a
        # palette's bytes read as Latin-1 and folded): only spaced (Na Na, Li Na) are searched
        return {o for o in out if " " in o or "-" in o or len(o) >= 5}
    options, pos = [], 0
    for m in runs:
        run = m.group()
        options += [[value[pos:m.start()]], _pinyin_family(run) if len(run) == 1 or run in surnames
                    else _pinyin_given(run)]
        pos = m.end()
    options.append([value[pos:]])
    return {"".join(c) for c in _combinations(options, PINYIN_SPELLINGS_MAX)}


HAN_VARIANTS_MAX = 256  # spellings of one form at most; past that each character's variants one at a time


def han_variants(value: str) -> set[str]:
    """A Chinese or Japanese name in its other Han characters: simplified 张伟 ↔ traditional 張偉,
    Japanese 渡辺 ↔ 渡邊, mixed ones too (a record typed on another system).  Every combination up
    to :data:`HAN_VARIANTS_MAX`; for a longer form (a name's whole value with all its
    representations), each character's variants with the rest as written: its shorter forms hold
    the combinations.  Empty without Han characters."""
    if value.isascii():
        return set()
    table = _han_classes()
    options = [table.get(c, c) for c in value]
    if all(len(o) == 1 for o in options):
        return set()
    count = 1
    for o in options:
        count *= len(o)
    if count <= HAN_VARIANTS_MAX:
        from itertools import product
        out = {"".join(p) for p in product(*options)}
    else:
        out = {value[:i] + v + value[i + 1:] for i, o in enumerate(options) for v in o}
    out.discard(value)
    return out


_ACCENTS = (("ue", "ü"), ("oe", "ö"), ("ae", "ä"), ("aa", "å"), ("oe", "ø"), ("ss", "ß"))
_ACCENT_DIGRAPH = re.compile("|".join(sorted({d for d, _ in _ACCENTS})), re.IGNORECASE)


def accented_spellings(value: str) -> set[str]:
    """The spellings an ASCII name may have in text written with accents: MUELLER → Müller, Muller;
    OEDEGAARD → Ødegård (one digraph replaced everywhere at a time, then all at once)."""
    if not value.isascii() or not _ACCENT_DIGRAPH.search(value):
        return set()
    low = value.lower()
    return {o for o in _accent_variants(low) if o != low and len(o) >= 3}


def _accent_variants(low: str) -> set[str]:
    """Lower-case ``low`` with each of its digraphs as its letter and as its first letter, and with
    all of them as their letters (what :func:`accented_spellings` keeps of them)."""
    out = set()
    for digraph, letter in _ACCENTS:
        if digraph in low:
            out |= {low.replace(digraph, letter), low.replace(digraph, digraph[0])}
    every = low
    for digraph, letter in _ACCENTS[:4]:
        every = every.replace(digraph, letter)
    out.add(every)
    return out


_NUMERIC_FORM = re.compile(r"[\d\s()./:+-]+")
_PLAIN_WORD = re.compile(r"[^\W\d_]+")


_SHORT_CODE = re.compile(r"(?=.*[a-z])(?=.*[0-9])[a-z0-9]{2,5}", re.I)  # letters with digits, <= 5 chars


def excluded_by(form: str, kind: str) -> str | None:
    """The rule that excludes ``form`` from the search, None when it is searched for."""
    r = rules()
    if kind == "uid":
        return None if len(form) >= r["min_length"] else "too_short"
    compact = "".join(form.split())
    weight = len(compact) if compact.isascii() else sum(
        1 if ord(c) < 128 else r["non_ascii_weight"] for c in compact)
    if weight < r["min_length"]:
        return "too_short"
    if form.casefold() in r["common"]:
        return "common"
    if len(set(compact.casefold())) == 1:
        return "one_character"  # "000000000", "XXXXXX": a placeholder a device wrote, no identity
    if _NUMERIC_FORM.fullmatch(form) and sum(c.isdigit() for c in form) < r["min_digits"]:
        return "too_few_digits"
    if kind == "path" and _PLAIN_WORD.fullmatch(form):
        return "plain_word_path"  # a folder label like "unreadable"; names in paths are searched as names
    if kind == "path" and _SHORT_CODE.fullmatch(form):
        return "short_code_path"  # a scanner or software label like "xa30", "ve11c" (no name, no ID)
    return None


@lru_cache(maxsize=1)
def rules() -> dict:
    """The exclusion rules (``data/leakscan.yaml``)."""
    import yaml
    from importlib import resources
    text = resources.files("deidflow").joinpath("data", "leakscan.yaml").read_text(encoding="utf-8")
    r = yaml.safe_load(text)
    r["common"] = frozenset(str(c).casefold() for c in r["common"])
    return r


@dataclass(frozen=True, slots=True)
class Needle:
    """One searchable byte form of an original value (lower-cased as the scanned text is).
    ``mode``: ``literal`` (found as written), ``date`` (``text`` is YYYYMMDD, found in any written
    form) or ``compact`` (an ID's letters and digits, found also with separators between them)."""

    text: bytes
    kind: str
    field: str
    digest: str  # keyed hash of the original value: the only trace of it a hit shows
    owner: str  # the subject the value belongs to
    mode: str = "literal"


def _is_letter(b: int) -> bool:
    return 97 <= b <= 122 or 65 <= b <= 90 or b >= 128


def _is_digit(b: int) -> bool:
    return 48 <= b <= 57


def _char_after(hay: bytes, e: int) -> str | None:
    """The well-formed multi-byte UTF-8 character that starts at hay[e], None when there is none
    (the bytes of a binary structure such as a DICOM tag: FE FF item delimiters, E0 7F Pixel Data)."""
    lead = hay[e]
    n = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    if not n or e + n > len(hay):
        return None
    try:
        return hay[e:e + n].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _char_before(hay: bytes, s: int) -> str | None:
    """The well-formed multi-byte UTF-8 character that ends at hay[s - 1], None when there is none."""
    for n in (2, 3, 4):
        if s - n >= 0 and (c := _char_after(hay, s - n)) is not None and len(c) == 1 and len(c.encode()) == n:
            return c
    return None


@lru_cache(maxsize=4096)
def _latin_letter(c: str | None) -> bool:
    """Whether a non-ASCII character continues a word of Latin letters: an accented Latin letter
    (Müller is not Mül) or a combining mark; punctuation (’ “ ” – …), spaces (NBSP), symbols and
    letters of other scripts (様, Cyrillic) end it."""
    if c is None:
        return False
    cat = unicodedata.category(c)
    return cat.startswith("M") or (cat.startswith("L") and "LATIN" in unicodedata.name(c, ""))


def _bounded(hay: bytes, s: int, e: int) -> bool:
    """Whether hay[s:e] is a whole token: an end that is an ASCII letter must not touch another
    Latin letter (ASCII, or an accented one in UTF-8: Müller is not Mül; typographic punctuation,
    NBSP, other scripts and bytes that are not UTF-8 text, such as the tag after a DICOM value,
    are no letters), one that is a digit not another digit (nor a decimal point between digits);
    an end that is not ASCII may touch anything (CJK text has no word breaks)."""
    first, last = hay[s], hay[e - 1]
    if s > 0:
        left = hay[s - 1]
        if first < 128 and _is_letter(first) and _is_letter(left) and (
                left < 128 or _latin_letter(_char_before(hay, s))):
            return False
        if _is_digit(first) and (_is_digit(left) or (left == 46 and s > 1 and _is_digit(hay[s - 2]))):
            return False
    if e < len(hay):
        right = hay[e]
        if last < 128 and _is_letter(last) and _is_letter(right) and (
                right < 128 or _latin_letter(_char_after(hay, e))):
            return False
        if _is_digit(last) and (_is_digit(right) or (right == 46 and e + 1 < len(hay) and _is_digit(hay[e + 1]))):
            return False
    return True


def _uid_component(hay: bytes, s: int, e: int) -> bool:
    """Whether digits ``hay[s:e]`` are one whole component of a UID (1.2.826.0.1.44120987.3)."""
    left = hay[s - 1] if s > 0 else None
    right = hay[e] if e < len(hay) else None
    return (hay[s:e].isdigit() and (left == 46 or right == 46) and (left is None or left == 46 or not _is_digit(left))
            and (right is None or right == 46 or not _is_digit(right)))


_TOKEN = re.compile(rb"[a-z]+|[0-9]+")
_TITLES = rb"(?:dr|prof|med|mr|mrs|ms|herr|frau|mme|sig|sra?|univ|doz|pd)\.?"
_WHITE_RUN = re.compile(rb"[ \t\r\n\\]+(?:" + _TITLES + rb"[ \t\r\n]+)*")  # read as one space (\\: two DICOM values)
_LOOSE_NEAR = re.compile(rb"[\t\r\n\\]|  |(?<![a-z])" + _TITLES + rb"[ \t\r\n]")  # where that changes a text
_UID_TOKEN = re.compile(rb"[0-9]+(?:\.[0-9]+)+")
_SPLIT_WORDS = re.compile(r"[\s,;]+")
_ID_SEPARATOR_BYTES = b" \t\r\n()./_:+-\\"  # (a backslash: an ID split over two DICOM values)
_YEAR = re.compile(rb"(?:1[89]|20)[0-9][0-9]")
_DATE_BEFORE, _DATE_AFTER = 48, 20  # after the year: " 년 4 월 23 일" takes 19 bytes
# A numeric date with a two-digit year (12.03.61): looked up whole, not by its two-digit tokens
# (which occur everywhere in binary blobs).
_SHORT_DATE = re.compile(rb"(?<![0-9.])[0-9]{2}[./-][0-9]{2}[./-][0-9]{2}(?![0-9]|\.[0-9])")
_SEPARATORS_RE = rb"[" + re.escape(_ID_SEPARATOR_BYTES) + rb"]*"


@lru_cache(maxsize=4096)
def _spaced(compact: bytes) -> re.Pattern:
    """An ID's letters and digits with any separators between them."""
    return re.compile(_SEPARATORS_RE.join(re.escape(bytes([c])) for c in compact))  # how far a written date reaches before and after its year


def _year_of_a_date(low: bytes, p: int) -> bool:
    """Whether the four digits at ``p`` can be the year of a date :func:`dates_in` reads: a number
    of their own (1961-04-23, 23.4.1961, 1961年), or the first or last four of a number of eight
    digits (19610423, 23041961); not four digits inside a longer number (a UID, a time stamp, a
    count), where a window for every searched year cost as much as the rest of the matcher on a
    Siemens header once the other subjects' birth years were searched."""
    before = p > 0 and 48 <= low[p - 1] <= 57
    after = p + 4 < len(low) and 48 <= low[p + 4] <= 57
    if not before and not after:
        return True
    if before and after:
        return False
    if after:  # the number starts here: eight digits in all
        return p + 8 <= len(low) and low[p + 4:p + 8].isdigit() and not (p + 8 < len(low) and 48 <= low[p + 8] <= 57)
    return p >= 4 and low[p - 4:p].isdigit() and not (p > 4 and 48 <= low[p - 5] <= 57)


def anchor(text: bytes) -> tuple[int, bytes] | None:
    """The word a form is found by (:class:`Matcher`): its longest ASCII word, the first of equal
    length, with its offset; None when it has none.  A bounded occurrence of the form in a text
    holds this word as a whole word of the text (:func:`words`)."""
    toks = [(m.start(), m.group()) for m in _TOKEN.finditer(text)]
    return max(toks, key=lambda t: (len(t[1]), -t[0])) if toks else None


def words(low: bytes) -> set[bytes]:
    """The ASCII words of lower-cased ``low``, as the Matcher tokenises a text."""
    return set(_TOKEN.findall(low))


def _index(index: dict, needle: Needle) -> bool:
    """File ``needle`` under its :func:`anchor` in ``index``; False when it has none."""
    found = anchor(needle.text)
    if found is None:
        return False
    off, tok = found
    shape = index.setdefault(tok, {}).setdefault((off, len(needle.text)), {})
    shape.setdefault(needle.text, []).append(needle)
    return True


class Matcher:
    """Finds the values of any number of subjects in a text in one pass (cost grows with the text,
    not with the number of values): literal forms are indexed by their longest ASCII token, UIDs by
    value; written dates are recognised and looked up as YYYYMMDD; IDs are also found with
    separators between their characters (``P-968-287`` for ``P968287``); forms without an ASCII
    token are searched as substrings.  The one matcher of deidflow: the engines' residual sweep
    (:meth:`redact`), the leak scan and the report's self-check use it."""

    def __init__(self, needles: Iterable[Needle]):
        # anchor token -> (offset of the token in the form, form length) -> form -> its needles: an
        # occurrence of the token is checked once per shape, however many subjects share the token
        self.anchors: dict[bytes, dict[tuple[int, int], dict[bytes, list[Needle]]]] = {}
        self.uids: dict[bytes, list[Needle]] = {}
        self.dates: dict[bytes, list[Needle]] = {}
        self.compact: dict[bytes, list[Needle]] = {}
        self.compact_anchors: dict[bytes, dict[tuple[int, int], dict[bytes, list[Needle]]]] = {}
        self.short_dates: dict[bytes, list[Needle]] = {}
        self.substrings: list[Needle] = []
        self.count = 0
        seen, seen_texts = set(), set()
        for n in needles:
            key = self.key(n)
            if key in seen:
                continue
            seen.add(key)
            seen_texts.add(n.text)
            self.count += 1
            if n.mode == "date":
                self.dates.setdefault(n.text, []).append(n)
            elif n.mode == "compact":
                self.compact.setdefault(n.text, []).append(n)
                _index(self.compact_anchors, n)
            elif n.kind == "uid" and _UID_TOKEN.fullmatch(n.text):
                self.uids.setdefault(n.text, []).append(n)
            elif _SHORT_DATE.fullmatch(n.text):
                self.short_dates.setdefault(n.text, []).append(n)
            else:
                if not _index(self.anchors, n):
                    self.substrings.append(n)
        self.anchor_keys = frozenset(self.anchors)
        self._reach: dict[bytes, int] = {}  # per anchor: its longest form (how far white space is looked for)
        self.uid_keys = frozenset(self.uids)
        self.date_years = frozenset(k[:4] for k in self.dates)
        self.digit_anchor_lengths = sorted({len(t) for t in self.compact_anchors if t.isdigit()})
        # the values' characters above Latin-1 (UTF-16 text is read around them: folding.script_views)
        self.script_chars = frozenset(c for text in seen_texts if max(text, default=0) >= 0xC4
                                      for c in text.decode("utf-8", "ignore") if "\u00ff" < c < "\ud800")

    def __len__(self) -> int:
        return self.count

    def script_chars_all(self) -> frozenset[str]:
        """The searched values' characters above Latin-1 (UTF-16 text is read around them)."""
        return self.script_chars

    @staticmethod
    @lru_cache(maxsize=64)
    def east_asian_chars(chars: frozenset[str]) -> bool:
        """Whether searched characters are Japanese, Chinese or Korean: their dates are then also
        read in legacy CJK encodings (1961年4月23日 in Shift-JIS; ``folding.legacy_views``)."""
        return any(east_asian(c) for c in chars)

    def empty(self) -> bool:
        """Nothing to search for (a subclass may search more than its needles)."""
        return not self.count

    @staticmethod
    def key(n: Needle) -> tuple:
        """What makes two needles one searched form (:func:`len` counts these)."""
        return (n.text, n.owner, n.digest, n.mode)

    def spans(self, text: bytes, folded: bool = False) -> list[tuple[int, int, Needle]]:
        """(start, end, needle) of every occurrence in ``text`` (any case; Latin letters with
        accents also as their base letters, UTF-16 text as text: see :mod:`deidflow.qc.folding`)."""
        if self.empty() or not text:
            return []
        low = text.lower()
        hits: list[tuple[int, int, Needle]] = []
        if self.anchor_keys:
            if len(self.anchor_keys) < 48:  # a few values: direct search is faster than tokenising
                for tok in [t for t in self.anchor_keys if t in low]:
                    i = low.find(tok)
                    while i >= 0:
                        self._anchored(low, i, tok, hits)
                        i = low.find(tok, i + 1)
            else:  # many values (a dataset): one pass over the text's tokens, not one search per value
                # (a bounded occurrence's anchor is always one whole token of the text)
                anchors = self.anchors
                for m in _TOKEN.finditer(low):
                    if m.group() in anchors:
                        self._anchored(low, m.start(), m.group(), hits)
        if self.uid_keys and b"." in low:  # a bounded UID is one whole UID token of the text
            for m in _UID_TOKEN.finditer(low):
                uid = m.group()
                if uid in self.uid_keys and _bounded(low, m.start(), m.end()):
                    hits.extend((m.start(), m.end(), n) for n in self.uids[uid])
        if self.dates:
            for ws, we in self._date_windows(low):
                for s, e, cands in dates_in(low[ws:we]):
                    for c in cands:
                        for n in self.dates.get(c.encode(), ()):
                            hits.append((ws + s, ws + e, n))
            born = [(s, e, n) for s, e, cands in birth_dates_in(low) for c in cands
                    for n in self.dates.get(c.encode(), ()) if _BIRTH_FIELD.search(n.field)]
            if not folded:  # (UTF-16 and accent-folded views hold no era date the text did not)
                hits += [(s, e, n) for s, e, cands in era_dates_in(low) for c in cands
                         for n in self.dates.get(c.encode(), ())]
        if self.short_dates:
            if len(self.short_dates) < 48:  # a few dates: direct search is faster than the pattern
                for k in self.short_dates:
                    i = low.find(k)
                    while i >= 0:
                        if _bounded(low, i, i + len(k)) and low[i - 1:i] != b".":
                            hits.extend((i, i + len(k), n) for n in self.short_dates[k])
                        i = low.find(k, i + 1)
            else:
                for m in _SHORT_DATE.finditer(low):
                    hits.extend((m.start(), m.end(), n) for n in self.short_dates.get(m.group(), ()))
        if self.compact:
            hits += self._compact_spans(low)
        for needle in self.substrings:
            i = low.find(needle.text)
            while i >= 0:
                hits.append((i, i + len(needle.text), needle))
                i = low.find(needle.text, i + 1)
        if self.dates and born:  # (a date another reader or a literal form found counts once)
            seen = {(s, e, n.digest) for s, e, n in hits}
            hits += [h for h in born if (h[0], h[1], h[2].digest) not in seen]
        if not folded:  # MULLER^JURGEN written Müller Jürgen; UTF-16 text in binary values
            chars = self.script_chars_all()
            hits += fold_accents(low, self.spans) + utf16_views(low, self.spans) + wide_space_views(low, self.spans) + \
                script_views(text, self.spans, chars) + compressed_views(text, self.spans) + \
                legacy_views(text, self.spans, chars | DATE_CHARS if self.dates and self.east_asian_chars(chars)
                             else chars) + \
                base64_views(text, self.spans)
        return hits

    def _anchored(self, low: bytes, i: int, tok: bytes, hits: list) -> None:
        """The values anchored on ``tok`` that occur, whole, around its occurrence at ``i``; a form
        of several words also with a line break, a tab or more than one space between them
        (``Erika\nMustermann``, ``Wu  Li``: a wrapped line, a padded field)."""
        shapes = self.anchors[tok]
        for (off, n), forms in shapes.items():
            s = i - off
            if s >= 0 and (found := forms.get(low[s:s + n])):
                if _bounded(low, s, s + n):
                    hits.extend((s, s + n, needle) for needle in found)
                elif _uid_component(low, s, s + n):  # root.<accession number>: an ID, not a date
                    hits.extend((s, s + n, needle) for needle in found if needle.kind == "id")
        if not _bounded(low, i, i + len(tok)):
            return  # (the anchor of a form found whole is a whole word: "li" in "slice" is none)
        reach = self._reach.get(tok)
        if reach is None:
            reach = self._reach[tok] = max(n for _, n in shapes)
        if _LOOSE_NEAR.search(low, max(0, i - reach - 4), i + reach + 4):
            self._anchored_loose(low, i, shapes, reach, hits)

    @staticmethod
    def _anchored_loose(low: bytes, i: int, shapes: dict, reach: int, hits: list) -> None:
        """:meth:`_anchored` in the text around ``i`` with each run of white space, and the titles
        in it (``Mustermann, Prof. Dr. Erika``), read as one space."""
        a = max(0, i - 2 * reach - 8)
        seg = low[a:i + 2 * reach + 8]
        parts, at, pos = [], [], 0  # at: the offset in low of each byte of the loose reading
        for m in _WHITE_RUN.finditer(seg):
            parts += [seg[pos:m.start()], b" "]
            at += [*range(a + pos, a + m.start()), a + m.start()]
            pos = m.end()
        parts.append(seg[pos:])
        at += range(a + pos, a + len(seg))
        loose = b"".join(parts)
        try:
            j = at.index(i)
        except ValueError:
            return  # the anchor is itself a word read as a title (a name "Med")
        for (off, n), forms in shapes.items():
            s = j - off
            if s >= 0 and s + n <= len(loose) and (found := forms.get(loose[s:s + n])):
                start, end = at[s], at[s + n - 1] + 1
                if low[start:end] != loose[s:s + n] and _bounded(low, start, end):  # (as written: found above)
                    hits.extend((start, end, needle) for needle in found)

    def _date_windows(self, low: bytes) -> list[tuple[int, int]]:
        """Stretches of ``low`` around each occurrence of a searched date's year (a written date
        with a four-digit year lies within them), merged; dates are recognised only there."""
        if len(self.date_years) <= 8:
            pos = []
            for y in self.date_years:
                i = low.find(y)
                while i >= 0:
                    pos.append(i)
                    i = low.find(y, i + 1)
        else:
            pos = [m.start() for m in _YEAR.finditer(low) if m.group() in self.date_years]
        out: list[list[int]] = []
        for p in sorted(pos):
            if not _year_of_a_date(low, p):
                continue
            s, e = max(0, p - _DATE_BEFORE), min(len(low), p + 4 + _DATE_AFTER)
            while s > 0 and (48 <= low[s - 1] <= 57 or low[s - 1] == 46):
                s -= 1  # do not start inside a number
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return [(s, e) for s, e in out]

    def _compact_spans(self, low: bytes) -> list[tuple[int, int, Needle]]:
        """IDs written with separators between their letters and digits (``P 968-287``): the text
        without separators is searched for the IDs' letters and digits; a hit maps back to the
        original stretch."""
        compacted = low.translate(None, _ID_SEPARATOR_BYTES)
        if len(compacted) == len(low):
            return []  # no separator at all: the literal forms found everything
        if len(self.compact_anchors) < 48:
            present = {t for t in self.compact_anchors if t in compacted}
        else:  # whole words of the text with and without separators, and an anchor's digits run into
            # neighbouring digits once the separators went (968-287 2019-05-01 -> 96828720190501)
            words = set(_TOKEN.findall(compacted)) | set(_TOKEN.findall(low))
            present = self.compact_anchors.keys() & words
            for w in words:
                if self.digit_anchor_lengths and len(w) > self.digit_anchor_lengths[0] and w[:1].isdigit():
                    for n in self.digit_anchor_lengths:
                        present.update(w[i:i + n] for i in range(len(w) - n + 1) if w[i:i + n] in self.compact_anchors)
        found: dict[bytes, list[Needle]] = {}
        for tok in present:  # which IDs the compacted text holds: each occurrence of an anchor once
            shapes = self.compact_anchors[tok]
            i = compacted.find(tok)
            while i >= 0:
                for (off, n), forms in shapes.items():
                    if i >= off and (f := forms.get(compacted[i - off:i - off + n])):
                        found[compacted[i - off:i - off + n]] = f
                i = compacted.find(tok, i + 1)
        out = []
        for text, needles in found.items():
            for m in _spaced(text).finditer(low):  # where it is in the original text
                s, e = m.span()
                if e - s > len(text) and _bounded(low, s, e):  # written with separators
                    out += [(s, e, n) for n in needles]
        return out

    def numbers(self, values: Iterable[float]) -> list[tuple[int, Needle]]:
        """(position, needle) of each number in ``values`` (a numeric header field's) that writes an
        identifier: an MRN or a birth date YYYYMMDD stored as a number is found in the number's
        digits (:func:`number_text`)."""
        return [(i, n) for i, v in enumerate(values) if (t := number_text(v)) for _, _, n in self.spans(t, folded=True)]

    def find(self, text: bytes | str) -> list[tuple[int, Needle]]:
        """(offset, needle) of every occurrence in ``text`` (bytes, or str searched as UTF-8)."""
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        return [(s, n) for s, _, n in self.spans(text)]

    def redact(self, data: bytes, fill: bytes = b"*", same_length: bool = True) -> bytes:
        """``data`` with every occurrence replaced: by ``fill`` repeated to the same length (binary
        and fixed-size values), or by one ``fill`` per occurrence.  ``data`` itself when nothing
        was found."""
        spans = sorted((s, e) for s, e, _ in self.spans(data))
        if not spans:
            return data
        merged: list[list[int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        out, pos = [], 0
        for s, e in merged:
            out += [data[pos:s], fill * (e - s) if same_length else fill]
            pos = e
        out.append(data[pos:])
        return b"".join(out)

    def redact_text(self, text: str, fill: str = "*", same_length: bool = False) -> str:
        """``text`` with every occurrence replaced by ``fill`` (one per occurrence, or one per
        character with ``same_length``); ``text`` itself when none."""
        data = text.encode("utf-8", "surrogateescape")
        if not same_length or text.isascii():
            new = self.redact(data, fill.encode(), same_length=same_length)
            return text if new is data else new.decode("utf-8", "replace")
        spans = self.spans(data)
        if not spans:
            return text
        char_at, pos = [], 0  # byte offset -> character index
        for i, c in enumerate(text):
            n = len(c.encode("utf-8", "surrogateescape"))
            char_at += [i] * n
            pos += n
        char_at.append(len(text))
        chars = list(text)
        for s, e, _ in spans:
            for k in range(char_at[s], char_at[e] if e < len(char_at) else len(text)):
                chars[k] = fill
        return "".join(chars)


def number_text(value) -> bytes:
    """A number as the text an identifier stored in a numeric field reads as: an integral value of
    six digits or more as its digits (4455667.0 -> ``4455667``, 19610423.0 -> ``19610423``); empty
    for any other (a fraction or a small count holds no identifier the matcher would find in it)."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return b""
    if not math.isfinite(x) or x != int(x) or abs(x) < 100000 or abs(x) >= 1e19:
        return b""
    return str(abs(int(x))).encode()


def _digest(salt: bytes, value: str) -> str:
    return hashlib.blake2s(value.encode("utf-8"), key=salt, digest_size=6).hexdigest()


def needles_for(subject: str, entries: Iterable[tuple[str, str, str]], salt: bytes,
                excluded: Counter | None = None, wide: bool | None = None) -> list[Needle]:
    """The searchable forms of a subject's identifier entries ``(kind, field, value)``; excluded
    forms are counted per rule in ``excluded``.  ``wide``: whether its IDs and Latin names are also
    searched in full width (None: when one of the entries is a CJK name)."""
    entries = list(entries)
    # a subject with a CJK name: its IDs and Latin names also as East Asian text writes them
    if wide is None:
        wide = any(kind.startswith(("name", "whole_name")) and east_asian(value) for kind, _, value in entries)
    out: list[Needle] = []
    done: set[tuple[str, str]] = set()
    for kind, fld, value in entries:
        digest = _digest(salt, value)
        own = words(value.lower().encode("ascii", "ignore"))  # a name's own Latin words (YAMADA)
        for key, rule, texts in _searched(kind, value):
            if key in done:
                continue
            done.add(key)
            if rule:
                if excluded is not None:
                    excluded[rule] += 1
                continue
            nkind = "name" if kind.startswith("whole_name") else "date" if kind == "date_year4" else kind
            out += [Needle(text, nkind, fld, digest, subject, mode) for text, mode in texts]
            # full width: an ID, and a name form of the name's own Latin words (YAMADA TAROU), not
            # the spellings made of its CJK characters (Wang Xiaoming in pinyin, Hong Gildong)
            if wide and (nkind == "id" or (nkind == "name" and words(key[0].lower().encode("ascii", "ignore")) <= own)):
                out += [Needle(text, nkind, fld, digest, subject) for text in full_width_forms(key[0])]
    return out


_EAST_ASIAN = re.compile("[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff66-\uff9f]")


def east_asian(value: str) -> bool:
    """Whether a value holds Japanese, Chinese or Korean characters (its subject's IDs and Latin
    names are then also searched in full width)."""
    return bool(_EAST_ASIAN.search(value))


def full_width_forms(form: str) -> set[bytes]:
    """An ASCII form in full-width letters and digits (ＭＲＮ４７１１０００, ＹＡＭＡＤＡ, Ｙａｍａｄａ),
    as Japanese, Chinese and Korean text writes them, in UTF-8; empty for other forms."""
    if not form.isascii() or not any(c.isalnum() for c in form):
        return set()
    wide = {c: chr(ord(c) + 0xFEE0) for c in map(chr, range(0x21, 0x7F))}
    return {"".join(wide.get(c, c) for c in v).encode("utf-8") for v in (form, form.upper(), form.lower(), form.title())}


@lru_cache(maxsize=1 << 15)
def _searched(kind: str, value: str) -> tuple[tuple[tuple[str, str], str | None, tuple[tuple[bytes, str], ...]], ...]:
    """What :func:`needles_for` searches for one value, whoever it belongs to: per form, its key
    (a subject's forms are searched once), the rule that excludes it or None, and its byte forms
    with their modes.  Cached: values many subjects share (institution, dates) are worked out once.
    Kind ``date_year4``: a date in its written forms with a four-digit year (and after a birth
    word in any form), not in the literal two-digit-year forms (another subject's birth date)."""
    out = []
    if kind in ("date", "datetime", "date_year4"):
        d = value.strip()[:8]
        if len(d) == 8 and d.isdigit():
            rule = excluded_by(d, "date")
            short = [] if kind == "date_year4" else [(f.encode(), "literal") for f in _two_digit_year_forms(d)]
            texts = [] if rule else [(d.encode(), "date")] + short
            out.append(((d, "date"), rule, tuple(texts)))
        if kind != "datetime":
            return tuple(out)
    for form in sorted(forms(kind, value)):
        rule = excluded_by(form, kind)
        texts = []
        if not rule and form.isascii():  # the same bytes in UTF-8 and Latin-1
            texts.append((form.lower().encode("ascii"), "literal"))
            if kind == "id":
                compact = re.sub(rb"[^a-z0-9]", b"", texts[0][0])
                # the digits of an ID with letters, on their own, with separators only when there
                # are eight or more: TINY001234's 001234 was found in release names (MR001-234ab4)
                short_run = form.isdigit() and len(form) < 8 and any(c.isalpha() for c in value)
                if len(compact) >= 6 and sum(c.isdigit() for c in form) >= 3 and not short_run:
                    texts.append((compact, "compact"))
        elif not rule:
            for v in sorted({form, form.lower(), form.upper(), form.casefold()}):
                for enc in ("utf-8", "latin-1"):
                    try:
                        texts.append((v.encode(enc).lower(), "literal"))
                    except UnicodeEncodeError:
                        continue
        out.append(((form, kind), rule, tuple(dict.fromkeys(texts))))
    return tuple(out)


def _two_digit_year_forms(d: str) -> list[str]:
    """Written forms of YYYYMMDD ``d`` with a two-digit year, searched literally (the date reader
    looks for dates only around four-digit years): 16.07.64, 07/16/64, 16/07/64, 16-07-64, unpadded
    with slashes (7/3/58, 3/7/58), and the
    month by its English abbreviation as legacy systems print it, 16-jul-64, 16 jul 64, 16jul64
    (also with the day's leading zero dropped)."""
    y2, m, dd = d[2:4], d[4:6], d[6:]
    out = {f"{dd}.{m}.{y2}", f"{m}/{dd}/{y2}", f"{dd}/{m}/{y2}", f"{dd}-{m}-{y2}"}
    mi, di = int(m), int(dd)
    out |= {f"{mi}/{di}/{y2}", f"{di}/{mi}/{y2}"}  # unpadded 3/7/58 (not 7.3.58: version numbers)
    if 1 <= int(m) <= 12:
        mon = _MONTHS[int(m) - 1][:3].lower()
        for day in {dd, str(int(dd))}:
            out |= {f"{day}-{mon}-{y2}", f"{day} {mon} {y2}", f"{day}{mon}{y2}"}
    return sorted(out)


def needle_texts(kind: str, value: str) -> list[bytes]:
    """The byte forms :func:`needles_for` makes of one value (excluded forms left out)."""
    return [text for _, rule, texts in _searched(kind, value) if not rule for text, _ in texts]


def matcher_for(entries: Iterable[tuple[str, str, str]], subject: str = "", salt: bytes = b"") -> Matcher:
    """The matcher of one subject's identifier entries (what the engines' residual sweep uses)."""
    return Matcher(needles_for(subject, entries, salt))


_NAME_LIKE = re.compile(r"[^\W\d_]{2,}(?:[_.,' -]+[^\W\d_]{2,}){1,3}")
# A folder named for a person and a number of six digits or more (birth date, MRN) after it.
_NAME_AND_NUMBER = re.compile(r"([^\W\d_]{2,}(?:[_.,' -]+[^\W\d_]{2,}){1,3}|[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]{2,8})"
                              r"[_., -]+([A-Za-z]{0,4}\d[\d./-]{4,}\d)")  # 山田太郎_19610423 too


def guess(value: str) -> list[tuple[str, str]]:
    """``(kind, value)`` of a value whose kind is known only from its look (the inventory's patient
    name, ID and birth date of a subject, or a non-DICOM subject's identity from its folder): a
    date (8 digits), a person name (``^`` or letters only), else an ID.  Two to four words of
    letters joined by ``_`` or ``.`` (a folder named ``Mueller_Hans``, ``OKAFOR.CHIDI``) are a
    name too (``Mueller^Hans``) besides the ID as written, also when a birth date or an MRN
    follows them (``ZEBROWSKI_KASIMIR_19610423``, ``Doe John MRN7110466``)."""
    v = str(value).strip("\x00 ")
    if not v:
        return []
    digits = v.replace("-", "")
    if len(digits) == 8 and digits.isdigit() and _ymd(digits[:4], int(digits[4:6]), int(digits[6:])):
        return [("date", digits)]  # not 58-21-3907 (an ID: as a date it would never be found)
    if "^" not in v and re.search(r"[_.]", v) and _NAME_LIKE.fullmatch(v):
        return [("name", "^".join(w for w in re.split(r"[_., -]+", v) if w)), ("id", v)]
    named = _NAME_AND_NUMBER.fullmatch(v) if "^" not in v else None
    if named and sum(c.isdigit() for c in named.group(2)) >= 6:  # ZEBROWSKI_KASIMIR_19610423
        number = named.group(2)
        return [("name", "^".join(w for w in re.split(r"[_., -]+", named.group(1)) if w)), ("id", v),
                *guess(number)]
    if "^" in v or all(c.isalpha() or c in " .,'-" for c in v):
        return [("name", v)]
    return [("id", v)]


class IdentifierModel:
    """One subject's identifying values as an engine meets them, and the matcher over them: the
    residual sweep that every scrubber applies to each value it keeps (DICOM, the other formats,
    BIDS sidecars).  Values are added as files are read; the matcher is rebuilt only when the set
    of values grows (a subject's files usually repeat the same values)."""

    __slots__ = ("entries", "_seen", "_matcher")

    def __init__(self, entries: Iterable[tuple[str, str, str]] = ()) -> None:
        self.entries: set[tuple[str, str, str]] = set()
        self._seen: set[tuple[str, str]] = set()
        self._matcher: Matcher | None = None
        for e in entries:
            self.add(*e)

    def add(self, kind: str, field: str, value: str) -> None:
        value = str(value).strip("\x00 \t\r\n")
        if kind in SWEEP_KINDS and value and (kind, value) not in self._seen:
            self._seen.add((kind, value))
            self.entries.add((kind, field, value))
            self._matcher = None

    def add_values(self, field: str, values: Iterable[str]) -> None:
        """Values of a non-DICOM field, classified by :func:`field_kind` (unclassified: ignored)."""
        for v in values:
            if v:
                kind = field_kind(field, str(v))
                if kind == "date":
                    v = str(v).replace("-", "")[:8]
                if kind:
                    self.add(kind, field, str(v))

    def add_guess(self, field: str, value: str) -> None:
        """A value whose kind is known only from its look (see :func:`guess`)."""
        for kind, v in guess(value):
            self.add(kind, field, v)

    def add_keyword(self, keyword: str, value) -> None:
        """A value of the DICOM attribute ``keyword`` (a BIDS sidecar field of the same name)."""
        from pydicom.datadict import tag_for_keyword
        tag = tag_for_keyword(keyword)
        if tag is not None:
            if keyword.endswith("Date") and isinstance(value, str):
                value = value.replace("-", "")
            self.add_element(tag, None, value)

    def add_element(self, tag: int, vr: str | None, value) -> None:
        """A decoded DICOM value of an identifying attribute (see :func:`element_kind`)."""
        kind, field = element_kind(tag, vr)
        if kind in SWEEP_KINDS:
            for s in _strings(value):
                self.add(kind, field, s)

    @property
    def matcher(self) -> Matcher:
        if self._matcher is None:
            self._matcher = matcher_for(sorted(self.entries))
        return self._matcher

    def redact_text(self, text: str, fill: str = "*", same_length: bool = False) -> str:
        return self.matcher.redact_text(text, fill, same_length) if self.entries else text

    def redact(self, data: bytes, fill: bytes = b"*") -> bytes:
        """Same-length redaction of a binary or fixed-size value (``data`` itself when clean)."""
        return self.matcher.redact(data, fill) if self.entries else data
