"""Red-team round 6: non-DICOM formats and BIDS outputs.  Each test plants identifiers where a
hostile export can carry them and which were released with exit 0 before the fix (see
docs/design-notes.md, "Red-team round 6: non-DICOM formats and BIDS outputs")."""
from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from deidflow import formats
from deidflow.formats import tiff
from deidflow.formats.base import FormatError, ScrubContext
from deidflow.pseudonym import Pseudonymizer
from deidflow.qc import leakscan

from .conftest import require_shared

tifffile = pytest.importorskip("tifffile")

KEY = b"redteam6-test-key-0123456789"
NAME, MRN, BIRTH, ACC = "NIXON^NORA", "4455667", "19610423", "ACC9087123"
PLANTED = [NAME, "NIXON", MRN, BIRTH, ACC]
TEXT = f"{NAME} MRN {MRN} DOB {BIRTH} {ACC}".encode()


def ctx(options=()):
    return ScrubContext(subject="sub-tstsubj1", pseudo=Pseudonymizer(KEY), date_offset=-100,
                        settings={"options": list(options)}, known=[NAME, MRN])


def assert_clean(blob: bytes) -> None:
    left = [v for v in PLANTED if v.encode().lower() in blob.lower()]
    assert not left, f"planted values survived: {left}"


# ------------------------------------------------------------------------------------------------
# TIFF: bytes inside a strip's or tile's byte count after its coded image
# ------------------------------------------------------------------------------------------------
def _smooth(h: int = 256, w: int = 256) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 2) % 200 + 20).astype(np.uint8)


def _with_tail(path, text: bytes, *, compression=None, tile=None, set_compression=None) -> np.ndarray:
    """A TIFF whose last strip or tile is moved to the file's end with ``text`` after it, inside
    its byte count (what a decoder never reads); optionally its Compression tag rewritten."""
    arr = _smooth()
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack", compression=compression, tile=tile)
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as t:
        p = t.pages[0]
        offs, cnts = list(p.dataoffsets), list(p.databytecounts)
        otag = p.tags["TileOffsets" if tile else "StripOffsets"]
        ctag = p.tags["TileByteCounts" if tile else "StripByteCounts"]
        comp = p.tags["Compression"]
    last = len(offs) - 1
    block = bytes(data[offs[last]:offs[last] + cnts[last]])
    new_off = len(data)
    data += block + text

    def patch(tag, i, value):
        size, fmt = {3: (2, "<H"), 4: (4, "<I"), 16: (8, "<Q")}[int(tag.dtype)]
        data[tag.valueoffset + i * size:tag.valueoffset + (i + 1) * size] = struct.pack(fmt, value)
    patch(otag, last, new_off)
    patch(ctag, last, len(block) + len(text))
    if set_compression is not None:
        patch(comp, 0, set_compression)
    path.write_bytes(bytes(data))
    return arr


@pytest.mark.parametrize("compression, tile", [(None, None), (None, (64, 64)), ("zlib", None), ("zlib", (64, 64))],
                         ids=["raw-strip", "raw-tile", "deflate-strip", "deflate-tile"])
def test_tiff_text_inside_a_blocks_byte_count_after_its_image_is_dropped(tmp_path, compression, tile):
    """A plain TIFF (a scanned form) or a one-level tiled slide whose last strip/tile byte count
    runs on past the image into the name, MRN, birth date and accession number: the strips were
    copied as they were and the leak scan does not read strip bytes (released, exit 0)."""
    src = tmp_path / "in.tif"
    arr = _with_tail(src, TEXT, compression=compression, tile=tile)
    assert TEXT in src.read_bytes() and np.array_equal(tifffile.imread(src), arr)
    res = tiff.scrub(src, tmp_path / "out.tif", ctx())
    out = res.outputs[0].read_bytes()
    assert_clean(out)
    assert np.array_equal(tifffile.imread(res.outputs[0]), arr)
    # a file without such bytes keeps every strip/tile byte for byte
    clean = tmp_path / "clean.tif"
    tifffile.imwrite(clean, arr, photometric="minisblack", compression=compression, tile=tile)
    res2 = tiff.scrub(clean, tmp_path / "clean_out.tif", ctx())
    with tifffile.TiffFile(clean) as a, tifffile.TiffFile(res2.outputs[0]) as b:
        assert list(a.pages[0].databytecounts) == list(b.pages[0].databytecounts)


