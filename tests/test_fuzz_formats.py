"""Fuzz every non-DICOM header scrubber (hypothesis): mutated headers of real files either are
refused with a FormatError (a one-line quarantine reason) or produce output in which no planted
marker survives and whose data bytes equal the input's. Never another exception.

Bounded in CI (a few seconds per format); ``DEIDFLOW_FUZZ_EXAMPLES=N`` (``make fuzz``) runs N
examples per format with a random seed.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from deidflow import formats
from deidflow.formats.base import FormatError, ScrubContext
from deidflow.pseudonym import Pseudonymizer

from .conftest import require_shared

pytestmark = pytest.mark.realdata

LONG = int(os.environ.get("DEIDFLOW_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(max_examples=LONG or 40, deadline=None, derandomize=not LONG,
                suppress_health_check=list(HealthCheck))
MARK = b"FUZZMARKQ"
CTX = ScrubContext("sub-fuzz0001", Pseudonymizer(b"fuzz-key-0123456789abcdef"), -10, {"options": []})

# (format, shared file, companion suffix or None, bytes of header to mutate)
CASES = {
    "nifti1": (("nibabel", "anatomical.nii"), None, 352),
    "analyze": (("analyze_spm99", "canonical", "avg152T1.hdr"), ".img", 348),
    "minc1": (("nibabel", "tiny.mnc"), None, 2048),
    "parrec": (("nibabel", "phantom_EPI_asc_CLEAR_2_1.PAR"), ".REC", 3000),
    "twix": (("twix", "example_data", "epi.dat"), None, 12000),
}


def _mutate(data: bytes, limit: int, edits: list[tuple[int, bytes]]) -> bytes:
    buf = bytearray(data)
    for pos, chunk in edits:
        p = pos % min(limit, len(buf))
        buf[p:p + len(chunk)] = chunk
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.one_of(st.binary(min_size=1, max_size=12), st.just(MARK))),
                 min_size=1, max_size=6)


def _run(fmt, src, tmp):
    dst = tmp / ("out" + (".hdr" if fmt == "analyze" else ".par" if fmt == "parrec" else ".x"))
    try:
        res = formats.get(fmt).scrub(src, dst, CTX)
    except FormatError as exc:
        assert "\n" not in str(exc) and str(exc)
        assert not dst.exists()
        return None
    return res


def _screened(fmt: str, out) -> None:
    """The other stage's burned-in text screen of a scrubbed volume gives a one-line reason or
    None, never an exception (which would fail the whole unit's job on every run)."""
    from deidflow.formats.stage import _pixel_text
    if fmt in formats.VOLUME_FORMATS:
        why = _pixel_text(out)
        assert why is None or (why and "\n" not in why)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_fuzz_header_scrubber(fmt, tmp_path_factory):
    parts, comp, limit = CASES[fmt]
    original = require_shared(*parts)
    data = original.read_bytes()
    base = tmp_path_factory.mktemp(f"fuzz-{fmt}")
    counter = iter(range(1 << 30))

    @FUZZ
    @given(edits=edits)
    def run(edits):
        tmp = base / str(next(counter))
        tmp.mkdir()
        src = tmp / ("in" + original.suffix)
        src.write_bytes(_mutate(data, limit, edits))
        if comp:
            shutil.copy(original.with_suffix(comp), src.with_suffix(comp))
        res = _run(fmt, src, tmp)
        if res is None:
            return
        _screened(fmt, res.outputs[0])
        if fmt == "nifti1":  # every text field empty, the image bytes where they were
            from deidflow.formats.nifti import NIFTI1_TEXT
            out = res.outputs[0].read_bytes()
            for off, n in NIFTI1_TEXT.values():
                assert out[off:off + n] == bytes(n)
            e = "<" if struct.unpack("<i", out[:4])[0] == 348 else ">"
            vox = int(struct.unpack(e + "f", out[108:112])[0])
            assert out[vox:] == src.read_bytes()[vox:len(out)]
        shutil.rmtree(tmp)

    run()


@FUZZ
@given(head=st.binary(min_size=0, max_size=700), gz=st.booleans())
def test_fuzz_random_nifti_and_mgh_headers(head, gz, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rnd")
    for fmt, magic in (("nifti1", struct.pack("<i", 348)), ("nifti2", struct.pack("<i", 540)),
                       ("mgh", struct.pack(">i", 1))):
        raw = magic + head
        src = tmp / f"in-{fmt}"
        src.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        try:
            formats.get(fmt).identity(src)
            res = formats.get(fmt).scrub(src, tmp / f"out-{fmt}", CTX)
        except FormatError as exc:
            assert "\n" not in str(exc)
        else:
            _screened(fmt, res.outputs[0])


# ------------------------------------------------------------------------------------------------
# TIFF (deidflow.formats.tiff): a small SVS-like slide made with tifffile, mutated in its IFDs
# ------------------------------------------------------------------------------------------------
def _kept_data(path) -> list[bytes]:
    """Strip/tile bytes of the pages the TIFF scrubber keeps (its own reader), in page order."""
    from deidflow.formats import tiff
    tf = tiff.read_structure(path)
    out = []
    with open(path, "rb") as fh:
        for page, kind in zip(tf.pages, tiff.classify(tf)):
            if kind:
                continue
            for off, n in page.blocks:
                fh.seek(off)
                out.append(fh.read(n))
    return out


def test_fuzz_tiff_scrubber(tmp_path_factory):
    pytest.importorskip("tifffile")
    from deidflow.formats import tiff

    from .tiff_samples import make_svs
    base = tmp_path_factory.mktemp("fuzz-tiff")
    data = make_svs(base / "slide.svs", size=(256, 512)).read_bytes()
    import tifffile
    with tifffile.TiffFile(base / "slide.svs") as tf:  # where the IFDs are: most edits go there
        regions = [(p.offset, 2 + 12 * len(p.tags) + 4) for p in tf.pages] + [(0, 8)]
    counter = iter(range(1 << 30))

    @FUZZ
    @given(edits=st.lists(st.tuples(st.integers(0, len(regions)), st.integers(0, 1 << 16),
                                    st.one_of(st.binary(min_size=1, max_size=8), st.just(MARK))),
                          min_size=1, max_size=5))
    def run(edits):
        tmp = base / str(next(counter))
        tmp.mkdir()
        buf = bytearray(data)
        for r, pos, chunk in edits:
            start, n = regions[r] if r < len(regions) else (0, len(buf))
            p = start + pos % n
            buf[p:p + len(chunk)] = chunk
        src = tmp / "in.svs"
        src.write_bytes(bytes(buf[:len(data)]))
        try:
            tiff.identity(src)
            res = tiff.scrub(src, tmp / "out.svs", CTX)
        except FormatError as exc:
            assert "\n" not in str(exc) and str(exc)
            assert not (tmp / "out.svs").exists()
            shutil.rmtree(tmp)
            return
        out = res.outputs[0]
        kept = _kept_data(src)
        assert _kept_data(out) == kept  # every kept strip/tile byte-identical, in order
        blob = out.read_bytes()
        if MARK in blob:  # only where an edit put it into kept image data or a kept numeric tag
            tf = tiff.read_structure(src)
            values = [e.raw for p in tf.pages for t, e in p.entries.items() if t in tiff.KEEP]  # tables, ICC…
            assert MARK in b"".join(kept) or MARK in b"".join(values)
        shutil.rmtree(tmp)

    run()


@FUZZ
@given(head=st.binary(min_size=0, max_size=400), magic=st.sampled_from([b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"]))
def test_fuzz_random_tiff_headers(head, magic, tmp_path_factory):
    from deidflow.formats import tiff
    tmp = tmp_path_factory.mktemp("rndtiff")
    src = tmp / "in.tif"
    src.write_bytes(magic + head)
    try:
        tiff.identity(src)
        tiff.scrub(src, tmp / "out.tif", CTX)
    except FormatError as exc:
        assert "\n" not in str(exc)
