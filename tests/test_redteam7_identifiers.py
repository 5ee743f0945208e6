"""Red-team round 7: identifiers earlier rounds left open.  Each test plants an identifier where it
reached the release with exit 0 before the fix (see docs/design-notes.md, "Red-team round 7:
identifiers left open")."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from deidflow.qc import identifiers, leakscan

from .conftest import ROOT, TEST_KEY

SALT = b"s" * 16
RESEARCH_HEADERS = ("face.method=none", "pixels.clean=off", "profile.preset=research", "outputs.bids=false")


def _run(inp: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    """``deidflow run`` of ``inp`` into ``out`` with ``--set`` values ``sets``."""
    return subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2",
                           *[a for v in sets for a in ("--set", v)]],
                          env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _inventory(path: Path, rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(rows), path / "inventory.parquet")


# -- 1. another subject's birth date in a unit's files ----------------------------------------------
def test_another_subjects_birth_date_is_searched_by_the_unit_scan(tmp_path):
    """A run's unit scan searched its own subjects' birth dates only, `deidflow verify` every
    subject's: a birth date of one subject in another subject's kept text was published by the run
    ("no identifying value found") and reported by verify afterwards."""
    _inventory(tmp_path, {"subject": ["sub-a", "sub-b", "sub-c"], "patient_id": ["P111111", "P222222", "P333333"],
                          "accession": ["", "", ""], "patient_name": ["DOE^JOHN", "ROE^RICHARD", "POE^EDGAR"],
                          "birth_date": ["19700101", "19610423", "19700101"]})
    needles, names, _ = leakscan.other_units_values(tmp_path, {"subjects": [{"subject": "sub-a"}]}, SALT)
    m = leakscan.UnitMatcher(needles, names, SALT)
    for text in (b"comparison: prior of the patient born 1961-04-23", b"DOB 23.04.61", b"geb. 23.4.1961",
                 "生年月日 1961年4月23日".encode(), b"19610423"):
        assert {n.owner for _, n in m.find(text)} == {"sub-b"}, text
    # a birth date one of the unit's own subjects has is its own (its scan knows it as such)
    assert not m.find(b"born 1970-01-01")


@pytest.mark.slow
def test_run_withholds_what_its_verify_would_report(tmp_path):
    """End to end, each subject its own job unit: subject B's kept blob names subject A's birth
    date.  The run published B ("no identifying value found", exit 0) and `deidflow verify`
    reported the date afterwards; now the run withholds B and verify finds no value."""
    inp = tmp_path / "in"
    _patient(inp, "a", "ISO_IR 100", "ALDERTON^ANNA", "71000001", b"<State>nothing</State>", birth="19610423")
    _patient(inp, "b", "ISO_IR 100", "BECKWORTH^BEN", "71000002",
             b"<State><Note>prior exam of the patient born 1961-04-23</Note></State>", birth="19790101")
    out = tmp_path / "out"
    r = _run(inp, out, *RESEARCH_HEADERS, "jobs.files_per_job=0")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    released = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    assert [ds[0x0129, 0x1010].value for ds in released] == [b"<State>nothing</State>"]  # A only
    v = subprocess.run([sys.executable, "-m", "deidflow.cli", "verify", str(out), "--restricted",
                        str(out.parent / (out.name + "_restricted"))],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert "deidflow verify: no identifying value found" in v.stdout, v.stdout[-2000:] + v.stderr[-2000:]
    assert "LEAK" not in v.stdout  # (exit 3 says the release is incomplete: B was withheld)


def test_an_inventory_without_birth_dates_still_gives_the_other_values(tmp_path):
    """An inventory written by a library caller without the birth date column (an older one)."""
    _inventory(tmp_path, {"subject": ["sub-a", "sub-b"], "patient_id": ["P111111", "P222222"],
                          "accession": ["", ""], "patient_name": ["DOE^JOHN", "ROE^RICHARD"]})
    needles, names, roster = leakscan.other_units_values(tmp_path, {"subjects": [{"subject": "sub-a"}]}, SALT)
    assert roster == ["sub-a", "sub-b"] and names == {"sub-b": "ROE^RICHARD"}
    assert leakscan.UnitMatcher(needles, names, SALT).find(b"P222222")


# -- 2. names and dates in legacy CJK encodings ------------------------------------------------------
LEGACY = [("gb18030", "王^小明", "患者姓名：王小明，男，{date}"), ("gbk", "王^小明", "病人 王小明 {date}"),
          ("big5", "陳^大文", "病人：陳大文 {date}"), ("shift_jis", "山田^太郎", "患者氏名 山田太郎 様 {date}"),
          ("cp932", "山田^太郎", "ﾔﾏﾀﾞ 山田 太郎 {date}"), ("euc_jp", "山田^太郎", "患者 山田太郎 {date}"),
          ("euc_kr", "홍^길동", "환자 이름: 홍길동 {date}"), ("cp949", "홍^길동", "환자: 홍 길동 {date}"),
          ("iso2022_jp", "山田^太郎", "患者氏名 山田太郎 様 {date}")]


@pytest.mark.parametrize("codec, name, text", LEGACY, ids=[c for c, _, _ in LEGACY])
def test_name_and_birth_date_in_legacy_cjk_encodings_are_found_and_swept(codec, name, text):
    """A Chinese, Japanese or Korean name (and a birth date written 1961年4月23日) in GB18030/GBK,
    Big5, Shift-JIS, EUC-JP, EUC-KR/UHC or 7-bit ISO 2022 JIS inside a kept binary value was
    found and swept only in UTF-8 and UTF-16."""
    m = identifiers.matcher_for([("name", "PatientName", name), ("date", "PatientBirthDate", "19610423")])
    date = "1961년 4월 23일" if codec in ("euc_kr", "cp949") else "1961年4月23日"
    payload = text.format(date=date).encode(codec)
    blob = b"\x01\x02\x00\x00\x9a\xfe" + payload + b"\x00\x00\x07\x81"
    kinds = {n.kind for _, _, n in m.spans(blob)}
    assert kinds == {"name", "date"}, (codec, kinds)
    red = m.redact(blob)
    assert len(red) == len(blob) and red.startswith(b"\x01\x02\x00\x00\x9a\xfe")
    whole = name.replace("^", "")
    given = name.split("^")[1]
    for v in (whole, given, "1961"):
        enc = v.encode(codec)
        enc = enc[3:-3] if enc.startswith(b"\x1b") else enc  # the JIS bytes between the switches
        assert enc not in red and (enc in blob or v == whole), (codec, v)


def test_latin_matcher_reads_no_legacy_stretch_and_a_foreign_cjk_text_is_no_hit():
    """The legacy readings start only at the searched values' own characters: another patient's
    name in Shift-JIS is no hit of this one's, and ASCII text starts no read."""
    m = identifiers.matcher_for([("name", "PatientName", "山田^太郎")])
    assert not m.spans("患者氏名 佐藤花子 様".encode("shift_jis"))
    assert not m.spans(b"ASCCONV sProtocol 1961 tFree 12345 " * 50)


