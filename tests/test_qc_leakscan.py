"""Leak scan: the rules for what is searched, the matcher, and the planted-leak test of issue 7 —
a clean demo release, then an original identifier planted in (a) a nested DICOM sequence, (b) a
private element, (c) a NIfTI extension, (d) a JSON sidecar, (e) a file name, (f) a .nii.gz:
`deidflow verify` reports each (file, location, hash, never the value) and nothing on the clean
release; under --strict a leak fails the run."""
from __future__ import annotations

import re
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from deidflow.demo import make_demo_input
from deidflow.qc import identifiers, leakscan

from .conftest import ROOT, TEST_KEY


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    return subprocess.run([sys.executable, "-m", "deidflow.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


# -- rules and matcher ---------------------------------------------------------------------------
def test_exclusion_rules_are_explicit():
    ex = identifiers.excluded_by
    assert ex("M", "name") == ex("1", "id") == ex("MR", "id") == "too_short"
    assert ex("ANONYMIZED", "name") == ex("Prof", "name") == ex("van", "name") == "common"
    assert ex("4711", "id") == ex("0930", "time") == "too_few_digits"
    assert ex("unreadable", "path") == "plain_word_path"
    for kept, kind in (("DOE", "name"), ("19640716", "date"), ("16.07.1964", "date"), ("山田", "name"),
                       ("Åse", "name"), ("MRN8284194", "id"), ("1.2.3.4.5", "uid"), ("DOE_JOHN_12", "path")):
        assert ex(kept, kind) is None, kept


def test_date_name_and_time_forms():
    d = identifiers.date_forms("19640716")
    assert {"19640716", "1964-07-16", "16.07.1964", "07/16/1964", "16/07/1964", "16.7.1964", "16 jul 1964",
            "july 16, 1964"} <= {x.lower() for x in d}
    n = identifiers.name_forms("MÜLLER^JÜRGEN^^DR. MED.")
    assert {"MÜLLER", "JÜRGEN", "JÜRGEN MÜLLER", "MÜLLER, JÜRGEN"} <= n
    assert {"093015", "09:30:15"} <= identifiers.time_forms("093015.123")
    w = identifiers.whole_name_forms("MÜLLER^JÜRGEN^^DR. MED.")
    assert {"JÜRGEN MÜLLER", "MÜLLER, JÜRGEN", "MÜLLER^JÜRGEN", "MÜLLER JÜRGEN"} <= w
    assert not w & {"MÜLLER", "JÜRGEN", "J. MÜLLER"}  # parts and initials are not another subject's whole name
    assert {"Erika Mustermann", "Mustermann, Erika"} <= identifiers.whole_name_forms("Erika Mustermann")
    assert identifiers.whole_name_forms("MUSTERMANN") == set()


def test_another_subjects_whole_name_is_found_not_its_parts():
    """A unit's scan searches other subjects' names as written whole (in any order, with accents
    or transliterated), never a family name alone: thousands of subjects share those."""
    m = leakscan.Matcher(leakscan.needles_for("sub-b", [("whole_name", "PatientName", "MÜLLER^JÜRGEN")], b"0" * 16))
    for text in (b"seen with Juergen Mueller", "Müller, Jürgen".encode(), b"MULLER^JURGEN", "jürgen müller".encode("latin-1")):
        hits = m.find(text)
        assert hits and {n.kind for _, n in hits} == {"name"} and {n.owner for _, n in hits} == {"sub-b"}, text
    for text in (b"Dr. Mueller", b"Juergen", b"J. Mueller", b"Juergen Muellerson"):
        assert not m.find(text), text


def test_separated_ids_are_found_as_well_among_many_subjects():
    """An ID written with other separators than stored (968-287 for 968287) is found by a matcher
    of thousands of subjects' IDs (the dataset's, or a unit's with every other subject's IDs) as by
    a subject's own, also where its digits run into a date once the separators are gone."""
    salt = b"0" * 16
    own = leakscan.needles_for("sub-a", [("id", "PatientID", "968287"), ("id", "AccessionNumber", "A-77-4711-3")], salt)
    few = leakscan.Matcher(own)
    many = leakscan.Matcher(own + [n for i in range(200) for n in
                                   leakscan.needles_for(f"sub-{i}", [("id", "PatientID", f"{700001 + 37 * i}")], salt)])
    assert len(many.compact_anchors) >= 48
    for text in (b"MRN 968-287 2019-05-01", b"MRN 968 287 2019", b"(968.287)", b"ref A 77 4711 3 20190501",
                 b"acc a774711-3-2019"):
        assert [(s, n.text) for s, n in few.find(text)] == [(s, n.text) for s, n in many.find(text)] != [], text
    for text in (b"x 1968-287 2", b"968-2870", b"a774711-32"):
        assert not many.find(text) and not few.find(text), text


def test_other_units_values_of_a_cjk_subject_also_full_width(tmp_path):
    """Another unit's subject with a CJK name: its IDs and Latin name are searched in full width
    too (ＭＲＮ４７１１０００), as a subject's own are; its name's needles are made at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"subject": ["sub-a", "sub-b", "sub-c"], "patient_id": ["P111111", "MRN4711000", "P222222"],
            "accession": ["", "", ""], "patient_name": ["DOE^JOHN", "YAMADA^TAROU=山田^太郎", "ROE^RICHARD"]}
    pq.write_table(pa.table(rows), tmp_path / "inventory.parquet")
    salt = b"0" * 16
    needles, names, roster = leakscan.other_units_values(tmp_path, {"subjects": [{"subject": "sub-a"}]}, salt)
    assert roster == ["sub-a", "sub-b", "sub-c"]
    assert set(names) == {"sub-c"}  # the CJK name is among the needles
    m = leakscan.UnitMatcher(needles, names, salt)
    for text in ("ＭＲＮ４７１１０００".encode(), "ＹＡＭＡＤＡ ＴＡＲＯＵ".encode(), "山田太郎".encode(), b"Richard Roe"):
        assert m.find(text), text
    assert not m.find(b"P111111 John Doe")  # the unit's own subject's values are its own scan's


def _word(i: int, first: str) -> str:
    """A made-up name part of its own for each ``i`` (letters only)."""
    return first + "".join(chr(97 + (i // 26 ** k) % 26) for k in range(3)) + "ler"


def test_unit_matcher_finds_what_one_matcher_of_every_name_finds():
    """Other subjects' names become needles only when a text holds their anchor word: the hits are
    those of one Matcher made of every name at once (accented, transliterated, CJK, several
    representations), and a text naming nobody makes none."""
    salt = b"0" * 16
    names = {"sub-b": "MÜLLER^JÜRGEN", "sub-c": "Erika Mustermann", "sub-d": "YAMADA^TAROU=山田^太郎=やまだ^たろう",
             "sub-e": "STRAUß^ANNA", "sub-f": "O'Brien-Smith^Mary-Kate", "sub-g": "LIAM^NOAH^MAXIMILIAN",
             "sub-h": "SMITHSONIAN^BOB=TOMAS^JAN", "sub-i": "Erik van der Berg",
             **{f"sub-x{i}": f"{_word(i, 'K')}^{_word(i, 'V')}" for i in range(300)}}
    own = leakscan.needles_for("sub-a", [("id", "PatientID", "P968287")], salt)
    lazy = leakscan.UnitMatcher(own, names, salt)
    whole = leakscan.Matcher(own + [n for s, v in names.items()
                                    for n in leakscan.needles_for(s, [("whole_name", "PatientName", v)], salt)])
    assert lazy.others is not None and {n.owner for n in lazy.made} == {"sub-d"}  # CJK forms: made at once
    texts = [b"nothing to see", b"seen: Juergen Mueller; P-968-287", "Müller, Jürgen".encode("latin-1"),
             "Anna Strauss / strauß, anna".encode(), "山田 太郎 / 山田^太郎".encode(),
             f"{_word(7, 'v')} {_word(7, 'k')} and {_word(250, 'K')}^{_word(250, 'V')}".encode(),
             b"Mustermann, Erika", f"{_word(12, 'k')} alone, {_word(12, 'v')} alone".encode(),
             b"MARY KATE OBRIEN SMITH", "Mary-Kate O\u2019Brien-Smith".encode(), "ＹＡＭＡＤＡ ＴＡＲＯＵ".encode(),
             b"Noah Liam; Noah Maximilian Liam", b"Jan Tomas", b"Berg, Erik van der"]
    for t in texts:
        assert sorted((s, e, n.owner, n.text) for s, e, n in lazy.spans(t)) == \
            sorted((s, e, n.owner, n.text) for s, e, n in whole.spans(t)), t
    assert len({n.owner for n in lazy.made}) < 12  # the rest were never made


def _matcher(*entries):
    return leakscan.Matcher(leakscan.needles_for("sub-a", entries, b"0" * 16))


def test_matcher_whole_tokens_case_and_uids():
    m = _matcher(("name", "PatientName", "MARY^SMITH"), ("date", "StudyDate", "20210315"),
                 ("uid", "StudyInstanceUID", "1.2.840.99.1.2"), ("name", "PatientName", "山田^太郎"))
    assert not m.find(b"ORIGINAL\\PRIMARY\\AXIAL")  # MARY inside PRIMARY
    assert m.find(b"seen by mary on 15.03.2021.")
    assert len(m.find(b"x 2021-03-15 y")) == 1
    for written in (b"scan 2021 Mar 15.", b"2021-MAR-15", b"2021Mar15", b"15-Mar-2021"):  # year first too
        assert len(m.find(written)) == 1, written
    assert not m.find(b"2021 Mar 150") and not m.find(b"2021 Mar 16")
    for written in (b"DOB 15-MAR-21", b"dob: 15 Mar 21.", b"(15MAR21)", b"dob 3/15/21", b"15/3/21"):  # two-digit year
        assert len(m.find(written)) == 1, written
    assert not m.find(b"15-MAR-212") and not m.find(b"115-mar-21") and not m.find(b"16-MAR-21")
    assert not m.find(b"tool 15.3.21") and not m.find(b"1.2.3.15/3/21")  # a version number; inside a UID
    assert not m.find(b"2.25.1202103154417")  # a date inside a longer number
    assert not m.find(b"1.2.840.99.1.23") and not m.find(b"9.1.2.840.99.1.2")
    assert m.find(b"ref 1.2.840.99.1.2.")
    assert m.find("山田様 経過観察".encode("utf-8"))
    assert m.find(b"SMITHsomething") == [] and m.find(b"SMITH_1980")


def test_tiff_tags_searched_tile_data_only_with_pixel_data(tmp_path):
    """A tiled TIFF's tag values (here ImageDescription and Artist) are searched; its tiles are
    image data, searched only with pixel_data. A TIFF whose structure cannot be read is searched whole."""
    import numpy as np
    import tifffile
    m = _matcher(("name", "PatientName", "Ødegård^Åse"), ("id", "PatientID", "MRN8284194"))
    img = np.zeros((32, 32), np.uint8)
    img[3, 2:12] = np.frombuffer(b"MRN8284194", np.uint8)  # the ID among the samples of the first tile
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, img, tile=(16, 16), description="Scan of Ødegård, Åse".encode("latin-1"), metadata=None,
                     extratags=[(315, "s", 0, "operator MRN8284194", True)])
    data = path.read_bytes()
    assert b"MRN8284194" in data and data.count(b"MRN8284194") == 2
    res = leakscan.scan_file(path, "slide.tif", m)
    assert {(h.kind, h.field) for h in res.hits} == {("name", "PatientName"), ("id", "PatientID")}
    with tifffile.TiffFile(path) as tf:
        tile_at = tf.pages[0].dataoffsets[0] + 3 * 16 + 2  # row 3, column 2 of the first tile
    assert data[tile_at:tile_at + 10] == b"MRN8284194"
    assert all(int(h.location.split()[-1]) != tile_at for h in res.hits)  # the Artist tag, not the tile
    assert res.skipped == 4 * 16 * 16 and not res.notes
    with_pixels = leakscan.scan_file(path, "slide.tif", m, pixel_data=True)
    assert any(int(h.location.split()[-1]) == tile_at for h in with_pixels.hits) and with_pixels.skipped == 0
    path.write_bytes(data[:tile_at + 100])  # cut inside the tiles: searched whole, and said so
    res = leakscan.scan_file(path, "slide.tif", m)
    assert res.notes and any(int(h.location.split()[-1]) == tile_at for h in res.hits)


def test_png_text_chunks_searched_image_samples_only_with_pixel_data(tmp_path):
    """A PNG's text chunks are searched (zTXt decompressed); its image samples are pixels, searched
    (decompressed) only with pixel_data: a value among them is not a false alarm by default."""
    import struct
    import zlib

    def chunk(ctype: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))

    m = _matcher(("name", "PatientName", "Ødegård^Åse"), ("id", "PatientID", "MRN8284194"))
    row = "xx Åse yy".encode("latin-1")  # grey samples; filter type 0, stored (not compressed)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", len(row), 2, 8, 0, 0, 0, 0))
           + chunk(b"tEXt", b"Comment\0scan of MRN8284194")
           + chunk(b"zTXt", b"Author\0\0" + zlib.compress("Ødegård, Åse".encode("latin-1")))
           + chunk(b"IDAT", zlib.compress((b"\0" + row) * 2, 0)) + chunk(b"IEND", b""))
    path = tmp_path / "x.png"
    path.write_bytes(png)
    assert "Åse".encode("latin-1") in png
    res = leakscan.scan_file(path, "x.png", m)
    assert {h.location.split(",")[0] for h in res.hits} == {"PNG tEXt chunk", "PNG zTXt chunk"}
    assert res.skipped > 0 and not res.notes
    with_pixels = leakscan.scan_file(path, "x.png", m, pixel_data=True)
    assert any(h.location.startswith("PNG image data") for h in with_pixels.hits)
    path.write_bytes(png[:-20])  # damaged: searched as raw bytes, and said so
    res = leakscan.scan_file(path, "x.png", m)
    assert res.notes and any(h.location.startswith("byte offset") for h in res.hits)


def test_collector_keeps_only_what_the_profile_changes(key_env, tmp_path):
    """The DICOM engine records the original values it removes or replaces (never kept ones)."""
    from deidflow.dicom import Scrubber, SubjectContext
    from deidflow.dicomio import deidentify_path
    from deidflow.profile import build_plan
    from deidflow.pseudonym import Pseudonymizer
    src = tmp_path / "in.dcm"
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", "MRN1234567", "19580412"
    ds.Manufacturer = "SIEMENS"  # kept by the profile: not an identifier
    ds.save_as(src)
    col = identifiers.IdentifierCollector()
    sc = Scrubber(build_plan(), SubjectContext(Pseudonymizer(key_env), "sub-x", -10, identifiers=col))
    deidentify_path(src, tmp_path / "out.dcm", sc)
    values = {v for _, _, v in col.entries()}
    assert {"DOE^JOHN", "MRN1234567", "19580412", str(ds.StudyInstanceUID)} <= values
    assert "SIEMENS" not in values and "1.2.840.10008.5.1.4.1.1.4" not in values  # kept; registered UID


@pytest.mark.parametrize("options, searched", [((), True), (("retain_device_identity",), False)])
def test_station_ae_title_is_device_identity(key_env, tmp_path, options, searched):
    """Siemens scanners name the station and its AE title alike (dcm_qa_decubitus: StationName =
    SourceApplicationEntityTitle).  With retain_device_identity the kept StationName made the
    rebuilt file meta's AE title a leak: every subject of the research preset was withheld."""
    from deidflow.dicom import Scrubber, SubjectContext
    from deidflow.dicomio import deidentify_path
    from deidflow.profile import build_plan
    from deidflow.pseudonym import Pseudonymizer
    src = tmp_path / "in.dcm"
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    ds.StationName = ds.file_meta.SourceApplicationEntityTitle = "AWP67060"
    ds.save_as(src)
    col = identifiers.IdentifierCollector()
    sc = Scrubber(build_plan(options), SubjectContext(Pseudonymizer(key_env), "sub-x", -10, identifiers=col))
    deidentify_path(src, tmp_path / "out.dcm", sc)
    assert ("AWP67060" in {v for _, _, v in col.entries()}) == searched


def test_collector_decodes_iso_2022_values(key_env, tmp_path):
    """ISO 2022 IR 87 text is 7-bit (escape sequences and JIS X 0208 bytes): taken for ASCII, the
    collected name of pydicom's chrH31 was "Yamada^Tarou=\\x1b$B;3ED\\x1b(B^…", so the leak scan
    never searched 山田 or やまだ, and searched the escape sequence every Japanese text holds
    (found by red-team 2)."""
    from pydicom.data import get_charset_files
    from deidflow.dicom import Scrubber, SubjectContext
    from deidflow.dicomio import deidentify_path
    from deidflow.profile import build_plan
    from deidflow.pseudonym import Pseudonymizer
    col = identifiers.IdentifierCollector()
    sc = Scrubber(build_plan(), SubjectContext(Pseudonymizer(key_env), "sub-x", -10, identifiers=col))
    deidentify_path(Path(get_charset_files("chrH31.dcm")[0]), tmp_path / "out.dcm", sc)
    names = {v for k, _, v in col.entries() if k == "name"}
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in names
    assert not any("\x1b" in v for _, _, v in col.entries())


# -- the demo release -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(demo_patients, demo_release):
    """The demo export released with the default configuration (conftest's session run, which
    test_bids_workflow shares): the tests copy the release before planting anything."""
    _inp, patients = demo_patients
    restricted = demo_release["restricted"]
    with open(restricted / "mapping" / "patients.csv") as fh:
        subject_of = {row["id_old"]: row["id_new"] for row in csv.DictReader(fh)}
    p = next(p for p in patients if p.name.startswith("MUSTERMANN"))
    return {"release": demo_release["out"], "restricted": restricted, "patient": p,
            "subject": subject_of[p.patient_id], "stdout": demo_release["stdout"]}


def test_identifiers_cover_the_demo_patients(demo):
    """Every patient's name, ID, birth date, study UIDs and accession numbers are searched for."""
    r = demo["restricted"]
    values = set()
    for f in r.glob("work/*/identifiers/*/*.json"):
        assert f.stat().st_mode & 0o777 == 0o600
        values |= {v[2] for v in json.loads(f.read_text())["values"]}
    p = demo["patient"]
    assert {p.name, p.patient_id, p.birth_date} <= values
    for s in p.studies:
        assert {s.study_instance_uid, s.accession_number} <= values


def test_clean_release_has_no_hit(demo):
    r = cli("verify", str(demo["release"]), "--restricted", str(demo["restricted"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no identifying value found" in r.stdout and "LEAK" not in r.stdout
    assert re.search(r"leak scan: +5 subjects, \d+ files: no identifying value found", demo["stdout"])  # the summary
    assert "QC report:" in demo["stdout"]


def _copy(demo, tmp_path) -> Path:
    out = tmp_path / "release"
    shutil.copytree(demo["release"], out)
    return out


def _subject_dicoms(release: Path, subject: str) -> list[Path]:
    return sorted((release / "sourcedata" / "dicom" / subject).rglob("*.dcm"))


def _nifti(path: Path, *, descrip: bytes = b"", extension: bytes | None = None) -> None:
    import nibabel as nib
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["descrip"] = descrip
    if extension is not None:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, extension))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _plant(case: str, release: Path, subject: str, p) -> str:
    """Plant one original value; return the location verify must name."""
    study = p.studies[0]
    anat = release / subject / "ses-planted" / "anat"
    if case == "nested_sequence":
        f = _subject_dicoms(release, subject)[0]
        ds = pydicom.dcmread(f)
        inner = Dataset()
        inner.CodeMeaning = f"see {p.name.split('^')[0].title()} exam"
        outer = Dataset()
        outer.PurposeOfReferenceCodeSequence = [inner]
        ds.ReferencedImageSequence = [outer]
        ds.save_as(f)
        return "ReferencedImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeMeaning"
    if case == "private_element":
        f = _subject_dicoms(release, subject)[1]
        ds = pydicom.dcmread(f)
        ds.private_block(0x0011, "PLANTED LEAK", create=True).add_new(0x01, "LO", p.patient_id)
        ds.save_as(f)
        return "(0011,1001)"
    if case == "nifti_extension":
        birth = p.birth_date
        _nifti(anat / f"{subject}_ses-planted_T1w.nii",
               extension=f"born {birth[6:]}.{birth[4:6]}.{birth[:4]}".encode())
        return "NIfTI extension 0 (ecode 6)"
    if case == "json_sidecar":
        sidecar = next((release / subject).rglob("*.json"))
        doc = json.loads(sidecar.read_text())
        doc["InstitutionName"] = study.institution
        sidecar.write_text(json.dumps(doc, ensure_ascii=False))
        return "JSON InstitutionName"
    if case == "file_name":
        f = _subject_dicoms(release, subject)[2]
        f.rename(f.with_name(f"0003_{p.folder}.dcm"))
        return "file name"
    if case == "nii_gz":
        path = anat / f"{subject}_ses-planted_T2w.nii.gz"
        _nifti(path, descrip=study.accession_number.encode())
        assert study.accession_number.encode() not in path.read_bytes()  # only in the gunzipped bytes
        return "gunzipped content, NIfTI header field descrip"
    raise AssertionError(case)


CASES = ("nested_sequence", "private_element", "nifti_extension", "json_sidecar", "file_name", "nii_gz")


def test_each_planted_leak_is_reported(demo, tmp_path):
    p, subject = demo["patient"], demo["subject"]
    for case in CASES:
        release = tmp_path / case
        shutil.copytree(demo["release"], release)
        location = _plant(case, release, subject, p)
        result = leakscan.verify(release, demo["restricted"])
        hits = [h for u in result["units"] for s in u["subjects"].values() for h in s["hits"]]
        assert hits, f"{case}: nothing found"
        assert any(location in h["location"] for h in hits), (case, [h["location"] for h in hits])
        assert all(h["owner"] == subject for h in hits), case
        text = json.dumps(result, ensure_ascii=False)
        for secret in (p.patient_id, p.birth_date, p.folder, p.studies[0].accession_number,
                       p.studies[0].institution, "Mustermann"):
            assert secret not in text, (case, "a value is printed")
    # the command line: exit status 1, one line per hit naming file, location and hash only
    r = cli("verify", str(tmp_path / "file_name"), "--restricted", str(demo["restricted"]))
    assert r.returncode == 3 and "LEAK" in r.stdout and "value hash" in r.stdout
    assert p.folder not in r.stdout and "[name withheld" in r.stdout


def test_verify_finds_a_value_of_a_subject_in_another_unit(demo, tmp_path):
    """A run's unit scan knows its unit's values only; `deidflow verify` searches every file for
    every subject's values: Erika Mustermann's ID in a sidecar of a subject of another unit."""
    p, subject = demo["patient"], demo["subject"]
    units = [json.loads(m.read_text()) for m in leakscan.manifests(demo["restricted"])]
    other = next(s["subject"] for u in units if subject not in {s["subject"] for s in u["subjects"]}
                 for s in u["subjects"] if (demo["release"] / s["subject"]).is_dir())
    release = _copy(demo, tmp_path)
    sidecar = next((release / other).rglob("*.json"))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "SequenceName": f"*tfl3d1_{p.patient_id}"}))
    r = cli("verify", str(release), "--restricted", str(demo["restricted"]))
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"LEAK {other}: {sidecar.relative_to(release).as_posix()} at JSON SequenceName" in r.stdout, r.stdout
    assert f"(value of {subject})" in r.stdout and p.patient_id not in r.stdout