def test_tiff_block_whose_image_end_cannot_be_found_is_withheld(tmp_path):
    """A tiled slide whose tiles are in a coding deidflow does not read (LZW here, the tiles' bytes
    garbage): where its image ends cannot be checked, so the file is withheld, not copied."""
    src = tmp_path / "in.tif"
    _with_tail(src, TEXT, tile=(64, 64), set_compression=5)
    with pytest.raises(FormatError, match="compression 5"):
        tiff.scrub(src, tmp_path / "out.tif", ctx())
    assert not (tmp_path / "out.tif").exists()


# ------------------------------------------------------------------------------------------------
# MINC2: HDF5 objects the attribute rules never visit
# ------------------------------------------------------------------------------------------------
def _minc2(tmp_path, plant) -> tuple:
    h5py = pytest.importorskip("h5py")
    src = tmp_path / "in.mnc"
    shutil.copy(require_shared("nibabel", "minc2_1_scale.mnc"), src)
    with h5py.File(src, "r+") as f:
        plant(f)
    return src, tmp_path / "out.mnc"


@pytest.mark.realdata
@pytest.mark.parametrize("where", ["info", "outside"])
def test_minc2_compressed_text_dataset_is_withheld(tmp_path, where):
    """A gzip-compressed dataset of text bytes (under /minc-2.0/info, or in a group of its own
    outside /minc-2.0): copied as it was, and the leak scan cannot read compressed HDF5 chunks."""
    def plant(f):
        group = f["minc-2.0/info"] if where == "info" else f.create_group("pacs")
        group.create_dataset("notes", data=np.frombuffer(TEXT * 4, np.uint8), compression="gzip", chunks=True)
    src, dst = _minc2(tmp_path, plant)
    with pytest.raises(FormatError, match="MINC2"):
        formats.get("minc2").scrub(src, dst, ctx())
    assert not dst.exists()


@pytest.mark.realdata
def test_minc2_root_attribute_is_emptied(tmp_path):
    """An attribute of the HDF5 root group ``/`` (outside /minc-2.0, whose attributes are the
    global ones): copied as it was."""
    def plant(f):
        f.attrs["export_note"] = np.bytes_(TEXT)
    src, dst = _minc2(tmp_path, plant)
    res = formats.get("minc2").scrub(src, dst, ctx())
    assert_clean(res.outputs[0].read_bytes())
    import nibabel as nib
    assert np.array_equal(np.asanyarray(nib.load(str(src)).dataobj), np.asanyarray(nib.load(str(dst)).dataobj))


# ------------------------------------------------------------------------------------------------
# JSON: identifiers as keys of objects inside kept fields
# ------------------------------------------------------------------------------------------------
def test_sidecar_keys_inside_a_kept_field_are_cleaned(tmp_path):
    """A sidecar whose kept field holds an object keyed by the name and MRN: keys were neither
    cleaned nor searched by the leak scan (which read JSON values only)."""
    src = tmp_path / "x.json"
    src.write_text(json.dumps({"EchoTime": 0.03, "DeepLearningDetails": {f"{NAME} {MRN}": "reviewed"},
                               "BodyPartDetails": {f"DOB {BIRTH}": {ACC: 1}}}))
    res = formats.get("json").scrub(src, tmp_path / "out.json", ctx())
    out = json.loads(res.outputs[0].read_text())
    assert out["EchoTime"] == 0.03
    assert "NIXON" not in json.dumps(out) and MRN not in json.dumps(out)
    # a key is a label: a birth date in one goes whoever's it is (a date the subject's identity
    # does not know); an accession number with its prefix is no generic pattern and stays
    assert BIRTH not in json.dumps(out)