# -- 5. BIDS free-text fields ------------------------------------------------------------------------
def test_bids_free_text_fields_are_cleaned_of_generic_identifiers(tmp_path):
    """BodyPartDetails, DeepLearningDetails, Anaesthesia and Sample* are free text by the BIDS
    definition, but were kept as acquisition parameters (swept of the subject's own identifiers
    only): another patient's birth date and MRN, or a name the subject's identity does not know,
    were released."""
    from deidflow.sidecar import scrub_sidecar
    note = "left knee; prior of MUSTER^MAX (MRN 88812345) born 12.03.1961, ok"
    data = {"EchoTime": 0.03, "BodyPartDetails": note, "DeepLearningDetails": note, "Anaesthesia": note,
            "SampleStaining": note, "SampleFixation": note, "SampleEmbedding": note,
            "BodyPartDetailsOntology": "https://www.ebi.ac.uk/ols/ontologies/uberon", "SampleEnvironment": "ex vivo"}
    out = scrub_sidecar(data)[0]
    for key in ("BodyPartDetails", "DeepLearningDetails", "Anaesthesia", "SampleStaining", "SampleFixation",
                "SampleEmbedding"):
        assert out[key].startswith("left knee; prior of") and out[key].endswith(", ok"), out[key]
        for v in ("MUSTER", "88812345", "1961"):
            assert v not in out[key], (key, out[key])
    assert out["BodyPartDetailsOntology"] == data["BodyPartDetailsOntology"]
    assert out["SampleEnvironment"] == "ex vivo" and out["EchoTime"] == 0.03