def test_dataset_gate_scans_every_staged_file(tmp_path):
    """publish_dataset moves every file of the dataset staging area into the release: the gate
    searches every one, also those named like a subject's (``sub-X_sessions.tsv``, ``sub-X/``)."""
    staged = tmp_path / "staging" / "dataset"
    (staged / "sub-a").mkdir(parents=True)
    (staged / "sub-a_sessions.tsv").write_text("session_id\tnote\nses-1\tMary Smith\n")
    (staged / "sub-a" / "notes.txt").write_text("seen by Mary Smith\n")
    (staged / "README").write_text("clean\n")
    m = _matcher(("name", "PatientName", "MARY^SMITH"))
    result = leakscan.verify_dataset(staged, tmp_path, matcher=m)
    assert result["files"] == 3
    assert sorted({h["file"] for h in result["hits"]}) == ["sub-a/notes.txt", "sub-a_sessions.tsv"]


def test_file_dropped_into_the_qc_folder_is_scanned(demo, tmp_path):
    """The QC folder holds the report's four files (checked by the dataset gate) and the subjects'
    QC folders: anything else there is a dataset-level file `deidflow verify` searches."""
    p = demo["patient"]
    release = _copy(demo, tmp_path)
    qc = release / "derivatives" / "deidflow" / "qc"
    (qc / "notes.html").write_text(f"<p>MRN {p.patient_id}</p>")
    result = leakscan.verify(release, demo["restricted"])
    assert [h["file"] for h in result["dataset"]["hits"]] == ["derivatives/deidflow/qc/notes.html"]
    assert not any(str(f).endswith("report.html") for f in leakscan.dataset_files(release))