def test_leak_scan_searches_json_keys(tmp_path):
    """The leak scan's JSON walk finds a value written as an object key at any depth."""
    salt = b"s" * 16
    m = leakscan.Matcher(leakscan.needles_for("sub-a", [("whole_name", "PatientName", NAME),
                                                        ("id", "PatientID", MRN)], salt))
    p = tmp_path / "sub-a_T1w.json"
    p.write_text(json.dumps({"EchoTime": 0.03, "DeepLearningDetails": {f"Nixon, Nora {MRN}": "x"}}))
    p.write_text(json.dumps({"EchoTime": 0.03, "DeepLearningDetails": {f"Nixon, Nora {MRN}": {"by": NAME}}}))
    hits = leakscan.scan_file(p, p.name, m).hits
    assert hits and all("DeepLearningDetails" in h.location for h in hits)
    # the locations (printed, listed in the restricted folder) do not show the key holding them
    assert not [h.location for h in hits if "nixon" in h.location.lower() or MRN in h.location]


# ------------------------------------------------------------------------------------------------
# MINC: text attributes of acquisition and of variables the rules do not name
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def _minc1_copy(path: Path, global_attributes: bool):
    """nibabel's minc1_1_scale.mnc opened, and a copy of it being written at ``path`` (dimensions,
    variables with their attributes and data; the global attributes when asked): (source, copy)."""
    netcdf = pytest.importorskip("scipy.io").netcdf_file
    src_nc = netcdf(str(require_shared("nibabel", "minc1_1_scale.mnc")), "r", mmap=False)
    dst = netcdf(str(path), "w", version=src_nc.version_byte)
    if global_attributes:
        for k, v in src_nc._attributes.items():
            setattr(dst, k, v)
    for name, n in src_nc.dimensions.items():
        dst.createDimension(name, n)
    for name, var in src_nc.variables.items():
        nv = dst.createVariable(name, var.typecode(), var.dimensions)
        for k, v in var._attributes.items():
            setattr(nv, k, v)
        if var.shape:
            nv[...] = var.data
    return src_nc, dst


def test_minc1_text_attributes_of_other_variables_are_swept(tmp_path):
    """A MINC1 export with the birth date in an ``acquisition`` note and the MRN and accession
    number in a variable of its own (``pacs:note``): both were kept as "technical text", and the
    leak scan knows neither (released, exit 0 end to end)."""
    src = tmp_path / "in.mnc"
    src_nc, dst = _minc1_copy(src, global_attributes=True)
    acq = dst.variables.get("acquisition") or dst.createVariable("acquisition", "i", ())
    acq.operator_note = f"DOB {BIRTH}".encode()
    dst.createVariable("pacs", "i", ()).note = f"MRN {MRN} acc {ACC[3:]}".encode()
    dst.close()
    src_nc.close()
    res = formats.get("minc1").scrub(src, tmp_path / "out.mnc", ctx())
    out = res.outputs[0].read_bytes()
    assert_clean(out)
    assert ACC[3:].encode() not in out
    import nibabel as nib
    assert np.array_equal(np.asanyarray(nib.load(str(src)).dataobj), np.asanyarray(nib.load(str(res.outputs[0])).dataobj))


@pytest.mark.realdata
def test_minc2_variable_length_text_of_other_groups_is_emptied(tmp_path):
    """A MINC2 attribute written as a variable-length string (h5py's default for ``str``) in a
    group of its own under ``info``: not "text" to the rules, so kept."""
    def plant(f):
        f["minc-2.0/info"].create_group("pacs").attrs["note"] = f"MRN {MRN} DOB {BIRTH}"
    src, dst = _minc2(tmp_path, plant)
    res = formats.get("minc2").scrub(src, dst, ctx())
    assert_clean(res.outputs[0].read_bytes())