# -- 3. base64 payloads in kept text -----------------------------------------------------------------
NIXON = [("name", "PatientName", "NIXON^NORA"), ("id", "PatientID", "4455667"), ("date", "PatientBirthDate", "19610423")]
B64_TEXTS = {"json": '{"patient": "Nora Nixon", "mrn": "4455667", "dob": "1961-04-23"}',
             "xml": "<Patient><Name>NIXON, NORA</Name><ID>4455667</ID></Patient>",
             "name": "NIXON^NORA", "mrn": "MRN 4455667", "id": "4455667",
             "utf16": "Nora Nixon 4455667".encode("utf-16-le"), "cjk": '{"name": "Nixon Nora", "note": "患者"}'}


@pytest.mark.parametrize("shift", [0, 1, 2])
@pytest.mark.parametrize("what", sorted(B64_TEXTS))
def test_base64_name_and_mrn_in_kept_text_are_found_and_swept(what, shift):
    """A name and an MRN base64-encoded in a kept text (a data URI, an encoded XML or JSON state)
    were neither swept nor found: the matcher reads the runs of the base64 alphabet that decode to
    text, at any of the three alignments of the value in the payload; a hit covers the whole run."""
    m = identifiers.matcher_for(NIXON)
    plain = B64_TEXTS[what]
    plain = plain if isinstance(plain, bytes) else plain.encode()
    payload = base64.b64encode(b"ab"[:shift] + plain)
    for urlsafe in (False, True):
        enc = payload.translate(bytes.maketrans(b"+/", b"-_")) if urlsafe else payload
        blob = b'<Data enc="base64">' + enc + b"</Data>\x00 data:text/plain;base64," + enc + b" end"
        hits = m.spans(blob)
        assert hits, (what, shift, urlsafe)
        red = m.redact(blob)
        assert red.startswith(b'<Data enc="base64">') and red.endswith(b" end") and len(red) == len(blob)
        assert enc not in red and b"*" * len(enc.rstrip(b"=")) in red


def test_base64_runs_without_an_identifier_are_kept():
    """Encoded text that names nobody, and protocol identifiers, are no hit."""
    m = identifiers.matcher_for(NIXON)
    blob = base64.b64encode(b'{"sequence": "t1_mprage", "TR": 2300}') + b" sB0CompensationX aRxCoilSelectData"
    assert not m.spans(blob) and m.redact(blob) is blob