def test_strict_run_fails_on_a_leak_and_report_shows_it(tmp_path):
    """Keeping PatientBirthDate by override leaves it in the release (a date value the residual
    sweep does not rewrite; a kept PatientID is swept since red-team round 6).  Without --strict
    the report says LEAK; with it the run fails.  (The head MRI is not defaced: the leak is in
    headers, and faces take 8 s a run.)"""
    inp = tmp_path / "input"
    make_demo_input(inp)
    keep = "dicom.overrides=[{attribute: PatientBirthDate, action: keep}]"
    r = cli("run", str(inp), str(tmp_path / "rel"), "--cores", "2", "--set", keep, "--set", "face.method=none")
    assert r.returncode == 3, r.stderr[-2000:]  # the release gate withholds the leaking subjects
    assert "LEAK in" in r.stdout
    html = (tmp_path / "rel" / "derivatives" / "deidflow" / "qc" / "report.html").read_text()
    assert ">LEAK<" in html
    r = cli("run", str(inp), str(tmp_path / "strict"), "--cores", "2", "--set", keep, "--set", "face.method=none",
            "--strict")
    assert r.returncode != 0
    assert "leak scan:" in r.stderr and "identifying value(s) found" in r.stderr


# -- precision (issue 15): what identifies nobody is not searched -------------------------------
def test_tool_and_format_words_in_a_name_are_not_searched():
    """Real Canon data names the patient ``cd211006a^dcm2niix``: the tool's name is in every
    sidecar and in the report; the ID part is still searched."""
    m = _matcher(("name", "PatientName", "cd211006a^dcm2niix"))
    assert not m.find(b'{"ConversionSoftware": "dcm2niix", "ConversionSoftwareVersion": "v1.0"}')
    assert m.find(b"subject cd211006a")


