"""TIFF whole-slide images (deidflow.formats.tiff): an Aperio-SVS-like slide, a generic pyramid (pages
and SubIFDs) and a plain TIFF stack, made with tifffile with identifiers planted in the description,
the tags, the label's pixels and the macro's JPEG comment.  The output holds none of them, has no
label or macro page, keeps every level's strip/tile bytes byte-identical, and reads back with
tifffile (and openslide, when installed) as the same pyramid.  Damaged files are refused."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from deidflow import formats, inventory
from deidflow.formats import tiff
from deidflow.formats.base import FormatError, ScrubContext
from deidflow.pseudonym import Pseudonymizer, patient_key

from . import tiff_samples as ts
from .conftest import TEST_KEY

tifffile = pytest.importorskip("tifffile")

KEY = b"tiff-test-key-0123456789"


def svs_meta(description: str) -> dict:
    """tifffile's parse of an Aperio description."""
    return tifffile.tifffile.svs_description_metadata(description)


def ctx(options=(), offset=-100):
    return ScrubContext(subject="sub-tstsubj1", pseudo=Pseudonymizer(KEY), date_offset=offset,
                        settings={"options": list(options)}, known=[ts.PATIENT])


def assert_no_planted(path: Path, planted=ts.PLANTED) -> None:
    blob = path.read_bytes()
    low = blob.lower()
    left = [v for v in planted if v.encode().lower() in low]
    assert not left, f"planted values survived: {left}"


def raw_segments(path: Path, page) -> list[bytes]:
    with open(path, "rb") as fh:
        out = []
        for off, n in zip(page.dataoffsets, page.databytecounts):
            fh.seek(off)
            out.append(fh.read(n))
        return out


def level_pages(path: Path) -> list:
    with tifffile.TiffFile(path) as tf:
        return [(lvl.shape, [p.index for p in lvl.pages]) for lvl in tf.series[0].levels]


def assert_levels_identical(src: Path, out: Path, decode: bool) -> None:
    """Same levels (shapes) in the first series; each level's raw segments byte-identical and, when
    tifffile can decode them, the arrays equal."""
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(out) as b:
        la, lb = a.series[0].levels, b.series[0].levels
        assert [lv.shape for lv in la] == [lv.shape for lv in lb]
        for x, y in zip(la, lb):
            for pa, pb in zip(x.pages, y.pages):
                assert raw_segments(src, pa) == raw_segments(out, pb)
                assert pa.is_tiled == pb.is_tiled and pa.compression == pb.compression
            if decode:
                assert np.array_equal(x.asarray(), y.asarray())


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec, bigtiff, byteorder", [("jpeg", False, "<"), ("zlib", True, ">")])
def test_svs_label_macro_removed_tags_scrubbed_levels_identical(codec, bigtiff, byteorder, tmp_path):
    src = ts.make_svs(tmp_path / "slide.svs", codec=codec, bigtiff=bigtiff, byteorder=byteorder)
    blob = src.read_bytes()
    assert all(v.encode() in blob for v in ("PLANTLABELTEXT", "MACRO-S19-4711", "jdoe-plant-user", "PLANTXMP"))
    out = tmp_path / "out.svs"
    res = formats.get("tiff").scrub(src, out, ctx())
    assert res.outputs == [out]
    assert_no_planted(out)
    assert res.actions["page 4 (label)"] == "removed" and res.actions["page 5 (macro)"] == "removed"
    assert {"Aperio Filename", "Aperio User", "Aperio ScanScope ID", "Aperio Barcode", "Artist",
            "HostComputer"} <= set(res.identifiers)  # handed to the leak scan
    assert res.identifiers["Aperio Patient"] == ts.PATIENT
    with tifffile.TiffFile(out) as tf:
        assert tf.is_svs and tf.byteorder == byteorder and tf.is_bigtiff == bigtiff
        assert [s.name for s in tf.series] == ["Baseline", "Thumbnail"]
        meta = svs_meta(tf.pages[0].description)
        assert meta["AppMag"] == 20 and meta["MPP"] == pytest.approx(0.499)
        assert not {"Filename", "User", "ScanScope ID", "Date", "Time", "Barcode", "Patient"} & set(meta)
        for page in tf.pages:
            assert not {"Artist", "HostComputer", "DocumentName", "PageName", "DateTime", "XMP"} & set(page.tags.keys())
            assert all(t.code < 32768 or t.code == 34675 for t in page.tags.values())
    assert_levels_identical(src, out, decode=codec == "zlib")
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(out) as b:  # the thumbnail, too
        assert raw_segments(src, a.series[1].pages[0]) == raw_segments(out, b.series[1].pages[0])
    if codec == "jpeg":  # the JPEG tiles decode (Pillow) to the same pixels
        import io

        from PIL import Image
        with tifffile.TiffFile(out) as b:
            tile = raw_segments(out, b.pages[0])[1]
        assert np.asarray(Image.open(io.BytesIO(tile))).shape == (256, 256, 3)
    # same key, same input: same bytes
    again = tmp_path / "again.svs"
    formats.get("tiff").scrub(src, again, ctx())
    assert again.read_bytes() == out.read_bytes()


