"""Non-DICOM formats (deidflow.formats): identifiers planted in every listed header field of copies
of ../shared/data files do not survive anywhere in the output (byte scan, also inside .gz), and the
image data read back bit-identical; damaged files are refused with a one-line reason."""
from __future__ import annotations

import gzip
import re
import shutil
import struct

import numpy as np
import pytest

from deidflow import formats, inventory, sniff
from deidflow.formats.base import FormatError, ScrubContext
from deidflow.pseudonym import Pseudonymizer

from .conftest import require_shared

pytestmark = pytest.mark.realdata

KEY = b"formats-test-key-0123456789"
NAME, PID, BIRTH = "DOE^JOHNATHAN", "PID4711", "19610312"
INST, ADDR, SERIAL, STATION = "Sankt Plantus Klinik", "Musterweg 12 Plantstadt", "98765", "PLANTSTATION"
PLANTED = [NAME, "JOHNATHAN", PID, BIRTH, INST, "Plantstadt", SERIAL, STATION, "secret-exam",
           "planted-history-user", "PLANTDESC", "PLANTAUX", "PLANTINTENT", "plantdb.hdr", "PLANTEXT"]


def ctx(options=(), offset=-100, **fmt):
    return ScrubContext(subject="sub-tstsubj1", pseudo=Pseudonymizer(KEY), date_offset=offset,
                        settings={"options": list(options)}, formats=fmt, known=[NAME, PID, BIRTH])


def all_bytes(paths) -> bytes:
    out = b""
    for p in paths:
        raw = p.read_bytes()
        out += raw
        if raw[:2] == b"\x1f\x8b":
            out += gzip.decompress(raw)
    return out


def assert_clean(paths, planted=PLANTED):
    blob = all_bytes(paths)
    left = [v for v in planted if v.encode() in blob or v.upper().encode() in blob]
    assert not left, f"planted values survived: {left}"
    for p in paths:  # no original name in the output names either
        assert "avg152" not in p.name and "phantom" not in p.name


def arrays_equal(a, b):
    import nibabel as nib
    x, y = nib.load(str(a)), nib.load(str(b))
    assert x.shape == y.shape
    assert np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj), equal_nan=True)


def _put(buf: bytearray, off: int, n: int, text: str) -> None:
    b = text.encode()[:n]
    buf[off:off + n] = b + bytes(n - len(b))


# ------------------------------------------------------------------------------------------------
# NIfTI and Analyze
# ------------------------------------------------------------------------------------------------
def _planted_nifti(src, dst, cls=None):
    import nibabel as nib
    img = nib.load(str(src))
    if cls is not None:
        img = cls(np.asanyarray(img.dataobj), img.affine)
    h = img.header
    h["descrip"] = b"PLANTDESC " + NAME.encode()
    h["aux_file"] = b"PLANTAUX " + PID.encode()
    h["intent_name"] = b"PLANTINTENT"
    if "db_name" in h:
        h["db_name"] = b"plantdb.hdr"
        h["data_type"] = BIRTH.encode()
    h.extensions.append(nib.nifti1.Nifti1Extension(6, f"PLANTEXT {NAME} {BIRTH}".encode()))
    nib.save(img, str(dst))
    return dst


@pytest.mark.parametrize("name,cls", [("anatomical.nii", None), ("example4d.nii.gz", None),
                                      ("anatomical.nii", "nifti2")])
def test_nifti_planted_fields_and_extensions_removed(name, cls, tmp_path):
    import nibabel as nib
    src = require_shared("nibabel", name)
    suffix = ".nii.gz" if name.endswith(".gz") else ".nii"
    planted = _planted_nifti(src, tmp_path / f"in{suffix}", nib.Nifti2Image if cls else None)
    fmt = sniff.sniff(planted)
    assert fmt == (cls or "nifti1")
    F = formats.get(fmt)
    assert F.extension(planted) == suffix
    res = F.scrub(planted, tmp_path / f"out{suffix}", ctx())
    out = tmp_path / f"out{suffix}"
    assert_clean([out])
    arrays_equal(planted, out)
    assert (nib.load(str(out)).affine == nib.load(str(planted)).affine).all()
    assert res.actions["descrip"] == "emptied" and res.actions["extensions"] == "removed"
    assert res.identifiers["descrip"].startswith("PLANTDESC")
    # deterministic: same key and input, same bytes
    F.scrub(planted, tmp_path / f"again{suffix}", ctx())
    assert (tmp_path / f"again{suffix}").read_bytes() == out.read_bytes()


