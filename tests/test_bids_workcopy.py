"""The conversion working copy (deidflow.bids.workcopy), the NIfTI description's time of day,
sessions/scans tables and profile presets: unit level, plus the real Siemens protocol blobs."""
from __future__ import annotations

import glob
import re
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from deidflow.bids.dcm2niix import without_time_of_day
from deidflow.bids.heuristic import Target
from deidflow.bids.naming import Image
from deidflow.bids.series import SeriesInfo
from deidflow.bids.sessions import acquisition_datetime, subject_tables
from deidflow.bids.workcopy import PROTOCOL_TEXT_KEEP, clean_protocol_text, conversion_plan, vendor_table
from deidflow.profile import apply_preset, build_plan, preset_table

from .conftest import ROOT, require_shared

ASC = (b"### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData ###\n"
       b'tSequenceFileName\t = \t""%SiemensSeq%\\ep2d_bold""\n'
       b'tProtocolName\t = \t""Study of Jane Roe 1970-01-01""\n'
       b'sWipMemBlock.tFree\t = \t""operator JSMITH""\n'
       b'sCoilSelectMeas.sCoilStringForConversion\t = \t""HE1-4;NE1,2""\n'
       b"lEchoSpacing\t = \t520\n"
       b"### ASCCONV END ###")


def test_protocol_text_is_blanked_in_place_and_acquisition_entries_stay():
    # a CSA-like blob: binary lengths with quote bytes (0x22) around, XProtocol text, then ASCCONV
    blob = (b"SV10\x04\x03\x02\x01\x22\x00\x00\x00M\x00\x00\x00\"\x01\x00\x00"
            b'<XProtocol> { <ParamString."tPatientName"> { "ROE^JANE" } <Name> "PhoenixMetaProtocol" } ' + ASC
            + b"\x00\x22\x00\x00\x00")
    out = clean_protocol_text(blob)
    assert len(out) == len(blob)
    for secret in (b"Jane Roe", b"1970-01-01", b"JSMITH", b"ROE^JANE"):
        assert secret not in out, secret
    for kept in (b"%SiemensSeq%\\ep2d_bold", b"HE1-4;NE1,2", b"lEchoSpacing\t = \t520"):
        assert kept in out, kept
    assert out[:20] == blob[:20] and out[-5:] == blob[-5:]  # binary fields untouched
    plain = b"SV10\x04\x03\x02\x01 no protocol here"
    assert clean_protocol_text(plain) is plain
    assert PROTOCOL_TEXT_KEEP.match(b"tSequenceFileName") and not PROTOCOL_TEXT_KEEP.match(b"tProtocolName")


@pytest.mark.realdata
@pytest.mark.parametrize("series, tag", [("dcm_qa_xa30/In/5_anat-T1w_acq-tfl", (0x0021, 0x1019)),
                                         ("dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag", (0x0029, 0x1020))])
def test_real_protocol_blobs(series, tag):
    """The protocol name of the real Siemens files is blanked; the blob keeps its length and the
    CSA header still parses (nibabel's reader)."""
    first = sorted(glob.glob(str(require_shared(*series.split("/")) / "*.dcm")))[0]
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    elem = next(e for e in ds.iterall() if e.tag == tag)  # XA: inside the shared functional group
    value = elem.value
    name = re.search(rb'tProtocolName\s*=\s*"+([^"]+)"+', value).group(1)
    out = clean_protocol_text(value)
    assert len(out) == len(value) and name not in out.split(b"ASCCONV BEGIN")[-1]
    assert re.search(rb'tSequenceFileName\s*=\s*""%SiemensSeq%', out)
    if tag[0] == 0x0029:
        from nibabel.nicom import csareader
        elem.value = out
        header = csareader.get_csa_header(ds, "series")
        assert header is not None and "MrPhoenixProtocol" in header["tags"]


