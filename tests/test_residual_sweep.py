"""Red-team planting test of the residual sweep (issue 15): the patient's own identifiers, written
the way people and exports write them (transliterated, abbreviated, dashed, dates in words), are
planted in every kept text-carrying place of a DICOM file — every character VR at depths 0–4,
code sequences, person identification code sequences, SR TEXT/PNAME/CODE items, kept private
elements and vendor blobs (GE Protocol Data Block, GE user data, Siemens CSA/Phoenix) — and must
not survive under the default profile, clean_descriptors, retain_safe_private and private: safe,
in either engine.  The oracle is independent of the matcher: a case-insensitive byte search for
each planted string (and the gzip member decompressed)."""
from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import DicomDictionary, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deidflow.profile import build_plan

from .test_dicom_profile import deid, item, make_dataset, make_scrubber, write_part10

IDENTITY = dict(PatientName="MÜLLER^JÜRGEN", PatientID="P968287", PatientBirthDate="19610312",
                AccessionNumber="ACC4711X9", OtherPatientNames="WU^LI", OperatorsName="WU^LI",
                ReferringPhysicianName="SCHMIDTBAUER^ANNA", InstitutionName="Klinikum Nordstadt",
                InstitutionAddress="Hauptstraße 5, Hamburg", DeviceSerialNumber="SN-77821Q",
                StationName="MRC40512", PatientTelephoneNumbers="+49 40 8123 4567",
                InstitutionalDepartmentName="Neuroradiologie Nord")
# What a red team writes into kept text: every form, none of them the stored value verbatim.
PLANTS = ["Mueller Juergen", "MULLER J.", "J. Müller", "Jürgen Müller", "Wu Li", "Li, Wu",
          "P-968-287", "P 968 287", "p968287", "March 12, 1961", "12. März 1961", "12.03.1961",
          "1961-03-12", "19610312", "12-MAR-1961", "12 de marzo de 1961", "03/12/1961",
          "ACC4711X9", "Hauptstrasse 5", "SN-77821Q", "SN 77821Q", "MRC40512", "Klinikum Nordstadt",
          "Neuroradiologie Nord", "SCHMIDTBAUER", "Anna Schmidtbauer", "+49 40 8123 4567"]
# The independent oracle: these byte strings (lower case) must not be in the output.
ORACLE = {"mueller", "müller".encode().decode(), "muller", "juergen", "jürgen", "wu li", "li, wu",
          "968-287", "968 287", "968287", "march 12, 1961", "märz 1961", "12.03.1961", "1961-03-12",
          "19610312", "12-mar-1961", "marzo de 1961", "03/12/1961", "acc4711x9", "hauptstr",
          "77821q", "mrc40512", "nordstadt", "neuroradiologie", "schmidtbauer", "8123 4567"}
CONFIGS = {"default": {}, "clean_descriptors": {"options": ("clean_descriptors",)},
           "retain_safe_private": {"options": ("retain_safe_private",)}, "private_safe": {"private": "safe"}}
_TEXT_VRS = ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UR", "UT", "PN")
_MAXLEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64}


def _kept_keywords(plan) -> dict[str, list[int]]:
    """Per text VR, public attributes the profile keeps (unlisted or K): where identifiers are not
    expected, so nothing but the sweep removes them."""
    out: dict[str, list[int]] = {}
    for tag, entry in sorted(DicomDictionary.items()):
        vr, _, _, retired, kw = entry
        if (tag >> 16) & 1 or retired or not kw or (tag >> 16) in (0x0002, 0x0008 and 0) or (tag & 0xFFFF) == 0:
            continue
        if (tag >> 16) in (0x0002,) or tag in (0x00080005,) or 0x6000 <= (tag >> 16) <= 0x60FF or 0x5000 <= (tag >> 16) <= 0x50FF:
            continue
        rule = plan.rule_for(tag)
        if vr in _TEXT_VRS and (rule is None or rule.action == "K"):
            out.setdefault(vr, []).append(tag)
    return out


def _fit(vr: str, text: str) -> str:
    if vr in ("CS", "AE"):
        text = "".join(c for c in text.upper() if c.isalnum() or c in " _")[:16]
    n = _MAXLEN.get(vr)
    return text[:n] if n else text