def test_colliding_surnames_match_only_as_names():
    """Patients called Short, Name, Gre and Field: the report's rule names, JSON keys and MR
    protocol names are not hits; the combined name is."""
    m = _matcher(("name", "PatientName", "SHORT^NAME"), ("name", "OperatorsName", "GRE^FIELD"))
    for clean in (b"excluded: too_short 12, common 3", b'"PatientName": "sub-01"', b"gre_field_mapping",
                  b"Field map (B0), short TE", b"Name"):
        assert not m.find(clean), clean
    assert m.find(b"operator Field Gre") and m.find(b"SHORT, NAME") and m.find(b"Name Short")


def test_private_values_and_unidentifying_fields_are_not_searched():
    """Private values of unknown meaning, protocol names and free-text blobs of other formats
    are not identifiers to search for (they recur in every clean release)."""
    assert identifiers.element_kind(0x00191008, "LO")[0] is None
    assert identifiers.element_kind(0x00291001, "UI")[0] == "uid"
    assert identifiers.element_kind(0x00181030, "LO")[0] is None  # ProtocolName
    assert identifiers.field_kind("tProtocolName", "gre_field_mapping") is None
    assert identifiers.field_kind("descrip", "FSL5.0") is None
    assert identifiers.field_kind("patient:full_name", "Doe John") == "name"
    assert identifiers.field_kind("PatientID", "P968287") == "id"


