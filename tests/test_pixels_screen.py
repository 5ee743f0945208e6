"""pixels.clean: auto screens every image series for burned-in text (synthetic series, the real
OCR models); the facts file; the pixel leak check on a series whose cleaning was switched off."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from deidflow.pixels import screen
from deidflow.pixels.clean import PixelCleaner
from deidflow.pixels.leakcheck import facts_path, files_to_check, identifier_finder, pixel_hits
from deidflow.pixels.qc import SubjectPixelsQC
from deidflow.pixels.subject import SubjectPixels
from deidflow.qc.leakscan import Matcher, needles_for

pytest.importorskip("rapidocr_onnxruntime")
NAME = "HARTMANN^GISELA"


def anatomy(n: int, size: int = 192, seed: int = 0) -> np.ndarray:
    """``n`` MR-like slices: an ellipse whose size and brightness change smoothly, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size), np.uint16)
    for i in range(n):
        r = size * (0.25 + 0.15 * np.sin(np.pi * (i + 1) / (n + 1)))
        inside = ((yy - size / 2) / r) ** 2 + ((xx - size / 2) / (0.8 * r)) ** 2 <= 1
        img = rng.normal(40, 12, (size, size)) + inside * (600 + 300 * np.cos(xx / 9.0 + i) * np.sin(yy / 13.0))
        out[i] = np.clip(img, 0, 4095)
    return out


def burn(frame: np.ndarray, text: str, xy=(6, 4), value: int | None = None) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont
    mask = Image.new("L", (frame.shape[1], frame.shape[0]), 0)
    ImageDraw.Draw(mask).text(xy, text, fill=255, font=ImageFont.load_default(size=14))
    out = frame.copy()
    out[np.asarray(mask) > 127] = int(frame.max()) if value is None else value
    return out