@pytest.mark.realdata
def test_nifti_descrip_holding_base64_is_cleaned(tmp_path):
    """Under ``clean_descriptors`` (research preset) a NIfTI ``descrip`` holding the name and MRN
    base64-encoded was released as it was (round 6's note)."""
    import gzip

    from deidflow import formats
    from deidflow.formats.base import ScrubContext
    from deidflow.pseudonym import Pseudonymizer

    from .conftest import require_shared
    raw = bytearray(gzip.decompress(require_shared("nibabel", "example4d.nii.gz").read_bytes()))
    value = b"b64:" + base64.b64encode(b"Nora Nixon 4455667")
    raw[148:228] = (value + bytes(80))[:80]
    src = tmp_path / "in.nii"
    src.write_bytes(bytes(raw))
    m = leakscan.Matcher(leakscan.needles_for("sub-tstsubj1", NIXON, SALT))
    assert leakscan.scan_file(src, "x.nii", m).hits  # the leak scan reads it
    c = ScrubContext(subject="sub-tstsubj1", pseudo=Pseudonymizer(b"redteam7-test-key-0123456789"),
                     settings={"options": ["clean_descriptors"]}, known=["NIXON^NORA", "4455667"])
    res = formats.get("nifti1").scrub(src, tmp_path / "out.nii", c)
    out = res.outputs[0].read_bytes()
    assert not leakscan.scan_file(res.outputs[0], "x.nii", m).hits
    assert out[148:152] == b"b64:"  # cleaned in place


# -- 2 and 3 end to end: kept private blobs in the research preset ------------------------------------
def _patient(root: Path, folder: str, charset, name: str, pid: str, blob: bytes, birth: str = "19610423") -> None:
    """MR_small as a patient with ``name`` and a safe-listed private OB state blob (SIEMENS
    Ultrasound SC2000, kept under the research preset) holding ``blob``."""
    inp = root / folder
    inp.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SpecificCharacterSet = charset
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.private_block(0x0129, "SIEMENS Ultrasound SC2000", create=True).add_new(0x10, "OB", blob)
    ds.save_as(inp / "1.dcm", enforce_file_format=True)


BLOBS = {  # folder: (charset, name, ID, blob, what must not be in the release's blob)
    "zh": ("GB18030", "王^小明", "58213907", "<State><Patient>王小明</Patient><DOB>1961年4月23日</DOB></State>",
           "gb18030", ["王小明", "1961年"]),
    "ja": (["", "ISO 2022 IR 87"], "ヤマダ^タロウ=山田^太郎", "58213908", "患者氏名：山田太郎　生年月日：1961年4月23日",
           "shift_jis", ["山田太郎", "1961年"]),
    "ko": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "58213909", "<환자>홍길동</환자>", "euc_kr",
           ["홍길동"]),
}