def test_json_keys_are_not_searched(tmp_path):
    m = _matcher(("name", "PatientName", "Echo^Zweistein"), ("id", "PatientID", "P968287"))
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"EchoTime": 0.03, "Zweistein": "P-968-287"}))
    res = leakscan.scan_file(path, "x.json", m)
    # found in the value only; the location names the key by position, since the key holds the name
    # (locations are printed and listed; red-team 6)
    assert [h.location for h in res.hits] == ["JSON key 1"]


def test_one_matcher_for_all_subjects_names_the_owner():
    a = leakscan.needles_for("sub-a", [("name", "PatientName", "DOE^JOHN")], b"0" * 16)
    b = leakscan.needles_for("sub-b", [("date", "PatientBirthDate", "19610312")], b"0" * 16)
    m = leakscan.Matcher(a + b)
    found = {n.owner for _, n in m.find(b"John Doe, born 12 March 1961")}
    assert found == {"sub-a", "sub-b"}


def _subject_entries(i: int) -> list[tuple[str, str, str]]:
    return [("name", "PatientName", f"SHARED^SUBJECT{i:05d}"), ("id", "PatientID", f"PX{i:06d}"),
            ("id", "InstitutionName", "Shared General Hospital"),
            ("uid", "StudyInstanceUID", f"1.2.826.0.1.3680043.9.{i}.1"), ("date", "PatientBirthDate", "19700101")]