def _code(value: str, meaning: str) -> Dataset:
    return item(CodeValue=value[:16], CodingSchemeDesignator="99LOCAL", CodeMeaning=meaning)


def planted_dataset(plan) -> Dataset:
    ds = make_dataset(**IDENTITY)
    ds.SpecificCharacterSet = "ISO_IR 192"
    kept = _kept_keywords(plan)
    k = 0
    for vr, tags in kept.items():  # depth 0: every kept text VR, several attributes each
        for tag in tags[:6]:
            ds.add_new(tag, vr, _fit(vr, f"x {PLANTS[k % len(PLANTS)]} y"))
            k += 1
    # depths 1-4: code sequences nested in a kept sequence (EquivalentCodeSequence chains)
    inner = _code("P968287", "Mueller Juergen 12.03.1961")
    for depth in range(3):
        outer = _code(f"X{depth}", PLANTS[(depth * 5) % len(PLANTS)])
        outer.EquivalentCodeSequence = [inner]
        inner = outer
    ds.AnatomicRegionSequence = [inner]  # depth 1 .. 4
    ds.ProcedureCodeSequence = [_code("ACC4711X9", "for Li, Wu born March 12, 1961")]
    ds.ReasonForRequestedProcedureCodeSequence = [_code("p968287", "Jürgen Müller")]
    # person identification code sequences (X/D and D in the table)
    ds.OperatorIdentificationSequence = [item(
        PersonIdentificationCodeSequence=[_code("P968287", "WU^LI")], InstitutionName="Klinikum Nordstadt",
        PersonAddress="Hauptstrasse 5")]
    # SR content: TEXT, PNAME, CODE items, nested
    text = item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue="Pat. Mueller, J., DOB 12.03.1961",
                ConceptNameCodeSequence=[_code("121106", "Comment")])
    pname = item(RelationshipType="CONTAINS", ValueType="PNAME", PersonName="MUELLER^JUERGEN",
                 ConceptNameCodeSequence=[_code("121008", "Person Observer Name")])
    code = item(RelationshipType="CONTAINS", ValueType="CODE", ConceptCodeSequence=[_code("P-968-287", "Wu Li")],
                ConceptNameCodeSequence=[_code("121071", "Finding")])
    container = item(RelationshipType="CONTAINS", ValueType="CONTAINER", ContinuityOfContent="SEPARATE",
                     ContentSequence=[text, pname, code])
    ds.ContentSequence = [container]
    # kept private elements: a safe text element, and the vendor blobs the safe list keeps
    ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
    ds.add_new(0x0019109E, "LO", "epi2 Mueller Juergen")  # Internal Pulse Sequence Name (safe)
    ds.add_new(0x00250010, "LO", "GEMS_SERS_01")
    ds.add_new(0x0025101B, "OB", _ge_pdb())
    ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
    ds.add_new(0x0043102A, "OB", b"\x00\x00AU8\x00" + b"09/18/118\x00" + b"00:14\x00GE_MED_NMR\x00Mueller\x00")
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291020, "OB", _csa())
    return ds


def _ge_pdb() -> bytes:
    text = (b'POSITION "Supine"\nSEDESC "Mueller Juergen head"\nNOTE "P-968-287 seen 12.03.1961"\n'
            b'TR "1000.0"\n')
    buf = io.BytesIO()
    with gzip.GzipFile(filename="Ex27018Ser4Rx", mode="wb", fileobj=buf, mtime=1600000000) as gz:
        gz.write(text)
    member = buf.getvalue()
    out = struct.pack("<I", len(member)) + member
    return out + b"\x00" * (len(out) % 2)


def _csa() -> bytes:
    """A CSA2 header with UsedPatientWeight, and a Phoenix text with tProtocolName."""
    def elem(name: bytes, values: list[bytes]) -> bytes:
        out = name.ljust(64, b"\x00") + struct.pack("<i4siii", 1, b"DS\x00\x00", 0, len(values), 77)
        for v in values:
            out += struct.pack("<4i", len(v), len(v), 77, len(v)) + v + b"\x00" * ((4 - len(v) % 4) % 4)
        return out
    phoenix = (b'### ASCCONV BEGIN ###\ntProtocolName\t = \t""Juergen Mueller study""\n'
               b'sKSpace.lBaseResolution\t = \t256\n### ASCCONV END ###\n')
    body = elem(b"UsedPatientWeight", [b"92.98644768"]) + elem(b"MrPhoenixProtocol", [phoenix])
    return b"SV10\x04\x03\x02\x01" + struct.pack("<II", 2, 77) + body


