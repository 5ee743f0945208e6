"""Realistic TIFF test files made with tifffile: an Aperio-SVS-like slide (tiled pyramid, thumbnail,
label and macro pages, Aperio ImageDescription) with identifiers planted in every place a slide
scanner puts them, a generic (non-Aperio) pyramid, and a plain multi-page TIFF."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

PATIENT = "PLANTPATIENT42"
PLANTED = [PATIENT, "SS1234PLANT", "S19-4711-PLANTFILE", "jdoe-plant-user", "BC-PLANT-99887", "7731904",
           "PLANTARTIST", "PLANTHOST", "PLANTDOCNAME", "PLANTPAGENAME", "PLANTXMP", "PLANTPRIVATE",
           "PLANTCOPYRIGHT", "Plantus Klinik", "DOE^JANE", "MACRO-S19-4711", "PLANTLABELTEXT",
           "PLANTOMEXML", "PLANTJPEGCOMMENT", "03/14/19", "2019:03:14", "GMT-0500"]
APERIO_HEAD = "Aperio Image Library v12.0.15"
APERIO_FIELDS = ("|AppMag = 20|StripeWidth = 1000|ScanScope ID = SS1234PLANT|Filename = S19-4711-PLANTFILE"
                 "|Date = 03/14/19|Time = 09:59:15|Time Zone = GMT-0500|User = jdoe-plant-user"
                 "|Barcode = BC-PLANT-99887|Patient = " + PATIENT + "|MPP = 0.4990|Left = 25.691574"
                 "|Top = 23.449873|ImageID = 7731904|Title = Plantus Klinik slide"
                 "|OriginalWidth = {w}|OriginalHeight = {h}")


def slide_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB 'tissue' picture with structure at every scale (so every level differs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)).astype(np.uint8)
    g = (128 + 90 * np.cos((x + y) / 51.0)).astype(np.uint8)
    b = rng.integers(0, 255, (h, w), dtype=np.uint8) // 4 + 150
    return np.stack([r, g, b], axis=-1)


def jpeg_bytes(arr: np.ndarray, comment: bytes = b"") -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    kw = {"comment": comment} if comment else {}
    Image.fromarray(arr).save(buf, format="JPEG", quality=85, **kw)
    return buf.getvalue()


def tiles_of(arr: np.ndarray, tile: int, codec: str):
    """Tiles of ``arr`` row by row (zero-padded at the edges), as JPEG bytes or arrays."""
    h, w = arr.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.zeros((tile, tile, arr.shape[2]), arr.dtype)
            part = arr[y:y + tile, x:x + tile]
            t[:part.shape[0], :part.shape[1]] = part
            yield jpeg_bytes(t) if codec == "jpeg" else t


def jpeg_tables(tile_jpeg: bytes) -> bytes:
    """A JPEGTables stream with the quantisation and Huffman tables of ``tile_jpeg`` and, as some
    converters leave, a comment segment (planted text)."""
    import struct
    comment = b"PLANTJPEGCOMMENT " + PATIENT.encode()
    out, pos = bytearray(b"\xff\xd8\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment), 2
    while pos < len(tile_jpeg) and tile_jpeg[pos + 1] != 0xDA:  # up to the start of scan
        n = struct.unpack(">H", tile_jpeg[pos + 2:pos + 4])[0]
        if tile_jpeg[pos + 1] in (0xDB, 0xC4):
            out += tile_jpeg[pos:pos + 2 + n]
        pos += 2 + n
    return bytes(out + b"\xff\xd9")


def label_image() -> np.ndarray:
    """A white label with a specimen number and a name drawn on it."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (240, 160), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "S19-4711 A1", fill="black")
    d.text((10, 40), "DOE, JANE", fill="black")
    return np.asarray(img).copy()


def _leaky_tags(tifffile, text_prefix: str = "") -> list:
    return [(315, "s", 0, "PLANTARTIST", True), (316, "s", 0, "PLANTHOST", True),
            (269, "s", 0, "PLANTDOCNAME", True), (285, "s", 0, "PLANTPAGENAME", True),
            (33432, "s", 0, "PLANTCOPYRIGHT", True),
            (700, "B", 0, b"<x:xmpmeta>PLANTXMP " + PATIENT.encode() + b"</x:xmpmeta>", True),
            (65001, "s", 0, "PLANTPRIVATE " + PATIENT, True)]


def _allow_precompressed_jpeg(tifffile) -> None:
    """tifffile looks up a JPEG encoder even when it is handed already-encoded tiles (bytes); without
    imagecodecs there is none.  The tiles here are encoded by Pillow, so the encoder is never called."""
    codecs = tifffile.tifffile.imagecodecs
    if not hasattr(codecs, "jpeg_encode"):
        def jpeg_encode(*_a, **_k):
            raise NotImplementedError("only pre-encoded JPEG tiles are written")
        codecs.jpeg_encode = jpeg_encode