def write_series(folder: Path, frames: np.ndarray, series_uid: str | None = None) -> list[tuple[Path, Dataset]]:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    out = []
    for i, f in enumerate(frames, 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", series_uid, i
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.Rows, ds.Columns = f.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.ascontiguousarray(f, "<u2").tobytes()
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append((p, pydicom.dcmread(p, stop_before_pixels=True)))
    return out


def run_series(series: dict[str, list[tuple[Path, Dataset]]], restricted: Path, settings: dict) -> tuple[dict, list]:
    """The dicom job's pixel step over staged files (``series``: name -> files), as _subject runs it."""
    cleaner = PixelCleaner(settings, thumbnails=True)
    sp = SubjectPixels(cleaner, "sub-T", SubjectPixelsQC("sub-T"), prefix="sourcedata/dicom")
    entries = []
    for name, files in series.items():
        for i, (path, header) in enumerate(files, 1):
            entry = {"file": f"sub-T/ses-1/{name}/{i:04d}.dcm"}
            entries.append(entry)
            sp.add(str(path), entry["file"], path, header, entry)
    bad = sp.finish(restricted)
    assert bad == []
    return json.loads(facts_path(restricted, "sub-T").read_text()), entries


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
def test_sample_covers_small_series_and_spreads_over_long_ones():
    assert screen.sample(5) == [0, 1, 2, 3, 4]
    assert screen.sample(8) == list(range(8))
    s = screen.sample(35)
    assert s[0] == 0 and s[-1] == 34 and 17 in s and 5 <= len(s) <= 6


def test_outliers_find_a_key_image_not_the_smooth_anatomy():
    frames = list(anatomy(30))
    base = [screen.stats(f) for f in frames]
    assert screen.outliers(base) == []  # ends of the volume (little anatomy) are not outliers
    key = np.full_like(frames[0], 50)
    key[20:60, 20:180] = 4095  # a screen capture: flat panels, text
    frames[12] = key
    assert 12 in screen.outliers([screen.stats(f) for f in frames])
    small = frames[:]
    small[7] = frames[7][:96, :96]  # another size
    assert 7 in screen.outliers([screen.stats(f) for f in small])


def test_constant_edges_mark_text_burned_into_every_frame():
    frames = anatomy(5)
    assert screen.constant_edges(list(frames)).sum() < screen.MIN_CONSTANT_EDGES
    burned = [burn(f, "ID 4711", value=4095) for f in frames]
    ce = screen.constant_edges(burned)
    assert ce.sum() >= screen.MIN_CONSTANT_EDGES
    x0, y0, x1, y1 = screen.bounding(ce, 0)
    assert y1 <= 30 and x0 <= 10  # where the text is


def test_clean_series_is_screened_and_left_bit_identical(tmp_path):
    files = write_series(tmp_path / "s1", anatomy(24))
    before = [digest(p) for p, _ in files]
    fact, entries = run_series({"MR001-x": files}, tmp_path / "restricted", {"clean": "auto"})
    (s,) = fact["series"]
    assert s["text_found"] is False and s["decision"] == "kept" and s["boxes"] == 0
    assert s["frames"] == 24 and s["sampled_frames"] >= 5
    assert [digest(p) for p, _ in files] == before
    assert all(e["pixels"]["action"] == "screened" for e in entries)
    assert (facts_path(tmp_path / "restricted", "sub-T").stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("n", [3, 20])
def test_series_with_burned_in_text_is_cleaned_whole(tmp_path, n):
    frames = np.stack([burn(f, f"{NAME.replace('^', ' ')} 12.03.1961") for f in anatomy(n, seed=n)])
    files = write_series(tmp_path / "s", frames)
    clean_files = write_series(tmp_path / "c", anatomy(n, seed=99))
    before = [digest(p) for p, _ in clean_files]
    fact, entries = run_series({"MR001-t": files, "MR002-c": clean_files}, tmp_path / "r", {"clean": "auto"})
    text, clean = fact["series"]
    assert text["text_found"] is True and text["decision"] == "cleaned" and text["files_cleaned"] == n
    assert text["boxes"] >= n and len(text["check"]) == n and text["thumbnails"]
    assert clean["text_found"] is False and [digest(p) for p, _ in clean_files] == before
    for (p, _), f in zip(files, frames):
        after = pydicom.dcmread(p).pixel_array
        assert (after[:24, :150] != f[:24, :150]).mean() > 0.3  # the text rows are blanked
        assert not (after[60:, :] != f[60:, :]).any()  # the anatomy below is untouched


def test_header_rules_still_force_cleaning(tmp_path):
    files = write_series(tmp_path / "s", anatomy(3))
    for p, h in files:
        ds = pydicom.dcmread(p)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(p)
    files = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p, _ in files]
    fact, _ = run_series({"MR001-y": files}, tmp_path / "r", {"clean": "auto"})
    (s,) = fact["series"]
    assert s["decision"] == "cleaned" and s["text_found"] is None  # not screened: the header decides
    assert "burned-in" in s["why"]


def test_override_off_leaves_text_for_the_pixel_leak_check(tmp_path):
    uid = generate_uid()
    frames = np.stack([burn(f, "HARTMANN GISELA") for f in anatomy(2, seed=5)])
    root = tmp_path / "release"
    files = write_series(root / "sourcedata" / "dicom" / "sub-T" / "ses-1" / "MR001-o", frames, uid)
    table = tmp_path / "series.tsv"
    table.write_text(f"series_uid\tclean\tnote\n{uid}\toff\tplanted on purpose\n")
    before = [digest(p) for p, _ in files]
    fact, entries = run_series({"MR001-o": files}, tmp_path / "r", {"clean": "auto", "series_file": str(table)})
    (s,) = fact["series"]
    assert s["override"] and s["text_found"] is True and s["boxes"] == 0 and s["decision"] == "kept"
    assert [digest(p) for p, _ in files] == before
    assert entries[0]["pixels"]["action"] == "kept"
    checks = files_to_check(tmp_path / "r", "sub-T")
    assert checks and checks[0][0] == "sourcedata/dicom/sub-T/ses-1/MR001-o/0001.dcm"
    matcher = Matcher(needles_for("sub-T", [("name", "PatientName", NAME)], b"salt"))
    hits, read = pixel_hits(root, tmp_path / "r", "sub-T", identifier_finder(matcher))
    assert read >= 1 and hits
    assert {h["field"] for h in hits} == {"PatientName"} and all("pixel data frame" in h["location"] for h in hits)
    assert "HARTMANN" not in json.dumps(hits)  # only the value's keyed hash
    # a matcher for someone else finds nothing
    other = Matcher(needles_for("sub-T", [("name", "PatientName", "MUELLER^KLAUS")], b"salt"))
    assert pixel_hits(root, tmp_path / "r", "sub-T", identifier_finder(other))[0] == []


def test_demo_ct_and_mr_series_have_no_text(tmp_path):
    """The demo's CT and MR series (pydicom's CT_small and MR_small, an enhanced MR head) are
    screened and left alone."""
    import shutil

    from deidflow.demo import make_demo_input
    make_demo_input(tmp_path / "in")
    series: dict[str, list] = {}
    for f in sorted((tmp_path / "in").rglob("*")):
        try:
            h = pydicom.dcmread(f, stop_before_pixels=True) if f.is_file() else None
        except Exception:
            continue
        if h is not None and h.get("Modality") in ("CT", "MR") and "Rows" in h:
            series.setdefault(h.SeriesInstanceUID, []).append((f, h))
    staged = {}
    for k, (uid, members) in enumerate(sorted(series.items())):
        staged[f"S{k}"] = []
        for i, (f, h) in enumerate(members):
            dst = tmp_path / "stage" / f"{k}_{i}.dcm"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, dst)
            staged[f"S{k}"].append((dst, h))
    before = {p: digest(p) for files in staged.values() for p, _ in files}
    fact, _ = run_series(staged, tmp_path / "r", {"clean": "auto"})
    assert len(fact["series"]) >= 4
    assert all(s["text_found"] is False and s["boxes"] == 0 for s in fact["series"])
    assert {p: digest(p) for p in before} == before