def test_dataset_matcher_of_many_subjects_finds_subject_n_over_2():
    """The combined matcher of thousands of subjects (one pass over the text's tokens, values that
    many subjects share checked once per occurrence) finds what one subject's own matcher finds."""
    n, salt = 3000, b"0" * 16
    half = n // 2
    big = leakscan.Matcher([x for i in range(n) for x in leakscan.needles_for(f"sub-{i}", _subject_entries(i), salt)])
    small = leakscan.Matcher(leakscan.needles_for(f"sub-{half}", _subject_entries(half), salt))
    assert len(big.anchors) >= 48  # the many-values path
    filler = "<tr><td>sub-x</td><td>subject table</td><td>clean</td></tr>\n" * 2000
    planted = {
        "name": f"Subject{half:05d}",
        "id with separators": f"PX {half:06d}"[:6] + "-" + f"{half:06d}"[3:],
        "uid": f"ref 1.2.826.0.1.3680043.9.{half}.1.",
    }
    for what, value in planted.items():
        text = (filler + value + "\n" + filler).encode()
        owners = {nd.owner for _, nd in big.find(text)}
        assert owners == {f"sub-{half}"}, what
        assert sorted(s for s, _ in big.find(text)) == sorted(s for s, _ in small.find(text)), what
    # near misses stay misses: a longer number, a longer word, another subject's neighbour UID
    text = (filler + f"subject{half:05d}9 Xsubject{half:05d} 1.2.826.0.1.3680043.9.{half}.11").encode()
    assert big.find(text) == []
    # a value every subject shares is reported once for each of them
    shared = big.find(b"seen at Shared General Hospital.")
    assert len({nd.owner for _, nd in shared}) == n


def test_value_at_the_end_of_a_dicom_element_is_found(tmp_path):
    """A name ending an even-length value is followed directly by the next tag: an item or sequence
    delimiter (FE FF) or Pixel Data (E0 7F).  Those bytes are no letters (not UTF-8 text): the name
    is a whole word.  A name followed by an accented letter (UTF-8) is still part of a longer word."""
    m = _matcher(("name", "PersonName", "Adebayo^Folake"))
    for tail in (b"\xfe\xff\x00\xe0", b"\xfe\xff\r\xe0", b"\xe0\x7f\x10\x00", b"\x88\x00\x04\x01"):
        assert m.find(b"referred by Dr Adebayo" + tail), tail
        assert m.find(b"\xfe\xff\x00\xe0Adebayo, F."), tail
    assert not m.find("Adebayoé".encode("utf-8")) and not m.find("éAdebayo".encode("utf-8"))
    # end to end: an SR text item (even length, last element of its item) in a released file
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.3.4.5.6"
    item = Dataset()
    item.ValueType, item.TextValue = "TEXT", "referred by Dr Adebayo"
    ds.ContentSequence = [item]
    ds["ContentSequence"].is_undefined_length = True  # items end with a delimiter, as scanners write them
    ds.ContentSequence[0].is_undefined_length_sequence_item = True
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = tmp_path / "0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert b"Adebayo\xfe\xff" in path.read_bytes()
    hits = leakscan.scan_file(path, "sourcedata/dicom/sub-a/0001.dcm", m).hits
    assert hits and hits[0].field == "PersonName"