def make_svs(path: Path, *, codec: str = "jpeg", bigtiff: bool = False, byteorder: str = "<",
             size: tuple[int, int] = (768, 1024), tile: int = 256) -> Path:
    """An Aperio-SVS-like file: level 0, thumbnail (stripped), two reduced levels, label (stripped,
    uncompressed, the name's bytes literally in its pixels), macro (stripped JPEG with a comment)."""
    import tifffile
    _allow_precompressed_jpeg(tifffile)
    h, w = size
    base = slide_image(h, w)
    levels = [base, base[::2, ::2].copy(), base[::4, ::4].copy()]
    compression = "jpeg" if codec == "jpeg" else "zlib"
    geom = f"{w}x{h} [0,100 {w}x{h}] ({tile}x{tile})"
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder) as tw:
        def level(arr, desc, subfiletype=0):
            kw = dict(shape=arr.shape, dtype="uint8", tile=(tile, tile), photometric="rgb",
                      compression=compression, description=desc, subfiletype=subfiletype, metadata=None)
            tiles = list(tiles_of(arr, tile, codec))
            if codec == "jpeg":
                kw["jpegtables"] = jpeg_tables(tiles[0])
            tw.write(iter(tiles), **kw)

        q = " JPEG/RGB Q=70" if codec == "jpeg" else " RAW/RGB"
        level(levels[0], APERIO_HEAD + "\r\n" + geom + q + APERIO_FIELDS.format(w=w, h=h))
        # the tags scanners and converters leave behind, on the first page only (like libtiff)
        thumb = base[::4, ::4].copy()
        tw.write(thumb, photometric="rgb", compression="zlib" if codec != "jpeg" else None, rowsperstrip=16,
                 description=f"{APERIO_HEAD}\r\n{geom} -> {thumb.shape[1]}x{thumb.shape[0]}{q}", metadata=None,
                 software="ImageScope 12.4.3 jdoe-plant-user 2019-03-14", datetime="2019:03:14 09:59:15",
                 extratags=_leaky_tags(tifffile))
        for arr in levels[1:]:
            level(arr, f"{APERIO_HEAD}\r\n{geom} -> {arr.shape[1]}x{arr.shape[0]}{q}"
                  + APERIO_FIELDS.format(w=w, h=h))
        lab = label_image()
        lab[100:101, 10:10 + 30] = np.frombuffer(b"PLANTLABELTEXT DOE^JANE ".ljust(90, b" "), np.uint8).reshape(30, 3)
        tw.write(lab, photometric="rgb", rowsperstrip=32, subfiletype=1, metadata=None,
                 description=f"{APERIO_HEAD}\r\nlabel {lab.shape[1]}x{lab.shape[0]}")
        macro = slide_image(200, 600, seed=3)
        macro[:, :200] = np.asarray(
            __import__("PIL.Image", fromlist=["Image"]).fromarray(lab).resize((200, 200)))
        mj = jpeg_bytes(macro, comment=b"MACRO-S19-4711 " + PATIENT.encode())
        tw.write(iter([mj]), shape=macro.shape, dtype="uint8", photometric="rgb", compression="jpeg",
                 rowsperstrip=macro.shape[0], subfiletype=9, metadata=None,
                 description=f"{APERIO_HEAD}\r\nmacro {macro.shape[1]}x{macro.shape[0]}")
    return path


def make_generic_pyramid(path: Path, *, subifds: bool = False, bigtiff: bool = False) -> Path:
    """A non-Aperio pyramid (libvips style: reduced levels as pages, or OME style: as SubIFDs),
    an OME-like XML description with a name, and a stripped label page at the end."""
    import tifffile
    base = slide_image(512, 768, seed=1)
    levels = [base[::2, ::2].copy(), base[::4, ::4].copy()]
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib", metadata=None)
        tw.write(base, subifds=len(levels) if subifds else 0, software="vips PLANTHOST",
                 description='<?xml version="1.0"?><OME><Experimenter FirstName="PLANTOMEXML"/></OME>',
                 extratags=_leaky_tags(tifffile), **opts)
        for arr in levels:
            tw.write(arr, subfiletype=1, **opts)
        lab = label_image()
        tw.write(lab, photometric="rgb", rowsperstrip=40, metadata=None, description="label PLANTLABELTEXT")
    return path


def make_plain(path: Path) -> Path:
    """A plain two-page 16-bit TIFF stack with an ImageJ description and leaky tags."""
    import tifffile
    rng = np.random.default_rng(7)
    stack = rng.integers(0, 4000, (2, 120, 90), dtype=np.uint16)
    with tifffile.TiffWriter(path) as tw:
        for i, page in enumerate(stack):
            desc = ("ImageJ=1.54f\nimages=2\nslices=2\nunit=micron\nspacing=2.5\nloop=false\n"
                    "info=PLANTDOCNAME DOE^JANE\n") if i == 0 else None
            tw.write(page, photometric="minisblack", rowsperstrip=50, metadata=None, description=desc,
                     datetime="2019:03:14 09:59:15", extratags=_leaky_tags(tifffile) if i == 0 else [])
    return path