def test_text_in_one_unsampled_frame_is_found(tmp_path):
    """A name burned into the background of one slice of a long series, at the anatomy's brightness
    (a key image annotated in place): neither sampled nor an outlier by its statistics, it was
    released with exit 0 (a real GE head CT, found by red-team 2).  Strong edges in one frame where
    both neighbours are flat background make it an outlier."""
    frames = anatomy(24)
    assert 13 not in screen.sample(24)
    frames[13] = burn(frames[13], "MUELLER HANS", xy=(20, 160), value=int(np.percentile(frames[13], 99)))
    assert 13 not in screen.outliers([screen.stats(f) for f in frames])
    files = write_series(tmp_path / "s", frames)
    fact, _ = run_series({"MR001-k": files}, tmp_path / "r", {"clean": "auto"})
    (s,) = fact["series"]
    assert s["text_found"] is True and s["decision"] == "cleaned"
    clean, _ = run_series({"MR002-c": write_series(tmp_path / "c", anatomy(24, seed=5))}, tmp_path / "r2",
                          {"clean": "auto"})
    assert clean["series"][0]["text_found"] is False and clean["series"][0]["outlier_frames"] == 0


@pytest.mark.parametrize("angle", [90, 270])
def test_vertical_text_reading_either_way_is_found_and_cleaned(tmp_path, angle):
    """A name and ID burned vertically along the frame's edge (side labels run bottom-up or
    top-down) on every slice: the detector boxed it, but tall boxes were read only turned one way,
    so bottom-up text read as '' and the series was released with exit 0 (red-team 3, on the real
    decubitus T1).  Tall boxes are read turned both ways; the better reading counts."""
    from PIL import Image, ImageDraw, ImageFont
    label = Image.new("L", (120, 16), 0)
    ImageDraw.Draw(label).text((0, 0), "ZOE ZACK 3312345", fill=255, font=ImageFont.load_default(size=11))
    label = np.asarray(label.rotate(angle, expand=True)) > 127
    frames = anatomy(24)
    frames[:, 30:30 + label.shape[0], 174:174 + label.shape[1]][:, label] = int(frames.max())
    files = write_series(tmp_path / "s", frames)
    fact, _ = run_series({"MR001-v": files}, tmp_path / "r", {"clean": "auto"})
    (s,) = fact["series"]
    assert s["text_found"] is True and s["decision"] == "cleaned", s
    cleaned = pydicom.dcmread(files[5][0]).pixel_array
    assert not np.array_equal(cleaned[30:150, 174:190], frames[5][30:150, 174:190])


