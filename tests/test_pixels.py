"""Clean Pixel Data: selection, identifier matching, in-place blanking, write-back (no real data)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from deidflow.pixels import identify, ink, layout, policy
from deidflow.pixels.pixeldata import Frames, check_consistency


def facts(**kw) -> policy.HeaderFacts:
    return policy.HeaderFacts(**kw)


@pytest.mark.parametrize("h, mode, action", [
    (facts(modality="US"), "auto", "clean"),
    (facts(modality="US", burned_in="NO"), "auto", "skip"),
    (facts(modality="CT"), "auto", "skip"),
    (facts(modality="CT", burned_in="YES"), "auto", "clean"),
    (facts(modality="CT"), "always", "clean"),
    (facts(modality="US"), "off", "skip"),
    (facts(modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7"), "auto", "clean"),
    (facts(modality="DX", image_type=("DERIVED", "SECONDARY")), "auto", "clean"),
    (facts(modality="DX", image_type=("ORIGINAL", "PRIMARY")), "auto", "skip"),
    (facts(modality="SM", sop_class=policy.WSI_CLASS, image_type=("ORIGINAL", "PRIMARY", "LABEL")), "auto", "wsi_label"),
    (facts(modality="SM", sop_class=policy.WSI_CLASS, image_type=("ORIGINAL", "PRIMARY", "OVERVIEW")), "auto", "wsi_overview"),
    (facts(modality="SM", sop_class=policy.WSI_CLASS, image_type=("ORIGINAL", "PRIMARY", "VOLUME")), "always", "skip"),
    # a whole-slide image that says its pixels show the label: one frame cleaned, tiles withheld
    (facts(modality="SM", sop_class=policy.WSI_CLASS, image_type=("ORIGINAL", "PRIMARY", "VOLUME"), frames=64,
           label_in_image="YES"), "auto", "withhold"),
    (facts(modality="SM", sop_class=policy.WSI_CLASS, image_type=("ORIGINAL", "PRIMARY", "THUMBNAIL"),
           burned_in="YES"), "auto", "clean"),
    (facts(modality="SM", sop_class=policy.WSI_CLASS, image_type=("ORIGINAL", "PRIMARY", "VOLUME"), frames=64,
           label_in_image="NO"), "auto", "skip"),
])
def test_selection_policy(h, mode, action):
    assert policy.decide(h, mode, policy.load_policy()).action == action


def test_region_rules_match_device_and_size():
    regions = policy.load_regions()
    h = facts(manufacturer="ALOKA CO., LTD.", model="SSD-4000", rows=480, columns=640)
    assert [r.box for r in policy.regions_for(h, regions)] == [(0, 0, 640, 28)]
    assert policy.regions_for(facts(manufacturer="ALOKA CO., LTD.", model="SSD-4000", rows=600, columns=800), regions) == []


def test_bad_selection_table_is_refused(tmp_path):
    bad = tmp_path / "sel.tsv"
    bad.write_text("modality\tsop_class\timage_type\tburned_in\taction\twhy\nUS\t*\t*\t*\tblur\tno\n")
    with pytest.raises(policy.PolicyError, match="action"):
        policy.load_policy(str(bad))


IDS = identify.Identifiers.from_values(names=["KAUFMAN^SCOTT", "Francis, Todd and Boyer Medical Center"],
                                       ids=["6774825273"], dates=["19430722", "20130911"], age="070Y")


@pytest.mark.parametrize("text, rule", [
    ("Patient 1D:6774825273", "patient:identifier"),     # OCR read I as 1
    ("Name: KAUFMANSCOTT", "patient:identifier"),
    ("Name: KAUFNAN", "patient:identifier"),             # one OCR error in a long part
    ("D0B:07/22/1943", "patient:identifier"),
    ("Study Date:2013Sep11", "patient:identifier"),
    ("DOB 1943 JUL 22", "patient:identifier"),            # year first, month by name
    ("DOB 22-JUL-43", "patient:identifier"),
    ("Age: 70", "patient:age"),
    ("11-05-25-142825", "generic:date"),
    ("24-MAY-02", "generic:date"),
    ("2:56:22 PM", "generic:time"),
    ("MRN 1234567", "generic:digits"),
    ("L", None), ("R", None), ("1.06 cm", None), ("Gn 60", None), ("C5-1", None), ("TIS<0.4 MI=0.8", None),
])
def test_identifiers_only_matching(text, rule):
    assert identify.match(text, IDS) == rule


def test_blocks_merge_lines_of_one_annotation_only():
    lines = [(10, 10, 100, 20), (10, 22, 80, 32), (10, 34, 120, 44), (300, 300, 340, 310)]
    assert layout.blocks(lines) == [(10, 10, 120, 44), (300, 300, 340, 310)]


def _ds(arr: np.ndarray, photometric: str, planar: int | None = None, signed: bool = False) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.7", uid, "OT"
    frames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if arr.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = 12 if ds.BitsAllocated == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    data = arr
    if arr.ndim == 4:
        ds.PlanarConfiguration = planar or 0
        if planar == 1:
            data = arr.transpose(0, 3, 1, 2)
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    return ds


def test_native_blanking_changes_only_the_box_bytes():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 4096, (2, 40, 50), dtype=np.uint16)
    arr[0, 5:9, 5:15] = 0  # black already inside the box: the fill must still change every pixel
    arr |= 0x8000  # bits above BitsStored (e.g. an old overlay plane) must survive outside the box
    ds = _ds(arr, "MONOCHROME2")
    original = bytes(ds.PixelData)
    f = Frames(ds)
    assert f.native
    f.fill(0, (4, 4, 20, 10))
    f.write_back()
    out = np.frombuffer(ds.PixelData, np.uint16).reshape(arr.shape)
    changed = out != arr
    assert changed[0, 4:10, 4:20].all()
    changed[0, 4:10, 4:20] = False
    assert not changed.any()
    assert len(ds.PixelData) == len(original)
    assert len(np.unique(out[0, 4:10, 4:20])) == 1
    assert check_consistency(ds) == []


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configurations_are_edited_in_place(planar):
    arr = np.full((1, 30, 30, 3), 200, np.uint8)
    arr[0, 10:20, 10:20] = (0, 0, 0)
    ds = _ds(arr, "RGB", planar)
    f = Frames(ds)
    f.fill(0, (8, 8, 22, 22))
    f.write_back()
    got = np.frombuffer(ds.PixelData, np.uint8)
    got = got.reshape(1, 3, 30, 30).transpose(0, 2, 3, 1) if planar == 1 else got.reshape(arr.shape)
    assert (got[0, 8:22, 8:22] != arr[0, 8:22, 8:22]).any(axis=-1).all()
    assert (got[0, :8] == arr[0, :8]).all() and (got[0, 22:] == arr[0, 22:]).all()
    assert ds.PlanarConfiguration == planar


def test_compressed_input_is_written_back_losslessly(tmp_path):
    arr = (np.arange(1 * 32 * 48 * 3) % 251).astype(np.uint8).reshape(1, 32, 48, 3)
    ds = _ds(arr, "RGB", 0)
    ds.compress(RLELossless, generate_instance_uid=False)
    uid = ds.SOPInstanceUID
    f = Frames(ds)
    assert not f.native
    f.fill(0, (0, 0, 10, 10))
    assert f.write_back() == RLELossless
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "x.dcm")
    assert back.SOPInstanceUID == uid and back.PhotometricInterpretation == "RGB"
    px = back.pixel_array
    assert (px[10:, 10:] == arr[0, 10:, 10:]).all()
    assert (px[:10, :10] != arr[0, :10, :10]).any(axis=-1).all()
    assert check_consistency(back) == []


def _text_frame(background: np.ndarray, lines: list[tuple[int, str]], fill: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont
    img = Image.fromarray(background)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    for y, text in lines:
        d.text((20, y), text, fill=fill, font=font)
    return np.asarray(img).astype(np.int16) * 4  # the 0..1023 scale of render.normalized


def _ink_rows(frame: np.ndarray, box, level: int) -> tuple[int, int]:
    x0, y0, x1, y1 = box
    rows = np.flatnonzero((frame[y0:y1, x0:x1] == level).any(axis=1))
    return y0 + rows[0], y0 + rows[-1] + 1


@pytest.mark.parametrize("background, fill", [(0, 255), (255, 0)])
def test_ink_rows_cut_a_box_to_its_text_line(background, fill):
    frame = _text_frame(np.full((80, 300), background, np.uint8), [(30, "Patient ID: 6774825273 jg")], fill)
    box = (10, 18, 290, 58)  # a detector's box: about half a line height above and below
    top, bottom = _ink_rows(frame, box, fill * 4)
    (cut,) = ink.text_rows(frame, box)
    assert cut[0] == box[0] and cut[2] == box[2]  # never cut horizontally
    assert cut[1] < top and cut[3] > bottom  # every row with ink stays inside, with a margin
    assert cut[1] > box[1] and cut[3] < box[3]  # and the empty rows go
    assert layout.area(cut) <= 0.7 * layout.area(box)


def test_ink_rows_keep_the_box_when_it_is_not_clear():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (80, 300), dtype=np.uint8)  # texture at every level
    frame = _text_frame(noise, [(30, "DOE^JANE 19610312")], 255)
    box = (10, 18, 290, 58)
    assert ink.text_rows(frame, box) == [box]
    # only a neighbouring line cut by the box's edge: not this box's text
    frame = _text_frame(np.zeros((80, 300), np.uint8), [(8, "ABCDEFGH 12345")], 255)
    box = (10, 16, 290, 60)
    assert ink.text_rows(frame, box) == [box]
    flat = np.zeros((40, 40), np.int16)
    assert ink.text_rows(flat, (5, 5, 30, 30)) == [(5, 5, 30, 30)]


def test_ink_rows_two_lines_in_one_box():
    frame = _text_frame(np.zeros((120, 300), np.uint8), [(30, "Name: DOE JANE"), (60, "DOB 03/12/1961")], 255)
    box = (10, 18, 290, 92)
    cuts = ink.text_rows(frame, box)
    for y in (30, 60):
        top, bottom = _ink_rows(frame, (10, y - 4, 290, y + 24), 1020)
        assert any(c[1] < top and c[3] > bottom for c in cuts)
    assert sum(layout.area(c) for c in cuts) < layout.area(box)


def test_selection_key_of_a_decoded_data_set_is_hashable():
    """A deflated file is read whole by pydicom, so its selection values arrive decoded (ImageType
    as a MultiValue): the per-series decision cache must still take them as a key."""
    from pydicom.dataset import Dataset

    from deidflow.pixels.policy import raw_key
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    ds.Modality = "MR"
    key = raw_key(ds, (0x00080008, 0x00080060, 0x00280301))
    assert hash(key) and key[0] == ("ORIGINAL", "PRIMARY", "M")