def test_nifti_extension_keep_and_scrub_policies(tmp_path):
    import nibabel as nib
    planted = _planted_nifti(require_shared("nibabel", "anatomical.nii"), tmp_path / "in.nii")
    F = formats.get("nifti1")
    F.scrub(planted, tmp_path / "scrub.nii", ctx(nifti_extensions={"scrub": [6]}))
    ext = nib.load(str(tmp_path / "scrub.nii")).header.extensions
    assert [e.get_code() for e in ext][:1] == [6]
    assert b"PLANTEXT" in ext[0].get_content() and NAME.encode() not in ext[0].get_content()
    F.scrub(planted, tmp_path / "keep.nii", ctx(nifti_extensions={"keep": [6]}))
    assert NAME.encode() in (tmp_path / "keep.nii").read_bytes()  # kept byte for byte, as asked
    arrays_equal(planted, tmp_path / "keep.nii")
    assert (tmp_path / "keep.nii").stat().st_size == planted.stat().st_size  # image did not move


def test_analyze_pair_every_history_field(tmp_path):
    src = require_shared("analyze_spm99", "canonical", "avg152T1.hdr")
    hdr = bytearray(src.read_bytes())
    shutil.copy(src.with_suffix(".img"), tmp_path / "avg152T1.img")
    for off, n, text in ((4, 10, BIRTH), (14, 18, "plantdb.hdr"), (148, 80, "PLANTDESC " + NAME),
                         (228, 24, "PLANTAUX"), (263, 10, STATION), (273, 10, SERIAL), (283, 10, PID),
                         (293, 10, BIRTH), (303, 10, "120000"), (313, 3, "JOH")):
        _put(hdr, off, n, text)
    (tmp_path / "avg152T1.hdr").write_bytes(bytes(hdr))
    F = formats.get("analyze")
    assert F.companions(tmp_path / "avg152T1.hdr") == [tmp_path / "avg152T1.img"]
    res = F.scrub(tmp_path / "avg152T1.hdr", tmp_path / "o" / "x.hdr", ctx())
    assert [p.name for p in res.outputs] == ["x.hdr", "x.img"]
    assert_clean(res.outputs)
    arrays_equal(tmp_path / "avg152T1.hdr", tmp_path / "o" / "x.hdr")
    assert res.actions["originator"] == "kept (SPM origin)"
    out = (tmp_path / "o" / "x.hdr").read_bytes()
    assert out[253:263] == bytes(hdr[253:263])  # SPM origin kept
    # text in originator is not an origin: emptied
    _put(hdr, 253, 10, "DrPlant")
    (tmp_path / "avg152T1.hdr").write_bytes(bytes(hdr))
    res = F.scrub(tmp_path / "avg152T1.hdr", tmp_path / "o2" / "x.hdr", ctx())
    assert res.actions["originator"] == "emptied" and b"DrPlant" not in (tmp_path / "o2" / "x.hdr").read_bytes()