def _surviving(raw: bytes) -> list[str]:
    """Planted strings found in ``raw`` (and in any gzip member inside it)."""
    blobs = [raw]
    i = raw.find(b"\x1f\x8b\x08")
    while i >= 0:
        try:
            blobs.append(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw[i:]))
            blobs.append(raw[i:i + 64])  # the gzip header (file name)
        except zlib.error:
            pass
        i = raw.find(b"\x1f\x8b\x08", i + 1)
    low = [b.lower() for b in blobs]
    found = []
    for s in ORACLE:
        for enc in ("utf-8", "latin-1"):
            try:
                needle = s.encode(enc)
            except UnicodeEncodeError:
                continue
            if any(needle in b for b in low):
                found.append(s)
                break
    return sorted(found)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("engine", ["stream", "dataset"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_no_planted_identifier_survives(tmp_path, config, engine, ts):
    plan = build_plan(**CONFIGS[config])
    ds = planted_dataset(plan)
    src = write_part10(tmp_path / "in.dcm", ds, ts)
    assert len(_surviving(src.read_bytes())) == len(ORACLE)  # the oracle sees every plant in the input
    out = deid(src, engine, **CONFIGS[config])
    assert _surviving(out.raw) == []
    assert out.raw.count(b"Ex27018") == 0


@pytest.mark.parametrize("config", list(CONFIGS))
def test_both_engines_give_identical_files(tmp_path, config):
    plan = build_plan(**CONFIGS[config])
    src = write_part10(tmp_path / "in.dcm", planted_dataset(plan))
    a = deid(src, "stream", **CONFIGS[config]).ds
    b = deid(src, "dataset", **CONFIGS[config]).ds
    assert [(e.tag, e.VR, str(e.value)) for e in a.iterall() if e.VR != "SQ"] == \
        [(e.tag, e.VR, str(e.value)) for e in b.iterall() if e.VR != "SQ"]


def test_kept_vendor_blobs_stay_usable_and_reproducible(tmp_path):
    """private: safe keeps the blobs dcm2niix reads: the PDB is still a gzip member with its
    acquisition lines, no file name and no time stamp; the CSA keeps its layout and length."""
    plan = build_plan(private="safe")
    src = write_part10(tmp_path / "in.dcm", planted_dataset(plan))
    runs = [deid(src, "stream", private="safe") for _ in range(2)]
    assert runs[0].raw == runs[1].raw
    ds = runs[0].ds
    pdb = ds[0x0025101B].value
    (n,) = struct.unpack("<I", pdb[:4])
    member = pdb[4:4 + n]
    assert member[3] == 0 and member[4:8] == b"\x00\x00\x00\x00"  # no FNAME flag, mtime 0
    text = gzip.decompress(member)
    assert b'POSITION "Supine"' in text and b'TR "1000.0"' in text and b'SEDESC ""' in text
    assert len(ds[0x00291020].value) == len(_csa())
    assert b"sKSpace.lBaseResolution\t = \t256" in ds[0x00291020].value
    assert b"92.98" not in ds[0x00291020].value
    assert b"GE_MED_NMR" in ds[0x0043102A].value and b"09/18/118" not in ds[0x0043102A].value


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_compound_codes_on_nested_sequences(tmp_path, engine):
    """D (PersonIdentificationCodeSequence), X/D (OperatorIdentificationSequence) keep only dummy
    items; Z empties; no original nested value is kept next to a dummy."""
    ds = make_dataset(PatientName="ROE^RICHARD", PatientID="Q5550123")
    ds.OperatorIdentificationSequence = [item(
        PersonIdentificationCodeSequence=[_code("Q5550123", "Richard Roe")],
        InstitutionName="Roe Clinic", PersonTelephoneNumbers="5550123")]
    ds.VerifyingObserverSequence = [item(VerifyingObserverName="ROE^RICHARD",
                                         VerifyingOrganization="Roe Clinic")]
    out = roundtrip_ds(tmp_path, ds, engine)
    seq = out.ds.OperatorIdentificationSequence
    assert len(seq) == 1
    code = seq[0].PersonIdentificationCodeSequence[0]
    assert code.CodeValue == "ANONYMIZED" and code.CodeMeaning == "ANONYMIZED"
    assert seq[0].InstitutionName == "ANONYMIZED"
    assert out.ds.VerifyingObserverSequence[0].VerifyingObserverName == "ANONYMIZED"
    for secret in (b"Q5550123", b"Richard", b"RICHARD", b"Roe Clinic", b"5550123"):
        assert secret not in out.raw


def roundtrip_ds(tmp_path: Path, ds: Dataset, engine: str, **plan):
    return deid(write_part10(tmp_path / "c.dcm", ds), engine, **plan)


def test_kept_keyword_coverage():
    """The plant list covers every text VR the profile keeps somewhere."""
    kept = _kept_keywords(build_plan())
    assert {"CS", "LO", "SH", "LT", "ST", "UT", "UC", "UR", "PN"} <= set(kept), sorted(kept)  # no AE is kept
    assert keyword_for_tag(kept["LO"][0])
    _ = make_scrubber, pydicom


@pytest.mark.parametrize("text", [
    "Thorax von Jürgen Müller",        # ASCII-recorded name written with its accents
    "Thorax Pat 4711923",              # the ID without its leading zeros
    "born 17th of March 1958",         # "of" between day and month
    "DOB 17 03 1958",                  # numbers separated by spaces
    "geb. am 17. III. 1958",           # Roman-numeral month
])
def test_red_team_evasions_are_found(text):
    """Forms a red-team run got past the sweep and the scan (exit 0, no marker)."""
    from deidflow.qc import identifiers as ids
    m = ids.matcher_for([("name", "PatientName", "MUELLER^JUERGEN"), ("id", "PatientID", "0004711923"),
                         ("date", "PatientBirthDate", "19580317")], "sub-x")
    assert m.find(text), text
    assert "*" in m.redact_text(text)


@pytest.mark.parametrize("text", ["dose 17 03 58", "vector 1 17 2 3 1958", "Mueller-Hinton agar 4711"])
def test_near_misses_stay(text):
    from deidflow.qc import identifiers as ids
    m = ids.matcher_for([("name", "PatientName", "SMITH^JOHN"), ("id", "PatientID", "0004711923"),
                         ("date", "PatientBirthDate", "19580317")], "sub-x")
    assert not m.find(text), text


@pytest.mark.parametrize("text", ["Thorax Sidorov", "Pyotr Sidorov", "Thorax Wolfeschlegelste"])
def test_cyrillic_in_latin_and_truncated_names_are_found(text):
    """A Cyrillic name written in Latin letters, a long name cut to a 16-character field."""
    from deidflow.qc import identifiers as ids
    m = ids.matcher_for([("name", "PatientName", "Сидоров^Пётр"),
                         ("name", "OtherPatientNames", "WOLFESCHLEGELSTEINHAUSEN^HUBERT")], "sub-x")
    assert m.find(text), text


@pytest.mark.parametrize("engine", ["stream", "dataset"])
def test_large_kept_private_blobs_are_swept_every_time(tmp_path, engine):
    """A kept private value of 1 kB or more is swept whatever its size (the stream engine leaves it
    out of the one-pass candidate search and cleans it once per repeated blob): the subject's values
    in a 4 kB blob are starred in every file of the subject, the same blob again included."""
    scrubber = make_scrubber(private="keep")
    filler = bytes(range(32, 127)) * 40
    blob = filler[:1500] + b" Mueller^Juergen P968287 " + filler[:2500]
    outs = []
    for i, extra in enumerate((b"", b"", b" ACC4711X9 ")):
        ds = make_dataset(**IDENTITY)
        ds.add_new(0x00290010, "LO", "ACME BLOBS")
        ds.add_new(0x00291001, "OB", blob + extra + b"\x00" * ((len(blob) + len(extra)) % 2))
        outs.append(deid(write_part10(tmp_path / f"{i}.dcm", ds), engine, scrubber=scrubber))
    for out in outs:
        value = out.ds[0x00291001].value.lower()
        assert b"mueller" not in value and b"968287" not in value and b"acc4711x9" not in value
        assert len(out.ds[0x00291001].value) >= 4000  # same length: binary offsets stay valid