def _multiframe(path: Path, frames: np.ndarray) -> list[tuple[Path, Dataset]]:
    """One enhanced-MR-like file holding every frame (pixel module only, as the screen reads it)."""
    from pydicom.uid import EnhancedMRImageStorage
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", generate_uid(), 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(frames, "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return [(path, pydicom.dcmread(path, stop_before_pixels=True))]


def test_text_on_some_frames_of_a_multiframe_stack_is_cleaned(tmp_path):
    """An enhanced multi-frame MR stack with a name burned into frames 10-13 only (the real XA30
    T1, 96 frames, text on 30-36; red-team 3): the screen found it, but the cleaner took the whole
    noisy frame for a cine's moving area and reused frame 0's detection (no text) for every frame,
    so the file was released with the text and exit 0.  A moving area covering the frame leaves no
    fixed overlay area: each frame is looked at; and text the screen found that the cleaner did
    not fill withholds the file."""
    frames = anatomy(24)
    for k in range(10, 14):
        frames[k] = burn(frames[k], "KOE KARL 7712345", xy=(4, 4))
    files = _multiframe(tmp_path / "s" / "0001.dcm", frames)
    fact, entries = run_series({"MR001-mf": files}, tmp_path / "r", {"clean": "auto"})
    (s,) = fact["series"]
    assert s["text_found"] is True and s["decision"] == "cleaned" and s["withheld"] == 0, s
    out = pydicom.dcmread(files[0][0]).pixel_array
    for k in range(10, 14):
        assert not np.array_equal(out[k][:20, :130], frames[k][:20, :130]), k     # the name is gone
    assert s["check"] and set(range(10, 14)) <= set(s["check"][0]["frames"])


def test_text_the_cleaner_misses_withholds_the_file(tmp_path, monkeypatch):
    """Fail closed: when the screen found text and the cleaner filled no box over it (a detector
    that disagrees at the cleaner's scale, a cache that reused another frame's boxes), the file is
    withheld with a reason instead of released with the text."""
    monkeypatch.setattr(PixelCleaner, "_boxes", lambda self, *a, **k: [])
    frames = anatomy(24)
    frames[12] = burn(frames[12], "KOE KARL 7712345", xy=(4, 4))
    files = _multiframe(tmp_path / "s" / "0001.dcm", frames)
    cleaner = PixelCleaner({"clean": "auto"}, thumbnails=False)
    sp = SubjectPixels(cleaner, "sub-T", SubjectPixelsQC("sub-T"), prefix="sourcedata/dicom")
    entry = {"file": "sub-T/ses-1/MR001-mf/0001.dcm"}
    sp.add(str(files[0][0]), entry["file"], files[0][0], files[0][1], entry)
    bad = sp.finish(tmp_path / "r")
    assert len(bad) == 1 and "was not removed by the cleaner" in bad[0][1]
    assert not files[0][0].exists() and entry["withheld"]


def test_text_on_a_run_of_unsampled_frames_is_found(tmp_path):
    """A name burned into the background of four consecutive slices that are neither sampled nor
    outliers by their statistics (a real decubitus T1, slices 19-22 of 35, at 80 % of the maximum;
    red-team 3): each of them has a neighbour showing the same text, so no frame had edges where
    every neighbour is flat, and the series was released with exit 0.  The run's first and last
    frames have a word of glyph-sized objects where one neighbour is flat background."""
    frames = anatomy(24)
    run = range(13, 17)
    assert not set(run) & set(screen.sample(24))
    for k in run:
        frames[k] = burn(frames[k], "RUN RUDI 9912345", xy=(6, 6), value=int(0.8 * frames.max()))
    assert not set(run) & set(screen.outliers([screen.stats(f) for f in frames]))
    fact, _ = run_series({"MR001-r": write_series(tmp_path / "s", frames)}, tmp_path / "r", {"clean": "auto"})
    (s,) = fact["series"]
    assert s["text_found"] is True and s["decision"] == "cleaned", s
    clean, _ = run_series({"MR002-c": write_series(tmp_path / "c", anatomy(24, seed=5))}, tmp_path / "r2",
                          {"clean": "auto"})
    assert clean["series"][0]["text_found"] is False and clean["series"][0]["outlier_frames"] == 0