# ------------------------------------------------------------------------------------------------
# NIfTI-1: the Analyze fields it keeps as unused room
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_nifti1_unused_analyze_fields_are_emptied(tmp_path):
    """An MRN in ``extents``/``session_error``/``regular`` (7 bytes) and a name in ``glmax``/``glmin``
    (8 bytes) of a NIfTI-1: no rule looked at them (released, exit 0, when the values are not the
    folder's)."""
    import gzip
    raw = bytearray(gzip.decompress(require_shared("nibabel", "example4d.nii.gz").read_bytes()))
    raw[32:39], raw[140:148] = MRN.encode(), b"NIXONNOR"
    src = tmp_path / "in.nii"
    src.write_bytes(bytes(raw))
    res = formats.get("nifti1").scrub(src, tmp_path / "out.nii", ctx())
    out = res.outputs[0].read_bytes()
    assert MRN.encode() not in out and b"NIXONNOR" not in out
    vox = int(struct.unpack("<f", bytes(raw[108:112]))[0])
    assert out[vox:] == bytes(raw[vox:len(out)])  # the image bytes unchanged
    assert res.identifiers["extents"] == MRN and res.identifiers["glmax"] == "NIXONNOR"
    # a NIfTI-1 with nothing there, or only the conventional regular = "r", keeps its bytes
    import nibabel as nib
    clean = tmp_path / "clean.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(clean))
    assert "extents" not in formats.get("nifti1").scrub(clean, tmp_path / "c0.nii", ctx()).actions
    clean.write_bytes(clean.read_bytes()[:38] + b"r" + clean.read_bytes()[39:])
    assert "extents" not in formats.get("nifti1").scrub(clean, tmp_path / "c.nii", ctx()).actions


# ------------------------------------------------------------------------------------------------
# PAR/REC: an export's note among the comment lines
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_parrec_comment_line_with_mrn_birth_date_and_accession_is_cleaned(tmp_path):
    """A comment line an export tool added (``# Exported for ZAPATA ELSA MRN 5455565 born
    23.04.1961 ACC9087123``): only the PAR's own patient name was removed from it; MRN, birth date
    and accession number (in no header field, so unknown to the leak scan) were released, exit 0."""
    src_par = require_shared("nibabel", "phantom_EPI_asc_CLEAR_2_1.PAR")
    lines = [".    Patient name                       :   ZAPATA ELSA\n" if ln.startswith(".    Patient name") else ln
             for ln in src_par.read_text(encoding="latin-1").splitlines(True)]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("# CLINICAL TRYOUT"))
    note = "# Exported for ZAPATA ELSA MRN 5455565 born 23.04.1961 ACC9087123\n"
    src = tmp_path / "in.PAR"
    src.write_text("".join(lines[:at + 1] + [note] + lines[at + 1:]), encoding="latin-1")
    shutil.copy(src_par.with_suffix(".REC"), tmp_path / "in.REC")
    res = formats.get("parrec").scrub(src, tmp_path / "out.par", ctx())
    out = res.outputs[0].read_text(encoding="latin-1")
    assert not [v for v in ("ZAPATA", "5455565", "23.04.1961", "1961") if v in out]
    # Philips' own comment lines are unchanged
    original = [ln for ln in src_par.read_text(encoding="latin-1").splitlines() if ln.startswith("#")
                and "dataset name" not in ln.lower()]
    assert [ln for ln in out.splitlines() if ln.startswith("#") and ln in original] == original


# ------------------------------------------------------------------------------------------------
# Siemens twix: bytes no reader reads
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_twix_bytes_outside_the_measurements_are_zeroed(tmp_path):
    """Text in the raid directory's unused room, after the last measurement and after the raid
    entry's (masked) patient name inside its 64-byte field: the file was copied as it was and only
    header buffers were rewritten (the leak scan reads these bytes, but knows only the header's
    values: an accession number or birth date found nowhere else was released, exit 0)."""
    from deidflow.formats import twix
    raw = bytearray(require_shared("twix", "example_data", "gre.dat").read_bytes())
    note = b"ACC7766554 DOB 19520101 NIXON^NORA"
    _, meas, size = twix._read_layout(require_shared("twix", "example_data", "gre.dat"))
    gap = 8 + len(meas) * twix.RAID_ENTRY + 100
    raw[gap:gap + len(note)] = note
    raw[size - 100:size - 100 + len(note)] = note
    name_field = meas[0].entry_offset + 24
    masked = bytes(raw[name_field:name_field + 64]).split(b"\x00", 1)[0]
    raw[name_field + len(masked) + 1:name_field + len(masked) + 1 + 20] = b"6655443 QUIST^BERTA "
    src = tmp_path / "meas.dat"
    src.write_bytes(bytes(raw))
    res = twix.scrub(src, tmp_path / "out.dat", ctx())
    out = res.outputs[0].read_bytes()
    assert not [v for v in (b"ACC7766554", b"19520101", b"NIXON", b"6655443", b"QUIST") if v in out]
    assert len(out) == len(raw)
    for m in meas:  # the raw data stream byte for byte
        a = m.offset + m.hdr_len
        assert out[a:m.data_end] == bytes(raw[a:m.data_end])
    # the real file has nothing there: its bytes outside the headers are unchanged
    real = require_shared("twix", "example_data", "gre.dat")
    assert "bytes outside the measurements" not in twix.scrub(real, tmp_path / "real.dat", ctx()).actions