def test_svs_reads_in_openslide_as_the_same_pyramid(tmp_path):
    openslide = pytest.importorskip("openslide")
    src = ts.make_svs(tmp_path / "slide.svs")
    out = tmp_path / "out.svs"
    tiff.scrub(src, out, ctx())
    a, b = openslide.OpenSlide(str(src)), openslide.OpenSlide(str(out))
    assert b.properties["openslide.vendor"] == "aperio"
    assert a.level_dimensions == b.level_dimensions and a.level_count == b.level_count == 3
    assert set(a.associated_images) == {"label", "macro", "thumbnail"}
    assert set(b.associated_images) == {"thumbnail"}
    for level, (w, h) in enumerate(b.level_dimensions):
        assert np.array_equal(np.asarray(a.read_region((0, 0), level, (w, h))),
                              np.asarray(b.read_region((0, 0), level, (w, h))))
    props = "\n".join(f"{k}={v}" for k, v in b.properties.items()).lower()
    assert not [v for v in ts.PLANTED if v.lower() in props]
    assert b.properties["aperio.AppMag"] == "20" and b.properties["openslide.mpp-x"] == a.properties["openslide.mpp-x"]


def test_svs_dates_follow_the_date_options(tmp_path):
    src = ts.make_svs(tmp_path / "slide.svs", size=(256, 256))
    for options, date in ((["retain_long_modified_dates"], "12/04/18"), (["retain_long_full_dates"], "03/14/19")):
        out = tmp_path / f"{options[0]}.svs"
        res = tiff.scrub(src, out, ctx(options, offset=-100))
        meta = svs_meta(tifffile.TiffFile(out).pages[0].description)
        assert meta["Date"] == date and meta["Time"] == "09:59:15" and "Time Zone" not in meta
        assert res.actions["ImageDescription: Date"] == ("shifted" if "modified" in options[0] else "kept")


def test_identity_from_the_aperio_description(tmp_path):
    src = ts.make_svs(tmp_path / "slide.svs", size=(256, 256))
    assert tiff.identity(src) == {"patient_id": ts.PATIENT, "study_date": "20190314"}
    plain = ts.make_plain(tmp_path / "plain.tif")
    assert tiff.identity(plain) == {}
    assert tiff.extension(src) == ".svs" and tiff.extension(tmp_path / "x.TIF") == ".tif"
    assert tiff.extension(tmp_path / "x.slide") == ".tif"


@pytest.mark.parametrize("subifds", [False, True])
def test_generic_pyramid_label_removed_levels_identical(subifds, tmp_path):
    src = ts.make_generic_pyramid(tmp_path / "pyr.tif", subifds=subifds)
    out = tmp_path / "out.tif"
    res = tiff.scrub(src, out, ctx())
    assert_no_planted(out)
    assert any(k.endswith("(label)") for k in res.actions) and res.actions["ImageDescription"] == "removed"
    assert_levels_identical(src, out, decode=True)
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(out) as b:
        assert len(a.series) == 2 and len(b.series) == 1  # the label series is gone
        assert len(b.series[0].levels) == 3
        assert "vips" in b.pages[0].software and "PLANTHOST" not in b.pages[0].software