def test_vendor_table_and_conversion_plan():
    table = vendor_table()
    assert ("SIEMENS CSA HEADER", 0x0029, 0x10) in table and ("GEMS_PARM_01", 0x0043, 0x39) in table
    assert ("GEMS_IDEN_01", 0x0009, 0x02) not in table  # identity block
    plan = conversion_plan(["clean_descriptors"])
    assert plan.private_policy == "safe" and plan.is_safe_private("Philips MR Imaging DD 001", 0x2005, 0x100E)
    assert {"retain_long_modified_dates", "clean_descriptors"} <= plan.options
    full = conversion_plan(["retain_long_full_dates"])
    assert "retain_long_modified_dates" not in full.options
    basic = build_plan([], "remove")
    assert conversion_plan([]).rule_for(0x00100010).action == basic.rule_for(0x00100010).action  # PatientName


def test_nifti_description_loses_the_time_of_day():
    head = bytearray(540)
    head[:4] = (348).to_bytes(4, "little")
    head[148:148 + 41] = b"TE=2.5;Time=150441.525;phase=1;mb=2\x00\x00\x00\x00\x00\x00"
    out = without_time_of_day(bytes(head))
    assert out[148:228].rstrip(b"\x00") == b"TE=2.5;Time=0.000;phase=1;mb=2"
    assert out[:148] == head[:148] and out[228:] == head[228:] and len(out) == len(head)
    assert without_time_of_day(b"not nifti") == b"not nifti"


def _image(session: str, stem: str, datatype: str = "anat") -> Image:
    info = SeriesInfo(session, "MR001-x", Path("."), 1)
    im = Image(info, None, {}, Target(datatype, "T1w", {}, "t1w"))
    im.stem = stem
    return im


def test_sessions_and_scans_tables():
    a = _image("ses-aaa", "sub-1/ses-aaa/anat/sub-1_ses-aaa_T1w")
    b = _image("ses-bbb", "sub-1/ses-bbb/func/sub-1_ses-bbb_task-rest_bold", "func")
    u = _image("ses-ccc", "sourcedata/unsorted/sub-1/ses-ccc/MR001-x", "unsorted")
    when = {id(a): datetime(2001, 3, 1, 9, 30), id(b): datetime(2001, 4, 10, 8, 0), id(u): datetime(2000, 1, 1)}
    basic = subject_tables("sub-1", [a, b, u], when, [])
    assert basic["sub-1/sub-1_sessions.tsv"] == "session_id\tdays_from_first_session\nses-aaa\t0\nses-bbb\t40\n"
    assert basic["sub-1/ses-aaa/sub-1_ses-aaa_scans.tsv"] == "filename\nanat/sub-1_ses-aaa_T1w.nii.gz\n"
    assert not any(re.search(r"\d{4}-\d{2}", t) for t in basic.values() if not t.startswith("{"))
    research = subject_tables("sub-1", [a, b], when, ["retain_long_modified_dates"])
    assert research["sub-1/ses-bbb/sub-1_ses-bbb_scans.tsv"] == (
        "filename\tacq_time\nfunc/sub-1_ses-bbb_task-rest_bold.nii.gz\t2001-04-10T08:00:00\n")
    assert subject_tables("sub-1", [u], when, []) == {}
    assert acquisition_datetime({"AcquisitionDate": "20010301"}, {"AcquisitionTime": "09:30:01.5"}) == \
        datetime(2001, 3, 1, 9, 30, 1)
    assert acquisition_datetime({"SeriesDate": "20010301", "SeriesTime": "093001"}, {}) == datetime(2001, 3, 1, 9, 30, 1)
    assert acquisition_datetime({}, {"AcquisitionTime": "09:30:01"}) is None


def test_presets():
    assert apply_preset("basic", [], "remove") == ([], "remove")
    options, private = apply_preset("research", [], "remove")
    assert private == "safe" and set(options) == {
        "retain_long_modified_dates", "retain_patient_characteristics", "retain_device_identity",
        "clean_descriptors", "clean_structured_content", "clean_graphics", "retain_safe_private"}
    assert apply_preset("research", [], "keep")[1] == "keep"
    assert "retain_long_modified_dates" not in apply_preset("research", ["retain_long_full_dates"], "remove")[0]
    with pytest.raises(ValueError, match="preset"):
        apply_preset("lenient", [], "remove")


def test_preset_page_is_the_generated_table():
    page = (ROOT / "docs" / "profile-presets.md").read_text()
    table = preset_table("research")
    assert table in page
    assert "| 00101010 | Patient's Age | remove | keep | retain_patient_characteristics |" in table
    assert "| 00100010 |" not in table  # the patient's name is never retained by a preset