# ------------------------------------------------------------------------------------------------
# MGH / MGZ
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
def test_mgh_tags_removed_voxels_kept(suffix, tmp_path):
    import nibabel as nib
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = nib.MGHImage(data, np.eye(4))
    plain = tmp_path / "plain.mgh"
    nib.save(img, str(plain))
    raw = plain.read_bytes() + struct.pack(">ii", 3, 60) + f"mri_convert /home/{NAME}/{PID}/t1.mgz".encode().ljust(60)
    src = tmp_path / f"in{suffix}"
    src.write_bytes(gzip.compress(raw) if suffix == ".mgz" else raw)
    assert sniff.sniff(src) == "mgh"
    F = formats.get("mgh")
    assert F.extension(src) == suffix
    res = F.scrub(src, tmp_path / f"out{suffix}", ctx())
    assert res.actions["tags"] == "removed"
    assert_clean(res.outputs)
    arrays_equal(src, tmp_path / f"out{suffix}")


# ------------------------------------------------------------------------------------------------
# MINC1 / MINC2
# ------------------------------------------------------------------------------------------------
def _plant_minc1(dst):
    from nibabel.externals import netcdf
    shutil.copy(require_shared("nibabel", "tiny.mnc"), dst)
    f = netcdf.netcdf_file(str(dst), "a")
    p = f.createVariable("patient", "i", ())
    p.full_name, p.identification, p.birthdate, p.sex, p.age = NAME, PID, BIRTH, "male__", "033Y"
    s = f.variables["study"]
    s.institution, s.station_id, s.serial_no, s.start_date = INST, STATION, SERIAL, "20210622"
    s.referring_physician = "Dr^Plant^Referrer"
    a = f.createVariable("acquisition", "i", ())
    a.start_date, a.series_description, a.acquisition_id, a.protocol = "2021-06-22", f"secret-exam {NAME}", "ACQ" + PID, "T1 " + NAME
    a.repetition_time = 2.3
    d = f.createVariable("dicom_0x0010", "i", ())
    d.el_0x0010 = NAME
    d.el_0x1040 = ADDR
    f.history = "planted-history-user@host: mincconvert"
    f.close()
    return dst


def test_minc1_planted_attributes_in_place(tmp_path):
    src = _plant_minc1(tmp_path / "in.mnc")
    assert sniff.sniff(src) == "minc1"
    F = formats.get("minc1")
    ident = F.identity(src)
    assert ident["patient_id"] == PID and ident["patient_name"] == NAME
    res = F.scrub(src, tmp_path / "out.mnc", ctx())
    assert (tmp_path / "out.mnc").stat().st_size == src.stat().st_size  # same-size edits only
    assert_clean(res.outputs, PLANTED + ["20210622", "2021-06-22", "Referrer", ADDR])
    arrays_equal(src, tmp_path / "out.mnc")
    assert res.actions["patient:identification"] == "replaced"
    assert b"T1 *" in (tmp_path / "out.mnc").read_bytes()  # protocol cleaned, not removed
    # shifted dates with retain_long_modified_dates, characteristics kept with their option
    res = F.scrub(src, tmp_path / "shift.mnc", ctx(["retain_long_modified_dates", "retain_patient_characteristics"]))
    blob = (tmp_path / "shift.mnc").read_bytes()
    assert b"20210314" in blob and b"2021-03-14" in blob and b"033Y" in blob  # -100 days


@pytest.mark.parametrize("age, capped", [("092Y", b"090Y"), ("97", b"90\x00"), ("93 years", b"90\x00\x00"),
                                         ("Age: 92", b"90\x00\x00"), ("045Y", b"045Y")])
def test_minc1_kept_age_over_89_is_capped(tmp_path, age, capped):
    """A MINC patient:age of 92 was released as it was under retain_patient_characteristics
    (red-team 3): DICOM's PatientAge, twix and the sidecars cap it at 90."""
    from nibabel.externals import netcdf
    src = _plant_minc1(tmp_path / "in.mnc")
    f = netcdf.netcdf_file(str(src), "a")
    f.variables["patient"].age = age
    f.variables["patient"].weight = 97.0  # not an age: kept
    f.close()
    res = formats.get("minc1").scrub(src, tmp_path / "out.mnc", ctx(["retain_patient_characteristics"]))
    blob = (tmp_path / "out.mnc").read_bytes()
    assert capped in blob and (age == "045Y" or age.encode() not in blob)
    assert (res.actions.get("patient:age") == "capped") == (age != "045Y")
    weight = netcdf.netcdf_file(str(tmp_path / "out.mnc"), "r", mmap=False).variables["patient"].weight
    assert float(np.asarray(weight).ravel()[0]) == 97.0