def test_plain_tiff_tags_scrubbed_pixels_kept(tmp_path):
    src = ts.make_plain(tmp_path / "stack.tif")
    out = tmp_path / "out.tif"
    res = tiff.scrub(src, out, ctx())
    assert_no_planted(out)
    assert res.actions["ImageDescription"] == "cleaned"
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(out) as b:
        assert len(b.pages) == 2 and b.is_imagej
        assert b.imagej_metadata["images"] == 2 and b.imagej_metadata["spacing"] == 2.5
        assert "info" not in b.imagej_metadata
        assert np.array_equal(a.asarray(), b.asarray())
        for pa, pb in zip(a.pages, b.pages):
            assert raw_segments(src, pa) == raw_segments(out, pb)


def _ifd0(data: bytes) -> int:
    return struct.unpack("<I", data[4:8])[0]


def test_damaged_tiffs_are_refused_with_a_reason(tmp_path):
    good = ts.make_svs(tmp_path / "slide.svs", size=(256, 512)).read_bytes()
    cases = {
        "truncated": good[: len(good) // 3],
        "bad header": b"II*\x00" + b"\xff\xff\xff\x7f" + good[8:200],
        "loop": None,
        "empty ifd": b"II*\x00\x08\x00\x00\x00\x00\x00" + bytes(8),
        "not tiff": b"II+\x00" + bytes(30),
    }
    loop = bytearray(good)
    first = _ifd0(good)
    n = struct.unpack("<H", good[first:first + 2])[0]
    loop[first + 2 + 12 * n:first + 6 + 12 * n] = struct.pack("<I", first)  # next IFD: itself
    cases["loop"] = bytes(loop)
    for name, data in cases.items():
        src = tmp_path / f"{name.replace(' ', '_')}.tif"
        src.write_bytes(data)
        out = tmp_path / f"{name.replace(' ', '_')}.out.tif"
        with pytest.raises(FormatError) as err:
            tiff.identity(src)
            tiff.scrub(src, out, ctx())
        msg = str(err.value)
        assert msg and "\n" not in msg and ts.PATIENT not in msg, (name, msg)
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_inventory_and_other_stage_release_the_slide(tmp_path, key_env):
    from deidflow.formats.stage import release_unit
    inp = tmp_path / "in"
    (inp / "site_PLANTPATIENT42").mkdir(parents=True)
    slide = ts.make_svs(inp / "site_PLANTPATIENT42" / "S19-4711-PLANTFILE.svs", size=(256, 512))
    (inp / "site_PLANTPATIENT42" / "cut.tif").write_bytes(slide.read_bytes()[:3000])
    ts.make_plain(inp / "stack_plantdoc.tif")
    pseudo = Pseudonymizer(TEST_KEY.encode())
    inv = inventory.build(inp, pseudo)
    rows = {r["relpath"]: r for r in inv.rows}
    svs = rows["site_PLANTPATIENT42/S19-4711-PLANTFILE.svs"]
    assert svs["status"] == "ok" and svs["release_dir"] == "sourcedata/tiff" and svs["out_relpath"].endswith(".svs")
    assert svs["subject"] == pseudo.subject(patient_key(ts.PATIENT, ""), ts.PATIENT)  # from the description
    assert rows["stack_plantdoc.tif"]["status"] == "ok"
    cut = rows["site_PLANTPATIENT42/cut.tif"]
    assert cut["status"] == "quarantine" and cut["reason"].startswith("tiff: ")
    restricted = tmp_path / "restricted"
    restricted.mkdir(mode=0o700)
    inventory.write(inv, restricted)
    release = tmp_path / "release"
    settings = {"options": [], "pseudonym_length": 8, "date_offset_days": [-365, -1], "mapping_csv": ""}
    for unit in inv.subjects:
        release_unit(restricted / "manifests" / f"{unit}.json", release, restricted, restricted / "done" / f"{unit}.json",
                     restricted / "q" / f"{unit}.jsonl", settings)
    released = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    assert len(released) == 2 and all(p.startswith("sourcedata/tiff/sub-") for p in released)
    assert any(p.endswith(".svs") for p in released)
    for p in released:
        assert "PLANT" not in p.upper() and "S19" not in p
        assert_no_planted(release / p)
    out = release / next(p for p in released if p.endswith(".svs"))
    assert_levels_identical(slide, out, decode=False)
    audit = [json.loads(line) for f in (restricted / "audit").glob("other-*.jsonl") for line in f.read_text().splitlines()]
    assert {a["format"] for a in audit} == {"tiff"}
    assert "PLANTPATIENT42" not in json.dumps(audit)


@pytest.mark.parametrize("layout", ["gray", "rgb", "stack"])
def test_plain_tiff_with_burned_in_text_is_withheld(tmp_path, layout):
    """A plain TIFF whose pixels show a name, an MRN and a birth date (a scanned request form, a
    screenshot, a photographed label; red-team 3): its tags were scrubbed and its pixels released
    as they were, text and all.  Plain TIFF pages are screened for text (every page of a short
    stack, a spread sample of a long one) and a page with text withholds the file with a reason;
    the noise stack without text is still released (test above)."""
    from PIL import Image, ImageDraw, ImageFont
    img = Image.new("L", (400, 300), 20)
    draw = ImageDraw.Draw(img)
    draw.ellipse((100, 60, 300, 260), fill=120)
    draw.text((10, 10), "DOE JANE MRN 5566778 01/02/1960", fill=255, font=ImageFont.load_default(size=14))
    page = np.asarray(img)
    src = tmp_path / "scan.tif"
    if layout == "rgb":
        tifffile.imwrite(src, np.repeat(page[:, :, None], 3, axis=2), photometric="rgb")
    elif layout == "stack":   # text on one page of twelve
        pages = np.stack([np.where(np.arange(400)[None, :] > -1, 20, 0).astype(np.uint8).repeat(300, 0)] * 12)
        pages[11] = page
        tifffile.imwrite(src, pages, photometric="minisblack")
    else:
        tifffile.imwrite(src, page, photometric="minisblack", compression="zlib")
    with pytest.raises(FormatError, match="shows text"):
        tiff.scrub(src, tmp_path / "out.tif", ctx())
    assert not (tmp_path / "out.tif").exists()


def test_plain_tiff_stack_with_text_on_an_unsampled_page_is_withheld(tmp_path):
    """A scanned form slipped into a long plain TIFF stack on a page the spread sample skips (page 7
    of 20; red-team 3: released before).  The pages now go through the series screen: a page
    whose statistics stand out is looked at too."""
    from PIL import Image, ImageDraw, ImageFont
    from deidflow.pixels.screen import sample
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:300, :400]
    pages = np.stack([np.clip(rng.normal(30, 8, (300, 400)) + 90 * (((yy - 150) / (80 + 3 * i)) ** 2
                                                                     + ((xx - 200) / 120) ** 2 <= 1), 0, 255)
                      for i in range(20)]).astype(np.uint8)
    assert 7 not in sample(20)
    form = Image.new("L", (400, 300), 235)
    ImageDraw.Draw(form).text((10, 10), "DOE JANE MRN 5566778", fill=10, font=ImageFont.load_default(size=14))
    clean = tmp_path / "clean.tif"
    tifffile.imwrite(clean, pages, photometric="minisblack")
    pages[7] = np.asarray(form)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, pages, photometric="minisblack")
    with pytest.raises(FormatError, match="page 7 shows text"):
        tiff.scrub(src, tmp_path / "out.tif", ctx())
    tiff.scrub(clean, tmp_path / "clean-out.tif", ctx())  # released