@pytest.mark.realdata
def test_minc1_text_variable_is_withheld(tmp_path):
    """A MINC1 char variable of its own holding an export's note: its data were copied as they were
    (the attribute rules read the header only; the leak scan knows only the header's values)."""
    src = tmp_path / "in.mnc"
    src_nc, dst = _minc1_copy(src, global_attributes=False)
    dst.createDimension("note_len", len(TEXT))
    dst.createVariable("notes", "c", ("note_len",))[:] = np.frombuffer(TEXT, "S1")
    dst.close()
    src_nc.close()
    assert TEXT in src.read_bytes()
    with pytest.raises(FormatError, match="MINC1"):
        formats.get("minc1").scrub(src, tmp_path / "out.mnc", ctx())
    assert not (tmp_path / "out.mnc").exists()


# ------------------------------------------------------------------------------------------------
# Names in other encodings in cleaned fixed-size fields (a false withholding before)
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("encoding", ["utf-16-le", "nfd", "utf-8", "latin-1"])
def test_nifti_descrip_name_in_another_encoding_is_cleaned(tmp_path, encoding):
    """With ``clean_descriptors`` (research preset) a NIfTI ``descrip`` holding the subject's name
    in UTF-16 or decomposed UTF-8 was cleaned as Latin-1 text, so the name stayed; the leak scan
    found it and withheld the subject. The field's bytes are now cleaned as the leak scan reads
    them."""
    import gzip
    import unicodedata
    text = "Jörg Müller"
    value = (unicodedata.normalize("NFD", text).encode() if encoding == "nfd" else text.encode(encoding))
    raw = bytearray(gzip.decompress(require_shared("nibabel", "example4d.nii.gz").read_bytes()))
    raw[148:228] = (value + bytes(80))[:80]
    src = tmp_path / "in.nii"
    src.write_bytes(bytes(raw))
    c = ScrubContext(subject="sub-tstsubj1", pseudo=Pseudonymizer(KEY), settings={"options": ["clean_descriptors"]},
                     known=["MÜLLER^JÖRG"])
    res = formats.get("nifti1").scrub(src, tmp_path / "out.nii", c)
    out = res.outputs[0].read_bytes()
    salt = b"s" * 16
    m = leakscan.Matcher(leakscan.needles_for("sub-tstsubj1", [("whole_name", "PatientName", "MÜLLER^JÖRG")], salt))
    assert not leakscan.scan_file(res.outputs[0], "x.nii", m).hits
    assert out[148:228].count(b"*") >= 6  # cleaned in place, not emptied


def test_minc_sweep_keeps_an_embedded_transform_s_numbers():
    """The sweep of technical MINC text keeps decimal numbers (nibabel's real MINC2 carries an MNI
    transform file in ``processing:transformation0-filedata``; the generic digit patterns turned
    its matrix into asterisks) and still removes dates and IDs around them."""
    from deidflow.formats.minc import new_text
    from deidflow.formats.base import ScrubResult
    text = (b"MNI Transform File\n% from NIXON^NORA 19610423\nLinear_Transform =\n"
            b" 0.889465691006146 0.453212845901488 0.0587273431446749 -7.16717377411551\n"
            b" -0.211846073332241 0.522763394845027 -8.25735838040117e-01 18.5100653515013;\n")
    new = new_text("sweep", text, ctx(), ScrubResult(), "processing:transformation0-filedata")
    assert new is not None and len(new) == len(text)
    assert b"NIXON" not in new and BIRTH.encode() not in new
    assert new.split(b"=\n", 1)[1] == text.split(b"=\n", 1)[1]  # the matrix byte for byte