def test_minc2_kept_numeric_and_text_ages_over_89_are_capped(tmp_path):
    import h5py
    for kind, value in (("text", np.bytes_("094Y")), ("number", np.float64(94.5))):
        src = tmp_path / f"{kind}.mnc"
        shutil.copy(require_shared("nibabel", "minc2_4d.mnc"), src)
        with h5py.File(src, "r+") as f:
            f["minc-2.0"].require_group("info").require_group("patient").attrs["age"] = value
        out = tmp_path / f"{kind}-out.mnc"
        formats.get("minc2").scrub(src, out, ctx(["retain_patient_characteristics"]))
        with h5py.File(out, "r") as f:
            got = f["minc-2.0/info/patient"].attrs["age"]
        assert (got == b"090Y") if kind == "text" else float(got) == 90.0, got


def test_minc2_planted_attributes(tmp_path):
    import h5py
    src = tmp_path / "in.mnc"
    shutil.copy(require_shared("nibabel", "minc2_4d.mnc"), src)
    with h5py.File(src, "r+") as f:
        info = f["minc-2.0"].require_group("info")
        p = info.require_group("patient")
        for k, v in (("full_name", NAME), ("identification", PID), ("birthdate", BIRTH)):
            p.attrs[k] = np.bytes_(v)
        s = info["study"]
        s.attrs["institution"], s.attrs["start_date"] = np.bytes_(INST), np.bytes_("20210622")
        s.attrs["serial_no"] = np.bytes_(SERIAL)
        d = info.require_group("dicom_0x0010")
        d.attrs["el_0x1040"] = np.bytes_(ADDR)
        f["minc-2.0"].attrs["history"] = np.bytes_("planted-history-user ran minccalc")
    F = formats.get(sniff.sniff(src))
    assert F.name == "minc2" and F.identity(src)["patient_id"] == PID
    res = F.scrub(src, tmp_path / "out.mnc", ctx())
    assert_clean(res.outputs, PLANTED + ["20210622", ADDR])
    arrays_equal(src, tmp_path / "out.mnc")
    # no HDF5 object keeps its creation or modification time (the input's: 1384394391), and a
    # second run writes the same bytes
    with h5py.File(tmp_path / "out.mnc", "r") as f:
        times = set()
        f.visititems(lambda name, obj: times.add((h5py.h5o.get_info(obj.id).mtime, h5py.h5o.get_info(obj.id).ctime)))
    assert times == {(0, 0)}
    assert (tmp_path / "out.mnc").read_bytes().find((1384394391).to_bytes(4, "little")) < 0
    F.scrub(src, tmp_path / "again.mnc", ctx())
    assert (tmp_path / "again.mnc").read_bytes() == (tmp_path / "out.mnc").read_bytes()