@pytest.mark.slow
def test_legacy_cjk_and_base64_in_safe_private_blobs_not_released(tmp_path):
    """End to end (research preset keeps the safe-listed SIEMENS Ultrasound SC2000 blob): the
    patient's name and birth date in Shift-JIS, GB18030 or EUC-KR, and a name and MRN in base64,
    were released with exit 0; now swept (the rest of the blob stays)."""
    inp = tmp_path / "in"
    for folder, (charset, name, pid, text, codec, _) in BLOBS.items():
        _patient(inp, folder, charset, name, pid, b"\x01\x00HDR" + text.encode(codec) + b"\x00<Probe>4V1c</Probe>")
    _patient(inp, "b64", "ISO_IR 100", "NIXON^NORA", "4455667",
             b"<State enc='b64'>" + base64.b64encode(b'{"patient": "Nora Nixon", "mrn": "4455667"}') +
             b"</State><Probe>4V1c</Probe>")
    out = tmp_path / "out"
    r = _run(inp, out, *RESEARCH_HEADERS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    released = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    assert len(released) == 4
    values = [ds[0x0129, 0x1010].value for ds in released]
    assert all(b"<Probe>4V1c</Probe>" in v for v in values)  # the rest of each blob stays
    joined = b"\n".join(values)
    for _, _, _, _, codec, gone in BLOBS.values():
        for v in gone:
            assert v.encode(codec) not in joined, v
    assert base64.b64encode(b'{"patient": "Nora Nixon"')[:16] not in joined


# -- 4. identifiers stored as numbers in numeric header fields ------------------------------------------
def _num_ctx():
    from deidflow.formats.base import ScrubContext
    from deidflow.pseudonym import Pseudonymizer
    return ScrubContext(subject="sub-tstsubj1", pseudo=Pseudonymizer(b"redteam7-test-key-0123456789"),
                        settings={"options": []}, known=["NIXON^NORA", "4455667", "19610423"])


@pytest.mark.realdata
@pytest.mark.parametrize("field, off, code, value", [("intent_p1", 56, "<f", 4455667.0), ("toffset", 136, "<f", 4455667.0),
                                                     ("cal_max", 124, "<f", 4455667.0)])
def test_nifti_number_field_holding_the_mrn_is_emptied_and_found(tmp_path, field, off, code, value):
    """An MRN stored as a number in a NIfTI-1 numeric field (``intent_p1`` of an image without an
    intent, ``toffset``, ``cal_max``) was copied, and the leak scan, which reads bytes, never saw it."""
    import gzip
    import struct

    from deidflow import formats

    from .conftest import require_shared
    raw = bytearray(gzip.decompress(require_shared("nibabel", "example4d.nii.gz").read_bytes()))
    assert raw[344:347] == b"n+1"
    struct.pack_into(code, raw, off, value)
    src = tmp_path / "in.nii"
    src.write_bytes(bytes(raw))
    m = leakscan.Matcher(leakscan.needles_for("sub-tstsubj1", NIXON, SALT))
    hits = leakscan.scan_file(src, "x.nii", m).hits
    assert [h.location for h in hits] == [f"NIfTI header field {field} (a number)"]
    res = formats.get("nifti1").scrub(src, tmp_path / "out.nii", _num_ctx())
    out = res.outputs[0].read_bytes()
    assert struct.unpack_from(code, out, off)[0] == 0
    assert not leakscan.scan_file(res.outputs[0], "x.nii", m).hits
    assert out[-4096:] == bytes(raw[-4096:])  # the image is copied as it was


def test_identifying_numbers_are_the_subjects_values_only():
    """An integral number of six digits or more is compared with the subject's values: the MRN
    and the birth date YYYYMMDD (double precision) are identifiers, a TR or a field of view is not."""
    c = _num_ctx()
    assert c.identifying_numbers([2300.0, 4455667.0, 19610423.0, 0.5, 4455668.0, 256000.0, float("nan")]) == [1, 2]
    assert identifiers.number_text(4455667.0) == b"4455667" and identifiers.number_text(2.5e6 + 0.5) == b""


def test_mgh_scan_parameter_holding_the_mrn_is_emptied(tmp_path):
    """MGH's five scan parameters (TR, flip angle, TE, TI, FoV) were copied as they were."""
    import struct

    from deidflow import formats
    head = struct.pack(">6i", 1, 2, 2, 2, 1, 0) + bytes(284 - 24)
    src = tmp_path / "in.mgh"
    src.write_bytes(head + bytes(range(8)) + struct.pack(">5f", 2300.0, 9.0, 4455667.0, 900.0, 256.0))
    res = formats.get("mgh").scrub(src, tmp_path / "out.mgh", _num_ctx())
    out = res.outputs[0].read_bytes()
    assert struct.unpack(">5f", out[292:312]) == (2300.0, 9.0, 0.0, 900.0, 256.0)
    assert out[:292] == src.read_bytes()[:292]


@pytest.mark.realdata
def test_minc1_numeric_attribute_holding_the_birth_date_is_emptied(tmp_path):
    """A MINC1 numeric attribute (kept: repetition times, dimension steps) holding the birth date
    as a double and the MRN as an int was released."""
    import numpy as np

    from deidflow import formats

    from .test_redteam6_formats import _minc1_copy
    src = tmp_path / "in.mnc"
    src_nc, dst = _minc1_copy(src, global_attributes=True)
    acq = dst.variables.get("acquisition") or dst.createVariable("acquisition", "i", ())
    acq.repetition_time = np.float64(19610423.0)
    dst.createVariable("pacs", "i", ()).ref = np.int32(4455667)
    acq.flip_angle = np.float64(9.0)
    dst.close()
    src_nc.close()
    res = formats.get("minc1").scrub(src, tmp_path / "out.mnc", _num_ctx())
    netcdf = pytest.importorskip("scipy.io").netcdf_file
    with netcdf(str(res.outputs[0]), "r", mmap=False) as f:
        assert float(f.variables["acquisition"].repetition_time) == 0
        assert int(f.variables["pacs"].ref) == 0
        assert float(f.variables["acquisition"].flip_angle) == 9.0


# -- other attacks: a name written across a line break, a tab or padded spaces -------------------------
@pytest.mark.parametrize("text", [b"patient Wu\nLi seen", b"Wu\r\nLi", b"Wu\tLi", b"patient Wu   Li", b"Li,\n   Wu"])
def test_short_name_across_a_line_break_or_padding_is_found_and_swept(text):
    """A subject whose name parts are too short to be searched alone (``LI^WU``) is searched as
    the whole name: written across a wrapped line, a tab or padded spaces it was neither swept nor
    found."""
    m = identifiers.matcher_for([("name", "PatientName", "LI^WU")])
    red = m.redact(text)
    assert b"Wu" not in red and b"Li" not in red, red
    assert not m.spans(b"Wu\n\nLin") and not m.spans(b"Wu, and\nLi Na")


@pytest.mark.parametrize("text", [b"Erika\nMustermann", b"Mustermann,\r\n   Erika", b"Erika  Mustermann",
                                  b"MUSTERMANN, Prof. Dr. med. Erika", b"Mustermann, Frau Erika"])
def test_another_subjects_name_across_a_line_break_is_found_by_the_unit_scan(text):
    """Another subject's name is searched whole only (its parts are other people's too): across a
    line break, with padded spaces or with titles between family and given name (German records:
    ``Müller, Prof. Dr. Hans``) a unit's scan did not find it (verify found its parts)."""
    m = leakscan.UnitMatcher([], {"sub-b": "MUSTERMANN^ERIKA"}, SALT)
    assert {n.owner for _, _, n in m.spans(b"note: " + text + b" seen")} == {"sub-b"}


@pytest.mark.parametrize("codec", ["utf-8", "shift_jis", "utf-16-le"])
def test_another_subjects_cjk_name_with_an_ideographic_space_is_found(codec):
    """Japanese text writes a name with the ideographic space (山田　太郎, U+3000); another
    subject's CJK name is searched whole with an ASCII space or none, so a unit's scan missed it."""
    needles = identifiers.needles_for("sub-b", [("whole_name", "PatientName", "YAMADA^TARO=山田^太郎=やまだ^たろう")], SALT)
    m = leakscan.UnitMatcher(needles, {"sub-c": "王^小明"}, SALT)
    for text, owner in (("患者：山田　太郎　様", "sub-b"), ("やまだ　たろう", "sub-b"), ("病人 王　小明", "sub-c")):
        blob = b"\x01\x02" + text.encode(codec) + b"\x00\x07"
        assert {n.owner for _, _, n in m.spans(blob)} == {owner}, (codec, text)
    assert not m.spans("山田　花子".encode(codec))


def test_id_and_name_split_over_two_dicom_values_are_found():
    """An MRN or a short-parted name split over two values of a multi-valued element (``P4455\\667``,
    ``WU\\LI``): the backslash was no separator, so neither was swept nor found."""
    m = identifiers.matcher_for([("id", "PatientID", "P4455667"), ("name", "PatientName", "LI^WU")])
    assert m.redact(b"ref P4455\\667 ok") == b"ref ********* ok"
    assert m.redact(b"WU\\LI") == b"*****"
    assert not m.spans(b"P4455\\6678")
    um = leakscan.UnitMatcher([], {"sub-b": "MUSTERMANN^ERIKA"}, SALT)
    assert um.spans(b"ERIKA\\MUSTERMANN")