def test_greek_names_are_found_in_latin_letters():
    """pydicom's chrGreek.dcm patient Διονυσιος, written DIONYSIOS in a kept description (ISO_IR 126
    text beside an ASCII one): the ELOT 743 and the classical spellings are searched, as Cyrillic."""
    m = _matcher(("name", "PatientName", "Διονυσιος^Παπαδόπουλος"), ("name", "OperatorsName", "Χρήστος"))
    for text in (b"DIONYSIOS head", b"seen by Dionisios", b"PAPADOPOULOS, D.", b"Dr Christos",
                 "ΔΙΟΝΥΣΙΟΣ".encode("utf-8"), "Παπαδοπουλος".encode("utf-8")):
        assert m.find(text), text
    assert identifiers.transliterations("Пётр") >= {"petr", "pyotr"}  # Cyrillic as before


def test_hyphenated_and_apostrophe_names_in_free_text():
    """O'Brien-Smith^Mary-Kate written MARY KATE OBRIEN, OBRIEN SMITH, O’Brien (typographic
    apostrophe) in a kept description was released with exit 0 (found by red-team 2)."""
    m = _matcher(("name", "PatientName", "O'Brien-Smith^Mary-Kate"))
    for text in (b"t1 MARY KATE OBRIEN", b"OBRIEN", b"pt OBRIEN SMITH", "pt O’Brien Smith, Mary".encode("utf-8"),
                 b"Kate O Brien", b"MaryKate", b"obriensmith", b"Mary-Kate O'Brien-Smith"):
        assert m.find(text), text
    assert not m.find(b"O positive") and not m.find(b"Brienz")


def test_mc_and_mac_names_written_apart_or_with_the_other_prefix():
    """MCDONALD^RONALD written 'seen by Mc Donald' or 'MacDonald' in a kept comment was released
    with exit 0 (red-team 3 left it open); Mac Gregor stored apart is found written together."""
    m = _matcher(("name", "PatientName", "MCDONALD^RONALD"), ("name", "ReferringPhysicianName", "Mac Gregor^Ewan"))
    for text in (b"seen by Mc Donald", b"Mc-Donald", b"MacDonald", b"Mac Donald", b"Dr McGregor", b"MACGREGOR"):
        assert m.find(text), text
    for text in (b"McDonalds", b"machine", b"Donaldson", b"Mc Don"):
        assert not m.find(text), text
    assert identifiers.gaelic_spellings("Macy") == set() and identifiers.gaelic_spellings("Smith") == set()


def test_korean_name_stored_only_in_hangul_found_in_latin_letters():
    """홍^길동 stored only in Hangul, written Hong Gildong, HONG GIL-DONG or Gil Dong Hong in a kept
    comment, was released with exit 0 (red-team 3 left it open): the Revised Romanization, the
    popular spelling (Kyung, Young, Soo) and the usual spellings of family names are searched; a
    family name alone is not (Min, Song and Moon are words)."""
    m = _matcher(("name", "PatientName", "홍^길동"), ("name", "ReferringPhysicianName", "김영수"),
                 ("name", "OperatorsName", "민^지현"))
    for text in (b"Hong Gildong", b"HONG GIL-DONG", b"Gil Dong Hong", b"Hong, Gildong", b"Dr Kim Youngsoo",
                 b"GIM YEONG-SU", b"Kim Young Soo", b"by Min Jihyun", b"Jihyun Min"):
        assert m.find(text), text
    for text in (b"5 min perfusion", b"Kim", b"Hong Kong", b"dong"):
        assert not m.find(text), text
    assert identifiers.hangul_spellings("민") == set() and identifiers.hangul_spellings("Smith") == set()
    assert {"Lee^Minho", "Yi^Min-ho", "Rhee^Min ho"} <= identifiers.hangul_spellings("이^민호")