# ------------------------------------------------------------------------------------------------
# PAR/REC
# ------------------------------------------------------------------------------------------------
def test_parrec_lines_scrubbed_rec_untouched(tmp_path):
    d = require_shared("nibabel")
    text = (d / "phantom_EPI_asc_CLEAR_2_1.PAR").read_bytes().decode("latin-1")
    text = re.sub(r"(Patient name\s*:\s*)\S+", lambda m: m.group(1) + NAME, text)
    text = re.sub(r"(Examination name\s*:\s*)\S+", lambda m: m.group(1) + "secret-exam", text)
    text = re.sub(r"(Protocol name\s*:\s*)(.*)", lambda m: m.group(1) + "EPI " + NAME, text)
    text = text.replace("E:\\\\Export\\phantom_EPI_asc_CLEAR_2_1", "H:\\Export\\" + PID + "_JOHNATHAN")
    src = tmp_path / "scan.PAR"
    src.write_bytes(text.encode("latin-1"))
    shutil.copy(d / "phantom_EPI_asc_CLEAR_2_1.REC", tmp_path / "scan.REC")
    F = formats.get(sniff.sniff(src))
    assert F.identity(src)["patient_name"] == NAME
    res = F.scrub(src, tmp_path / "o" / "x.par", ctx())
    assert_clean(res.outputs, PLANTED + ["2014.02.14"])
    arrays_equal(src, tmp_path / "o" / "x.par")
    assert (tmp_path / "o" / "x.rec").read_bytes() == (tmp_path / "scan.REC").read_bytes()
    out = (tmp_path / "o" / "x.par").read_bytes().decode("latin-1")
    assert "EPI *" in out and "09:00:57" in out and "\r\n" in out
    F.scrub(src, tmp_path / "s" / "x.par", ctx(["retain_long_modified_dates"]))
    assert "2013.11.06 / 09:00:57" in (tmp_path / "s" / "x.par").read_text(encoding="latin-1")


# ------------------------------------------------------------------------------------------------
# Siemens twix
# ------------------------------------------------------------------------------------------------
def _plant_twix(src, dst):
    raw = bytearray(src.read_bytes())

    def fill(pattern: bytes, value: str):
        for m in re.finditer(pattern, bytes(raw)):
            s, e = m.span(1)
            raw[s:e] = (value.encode() + b"X" * (e - s))[:e - s]
    fill(rb'<ParamString\."tPatientName">\s*\{\s*"(x+)"', "JOHNATHAN")
    fill(rb'<ParamString\."PatientID">\s*\{\s*"(x+)"', PID)
    fill(rb'<ParamString\."PatientBirthDay">\s*\{\s*"(x+)"', BIRTH)
    raw[8 + 24:8 + 24 + 16] = b"DOE^JOHNATHAN\x00\x00\x00"  # multi-raid patient name
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("name", ["gre.dat", "epi.dat"])
def test_twix_headers_scrubbed_raw_data_identical(name, tmp_path):
    import twixtools
    src = _plant_twix(require_shared("twix", "example_data", name), tmp_path / name)
    F = formats.get(sniff.sniff(src))
    ident = F.identity(src)
    assert ident["patient_id"].startswith(PID) and ident["birth_date"] == BIRTH
    res = F.scrub(src, tmp_path / "out.dat", ctx())
    out = tmp_path / "out.dat"
    assert out.stat().st_size == src.stat().st_size
    real = ["DZNE", "Sigmund", "45385", "6.0.66327770", "6.0.66327775", "20210622", "Bonn", "JOHNATHAN", PID, BIRTH]
    assert_clean([out], real)
    a, b = twixtools.read_twix(str(src), verbose=False), twixtools.read_twix(str(out), verbose=False)
    assert len(a) == len(b)
    for ma, mb in zip(a, b):
        assert len(ma["mdb"]) == len(mb["mdb"]) > 0
        for x, y in zip(ma["mdb"], mb["mdb"]):
            assert np.array_equal(x.data, y.data)
        assert mb["hdr"]["Dicom"]["tPatientName"] == "sub-tstsubj1"[:7]  # 7 characters, as the original
    assert res.actions["raid:patient_name"] == "replaced"
    # everything after the headers (the MDH/k-space stream) is byte-identical
    ra, rb = src.read_bytes(), out.read_bytes()
    hdr_end = 10240 + struct.unpack("<I", ra[10240:10244])[0]
    assert ra[hdr_end:] == rb[hdr_end:]