def test_japanese_phonetic_names_in_every_kana():
    """pydicom's chrH31 patient Yamada^Tarou=山田^太郎=やまだ^たろう written ヤマダ タロウ (katakana) in
    a kept description and ﾔﾏﾀﾞ ﾀﾛｳ (half-width, chrH32's spelling) in ImageComments was released
    with exit 0 (found by red-team 2); the other way round too."""
    m = _matcher(("name", "PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう"))
    for text in ("ヤマダ タロウ t1", "ﾔﾏﾀﾞ ﾀﾛｳ", "ﾀﾛｳ", "ヤマダタロウ様"):
        assert m.find(text.encode("utf-8")), text
    m = _matcher(("name", "PatientName", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"))
    assert m.find("ヤマダ".encode("utf-8")) and m.find("やまだ たろう".encode("utf-8"))


def test_cjk_names_written_without_a_space_are_found_whole():
    """王小东 (chrX2's Wang^XiaoDong=王^小东) in a kept StudyDescription lost 小东 only: the
    one-character family name 王 (too short to search alone) stayed beside the redaction."""
    m = _matcher(("name", "PatientName", "Wang^XiaoDong=王^小东"), ("name", "OtherPatientNames", "홍^길동"))
    assert identifiers.Matcher.redact(m, "王小东 head".encode("utf-8")).decode("utf-8", "replace").count("王") == 0
    assert m.find("홍길동".encode("utf-8"))
    assert m.redact_text("患者 홍길동") == "患者 *"


def test_chinese_and_japanese_names_in_their_other_han_characters():
    """pydicom's chrX2 stores Wang^XiaoDong=王^小东 (simplified, GB18030), chrX1 the same patient as
    王^小東 (traditional): a Taiwanese or Hong Kong report writes 王小東, a mainland one 王小东, and a
    Japanese record 渡邊 for the 渡辺 in the header.  Only the stored characters were searched, so the
    other spelling was released with exit 0."""
    m = _matcher(("name", "PatientName", "Wang^XiaoDong=王^小东"), ("name", "ReferringPhysicianName", "渡辺^健二"))
    for text in ("王小東 head", "患者 王 小東", "小東", "王小东", "Dr 渡邊 健二", "渡边健二", "渡邊"):
        assert m.find(text.encode("utf-8")), text
        assert "東" not in m.redact_text(text) and "邊" not in m.redact_text(text)
    assert not m.find("東京 小林".encode("utf-8")) and not m.find("辺縁".encode("utf-8"))
    assert identifiers.han_variants("張偉") >= {"张伟", "張伟", "张偉"}
    assert identifiers.han_variants("Smith") == set() and identifiers.han_variants("山田") == set()
    many = "张伟强国华为边台" * 2  # past HAN_VARIANTS_MAX: each character's variants in place
    out = identifiers.han_variants(many)
    assert len(out) < 40 and "張" + many[1:] in out and many[:-1] + "臺" in out


def test_names_beside_typographic_punctuation_are_found():
    """“Okafor” seen by Dr<NBSP>Adebayo’s team, Okafor’s scan: the curly quotes, apostrophe and
    no-break space are UTF-8 bytes >= 0x80 and counted as letters, so the patient's and the
    physician's names were released with exit 0 (found by red-team 2).  Only Latin letters and
    combining marks continue a word; another script is a boundary too (Adebayo様)."""
    m = _matcher(("name", "PatientName", "Okafor^Chidi"), ("name", "ReferringPhysicianName", "Adebayo^Folake"))
    for text in ("“Okafor” seen", "Dr\u00a0Adebayo\u00a0said", "Adebayo’s team", "Okafor–Smith", "Okafor…",
                 "（Okafor）", "Adebayo様", "«Okafor»"):
        assert m.find(text.encode("utf-8")), text
    for text in ("Okaforé", "éOkafor", "Okafore\u0301", "Okaforß"):
        assert not m.find(text.encode("utf-8")), text


def test_full_width_ids_and_names_of_a_cjk_subject():
    """Japanese text writes Latin letters and digits full-width: 患者ＩＤ ＭＲＮ４７１１０００ ＹＡＭＡＤＡ in
    chrH31's ImageComments was released with exit 0 (found by red-team 2)."""
    m = _matcher(("name", "PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう"), ("id", "PatientID", "MRN4711000"))
    text = "患者ＩＤ ＭＲＮ４７１１０００ ＹＡＭＡＤＡ Ｔａｒｏｕ"
    assert m.redact_text(text) == "患者ＩＤ * * *"
    plain = _matcher(("name", "PatientName", "Smith^John"), ("id", "PatientID", "MRN4711000"))
    assert len(plain) == len(_matcher(("name", "PatientName", "Smith^John"))) + len(_matcher(("id", "PatientID", "MRN4711000")))


def test_release_file_the_scan_cannot_read_is_a_hit_not_a_note(tmp_path):
    """A release file whose content the leak scan could not read (a damaged gzip stream, an
    unreadable file) was only noted, and its subject published unverified: it is now a hit of
    kind ``unscanned``, which withholds the subject like a found value."""
    import gzip
    m = _matcher(("name", "PatientName", "MARY^SMITH"))
    good = gzip.compress(b'{"note": "nothing here"}' * 50, mtime=0)
    bad = tmp_path / "side.json.gz"
    bad.write_bytes(good[:40] + bytes(len(good) - 40))  # the stream breaks after its first bytes
    res = leakscan.scan_file(bad, "sub-a/side.json.gz", m)
    assert [h.kind for h in res.hits] == ["unscanned"] and "gzip content unreadable" in res.hits[0].location
    ok = tmp_path / "ok.json.gz"
    ok.write_bytes(good)
    assert leakscan.scan_file(ok, "sub-a/ok.json.gz", m).hits == []
    gone = tmp_path / "locked.json"
    gone.write_text("{}")
    gone.chmod(0)
    if not os.access(gone, os.R_OK):  # (root reads it anyway)
        assert [h.kind for h in leakscan.scan_file(gone, "sub-a/locked.json", m).hits] == ["unscanned"]


def test_unit_without_values_of_its_own_still_finds_another_subjects_accented_name():
    """A unit whose subjects have no identifying values of their own (a folder named sub-01, no
    header identity) skipped the accent folding of the other subjects' names: MULLER^JURGEN of
    another unit written 'Jürgen Müller' in its files was not found."""
    m = leakscan.UnitMatcher([], {"sub-a": "MULLER^JURGEN"}, b"salt")
    assert not m.empty()
    for text in ("seen with Jürgen Müller", "seen with Jurgen Muller"):
        assert [n.owner for _, _, n in m.spans(text.encode())] == ["sub-a"], text