# ------------------------------------------------------------------------------------------------
# Damaged files
# ------------------------------------------------------------------------------------------------
def test_damaged_files_are_refused_with_a_reason(tmp_path):
    d = require_shared("nibabel")
    cut = tmp_path / "cut.nii"
    cut.write_bytes((d / "anatomical.nii").read_bytes()[:20000])
    with pytest.raises(FormatError, match="truncated"):
        formats.get("nifti1").scrub(cut, tmp_path / "o.nii", ctx())
    assert not (tmp_path / "o.nii").exists() and not list(tmp_path.glob(".tmp-*"))
    gz = tmp_path / "cut.nii.gz"
    gz.write_bytes((d / "example4d.nii.gz").read_bytes()[:100000])
    with pytest.raises(FormatError):
        formats.get("nifti1").scrub(gz, tmp_path / "o.nii.gz", ctx())
    twix = tmp_path / "cut.dat"
    twix.write_bytes(require_shared("twix", "example_data", "gre.dat").read_bytes()[:900000])
    with pytest.raises(FormatError, match="truncated twix"):
        formats.get("twix").identity(twix)
    hdr = tmp_path / "lonely.hdr"
    shutil.copy(require_shared("analyze_spm99", "canonical", "avg152T1.hdr"), hdr)
    with pytest.raises(FormatError, match="without its .img"):
        formats.get("analyze").scrub(hdr, tmp_path / "o.hdr", ctx())


def test_inventory_pairs_companions_and_quarantines_orphans(tmp_path):
    inp = tmp_path / "in"
    (inp / "P1").mkdir(parents=True)
    (inp / "P2").mkdir()
    d = require_shared("nibabel")
    for f in ("phantom_EPI_asc_CLEAR_2_1.PAR", "phantom_EPI_asc_CLEAR_2_1.REC", "anatomical.nii", "T1.PAR"):
        shutil.copy(d / f, inp / "P1" / f)
    shutil.copy(require_shared("analyze_spm99", "canonical", "avg152T1.hdr"), inp / "P2" / "a.hdr")
    shutil.copy(require_shared("analyze_spm99", "canonical", "avg152T1.img"), inp / "P2" / "b.img")
    (inp / "P1" / "anatomical.json").write_text('{"RepetitionTime": 2.0, "PatientName": "DOE^JOHNATHAN"}')
    (inp / "P1" / "notes.json").write_text('{"annotation": "JOHNATHAN"}')
    twix = require_shared("twix", "example_data", "epi.dat")
    (inp / "P2" / "cut.dat").write_bytes(twix.read_bytes()[:500000])
    inv = inventory.build(inp, Pseudonymizer(KEY), subject_pattern=r"^(?P<subject>P\d)/")
    rows = {r["relpath"]: r for r in inv.rows}
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert ok == {"P1/phantom_EPI_asc_CLEAR_2_1.PAR", "P1/phantom_EPI_asc_CLEAR_2_1.REC", "P1/anatomical.nii",
                  "P1/anatomical.json"}
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "quarantine"}
    assert "without its REC" in reasons["P1/T1.PAR"]
    assert "without its .img" in reasons["P2/a.hdr"] and "without its .hdr" in reasons["P2/b.img"]
    assert reasons["P2/cut.dat"].startswith("twix: truncated")
    assert "not a BIDS sidecar" in reasons["P1/notes.json"]
    par, rec = rows["P1/phantom_EPI_asc_CLEAR_2_1.PAR"], rows["P1/phantom_EPI_asc_CLEAR_2_1.REC"]
    assert rec["primary"] == par["relpath"] and rec["subject"] == par["subject"]
    assert par["out_relpath"][:-4] == rec["out_relpath"][:-4] and par["out_relpath"].endswith(".par")
    # PAR has a patient name (header identity); the NIfTI takes the folder from subject_pattern
    nii, side = rows["P1/anatomical.nii"], rows["P1/anatomical.json"]
    assert nii["subject"] != par["subject"] and side["subject"] == nii["subject"]
    assert side["out_relpath"] == nii["src_id"] + ".json" and nii["release_dir"] == "sourcedata/nifti"
    # the same identity as a DICOM PatientID lands in the same subject (one patient key function)
    from deidflow.pseudonym import patient_key
    assert nii["subject"] == Pseudonymizer(KEY).subject(patient_key("P1", ""), "P1")
    assert all("\n" not in r for r in reasons.values())
