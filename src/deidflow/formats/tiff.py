"""Whole-slide images in TIFF (Aperio SVS, generic pyramidal TIFF) and plain TIFF.

The file is rewritten at byte level: every kept page's strip or tile bytes are copied unchanged
(byte-identical, never decoded) except the comment and application segments of JPEG streams and
the comments of JPEG 2000 streams (the coded data stay as they are), and each kept page gets a new
IFD holding only allow-listed tags.
No TIFF library is needed at run time; the tests read the output back with ``tifffile`` (and
``openslide`` when installed).

**Pages.** In a pyramidal file (first page tiled) a page is kept when it is the full-resolution
page, a focal plane of it (same size), or a pyramid level (tiled, a reduced copy of the first
page: its width and height shrink by one factor); Aperio's second page, the thumbnail (stripped),
is kept when it is a reduced copy of the scanned area (it cannot show the label then; tifffile's
SVS reader expects it there).  Everything else is removed: the slide label, the macro (the
photograph of the whole slide, label included), Aperio pages whose description names them
``label``/``macro``, any other associated image.  In a plain TIFF (first page stripped) every
page is kept except those whose description names them a label, macro, overview or barcode.
SubIFDs (OME-TIFF style pyramids) are kept when they are reduced copies of their page.

**Tags kept** (:data:`KEEP`): what decoding and the pyramid need (size, sample layout,
compression, colour map, tiling, resolution, ICC profile…), ``Make``/``Model``, ``Software``
cleaned of identifiers, ``JPEGTables`` with only its tables (comment and application segments
dropped; the tiles decode the same).  **Removed**: ``DocumentName``, ``PageName``, ``Artist``,
``HostComputer``, ``Copyright``, XMP, IPTC, Photoshop, EXIF/GPS IFDs, ImageJ metadata, every
private tag (≥ 32768 except the ICC profile), anything unknown; ``DateTime`` is kept with
``retain_long_full_dates``, date-shifted with ``retain_long_modified_dates``, else removed.

**ImageDescription.** Aperio's text (``Aperio Image Library vX\\r\\n<geometry>|key = value|…``) is
rebuilt: the header line, the geometry tokens (sizes, tile size, codec, quality, ``label``/
``macro``) and the keys of :data:`APERIO_KEEP` with numeric values; ``Date`` follows the date
options (as ``DateTime``) and ``Time`` goes with it; every other field (``Filename``, ``User``,
``ScanScope ID``, ``ImageID``, barcodes, …) is removed and its value handed to the leak scan.
An ImageJ description keeps its allow-listed numeric lines.  Any other description (OME-XML,
vendor XML, free text) is removed.

**Identity.** An Aperio field naming the patient (``Patient``, ``PatientID``, ``Patient Name``,
``MRN``) when there is one, else the inventory's path rules.  Damaged files (bad header, IFD
outside the file or in a loop, tile or strip bytes past the end, missing or inconsistent
offsets) raise :class:`FormatError`.  Hamamatsu NDPI (64-bit offsets in private tags) and Leica
SCN (slide structure in XML) are refused rather than released half-understood.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .base import Format, FormatError, Outputs, ScrubContext, ScrubResult, copy_exact

# type code -> bytes per value
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_INT_CODES = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q", 1: "B"}
ASCII = 2

# Tags kept as they are (name for the audit).
KEEP = {
    254: "NewSubfileType", 255: "SubfileType", 256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample",
    259: "Compression", 262: "PhotometricInterpretation", 263: "Threshholding", 266: "FillOrder",
    271: "Make", 272: "Model", 274: "Orientation", 277: "SamplesPerPixel", 278: "RowsPerStrip",
    280: "MinSampleValue", 281: "MaxSampleValue", 282: "XResolution", 283: "YResolution",
    284: "PlanarConfiguration", 290: "GrayResponseUnit", 291: "GrayResponseCurve", 292: "T4Options",
    293: "T6Options", 296: "ResolutionUnit", 301: "TransferFunction", 317: "Predictor", 318: "WhitePoint",
    319: "PrimaryChromaticities", 320: "ColorMap", 321: "HalftoneHints", 322: "TileWidth", 323: "TileLength",
    332: "InkSet", 334: "NumberOfInks", 338: "ExtraSamples", 339: "SampleFormat", 340: "SMinSampleValue",
    341: "SMaxSampleValue", 342: "TransferRange", 347: "JPEGTables", 529: "YCbCrCoefficients",
    530: "YCbCrSubSampling", 531: "YCbCrPositioning", 532: "ReferenceBlackWhite", 32997: "ImageDepth",
    32998: "TileDepth", 34675: "ICCProfile",
}
STRIP_OFFSETS, STRIP_COUNTS, TILE_OFFSETS, TILE_COUNTS = 273, 279, 324, 325
SUBIFDS, DESCRIPTION, SOFTWARE, DATETIME = 330, 270, 305, 306
# Removed tags whose text is handed to the leak scan (they often hold names, paths, hosts).
TEXT_FOUND = {269: "DocumentName", 285: "PageName", 315: "Artist", 316: "HostComputer", 33432: "Copyright"}
NAMES = {**KEEP, **TEXT_FOUND, STRIP_OFFSETS: "StripOffsets", STRIP_COUNTS: "StripByteCounts",
         TILE_OFFSETS: "TileOffsets", TILE_COUNTS: "TileByteCounts", SUBIFDS: "SubIFDs",
         DESCRIPTION: "ImageDescription", SOFTWARE: "Software", DATETIME: "DateTime", 700: "XMP",
         33723: "IPTC", 34377: "Photoshop", 34665: "ExifIFD", 34853: "GPSIFD", 37724: "ImageSourceData",
         50838: "ImageJMetadataByteCounts", 50839: "ImageJMetadata"}

# Aperio ImageDescription keys kept when their value is a number.
APERIO_KEEP = ("AppMag", "MPP", "StripeWidth", "Exposure Time", "Exposure Scale", "Display Gamma", "Gamma",
               "Focus Offset", "Left", "Top", "LineCameraSkew", "LineAreaXOffset", "LineAreaYOffset",
               "OriginalWidth", "OriginalHeight", "Originalheight", "Filtered", "Compression Quality")
_APERIO_KEEP = {k.lower(): k for k in APERIO_KEEP}
APERIO_PATIENT_KEYS = {"patient": "patient_id", "patientid": "patient_id", "patientsid": "patient_id",
                       "mrn": "patient_id", "medicalrecordnumber": "patient_id", "patientname": "patient_name",
                       "patientsname": "patient_name"}
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_APERIO_HEADER = re.compile(r"^Aperio Image (?:Library|Format)(?: v?\d{1,4}(?:\.\d{1,6}){0,4}[a-z]?)?$")
_GEOMETRY_TOKEN = re.compile(r"^(?:\d+x\d+|\[\d+,\d+|\d+x\d+\]|\(\d+x\d+\)|->|-|Q=\d+|R=\d+|label|macro|thumbnail"
                             r"|(?:JPEG|J2K|JP2K|LZW|RAW|NONE|DEFLATE)(?:/[A-Z0-9]{1,8})?)$",
                             re.I)
_ASSOCIATED = re.compile(r"(?<![a-z])(label|macro|overview|barcode)(?![a-z])", re.I)
IMAGEJ_KEYS = {"imagej", "images", "channels", "slices", "frames", "hyperstack", "mode", "unit", "spacing", "loop",
               "min", "max", "finterval", "fps", "xorigin", "yorigin", "zorigin", "cf", "vunit", "yunit", "zunit"}
_IMAGEJ_VALUE = re.compile(r"^[\w.+\-\\]{0,32}$")

MAX_PAGES = 4096
MAX_ENTRIES = 2048
MAX_VALUE_BYTES = 256 << 20
MAX_SUBIFD_DEPTH = 2
ASPECT_TOLERANCE = 0.02  # a reduced level's width and height shrink by one factor, up to rounding


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    tag: int
    type: int
    count: int
    raw: bytes  # the value's bytes, in the file's byte order


@dataclass
class Page:
    offset: int
    entries: dict[int, Entry]
    subifds: list["Page"] = field(default_factory=list)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (offset, byte count) of strips/tiles
    bo: str = "<"  # the file's byte order

    def has(self, tag: int) -> bool:
        return tag in self.entries

    @property
    def tiled(self) -> bool:
        return TILE_OFFSETS in self.entries

    @property
    def width(self) -> int:
        return self._first(256)

    @property
    def height(self) -> int:
        return self._first(257)

    def _first(self, tag: int, default: int = 0) -> int:
        e = self.entries.get(tag)
        if e is None or e.count < 1 or e.type not in _INT_CODES:
            return default
        return self._ints(e)[0]

    def _ints(self, e: Entry) -> list[int]:
        return list(struct.unpack(f"{self.bo}{e.count}{_INT_CODES[e.type]}", e.raw))

    def text(self, tag: int) -> str:
        e = self.entries.get(tag)
        if e is None or e.type not in (ASCII, 1, 7):
            return ""
        return e.raw.split(b"\x00", 1)[0].decode("latin-1")

    @property
    def description(self) -> str:
        return self.text(DESCRIPTION)


@dataclass
class TiffFile:
    byteorder: str  # "<" or ">"
    big: bool
    size: int
    pages: list[Page]

    @property
    def aperio(self) -> bool:
        return bool(self.pages) and self.pages[0].description.startswith("Aperio ")

    def all_pages(self) -> Iterator[Page]:
        """Every IFD: the pages and their SubIFDs at any depth."""
        todo = list(self.pages)
        while todo:
            page = todo.pop()
            todo.extend(page.subifds)
            yield page


class _Reader:
    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size
        self.budget = max(64 << 20, 2 * size)  # IFDs pointing at one huge value again and again

    def read(self, offset: int, n: int, what: str) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise FormatError(f"{what} lies outside the file (truncated or damaged)")
        self.budget -= n
        if self.budget < 0:
            raise FormatError("tag values add up to more than twice the file (damaged)")
        self.fh.seek(offset)
        data = self.fh.read(n)
        if len(data) != n:
            raise FormatError(f"{what} lies outside the file (truncated or damaged)")
        return data


def read_structure(path: Path) -> TiffFile:
    """Parse the header and every IFD (and SubIFD) of ``path``; checks that every offset lies
    inside the file and that each page's strips or tiles are complete.  FormatError otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, size)
        head = r.read(0, 8, "TIFF header")
        if head[:2] == b"II":
            bo = "<"
        elif head[:2] == b"MM":
            bo = ">"
        else:
            raise FormatError("not a TIFF file (byte-order mark missing)")
        magic = struct.unpack(bo + "H", head[2:4])[0]
        if magic == 42:
            big, first = False, struct.unpack(bo + "I", head[4:8])[0]
        elif magic == 43:
            more = r.read(8, 8, "BigTIFF header")
            if struct.unpack(bo + "HH", head[4:8]) != (8, 0):
                raise FormatError("BigTIFF header has an unsupported offset size")
            big, first = True, struct.unpack(bo + "Q", more)[0]
        else:
            raise FormatError("not a TIFF file (version is neither 42 nor 43)")
        seen: set[int] = set()
        pages: list[Page] = []
        offset = first
        while offset:
            if len(pages) >= MAX_PAGES:
                raise FormatError(f"more than {MAX_PAGES} pages")
            page, offset = _read_ifd(r, bo, big, offset, seen, 0)
            pages.append(page)
    if not pages:
        raise FormatError("no image (the first IFD offset is 0)")
    tf = TiffFile(bo, big, size, pages)
    if any(p._first(259) == 6 and p.has(513) for p in pages):
        raise FormatError("old-style JPEG (compression 6) is not supported")
    if any(p.has(65420) for p in pages):
        raise FormatError("Hamamatsu NDPI is not supported (64-bit offsets in private tags)")
    desc0 = pages[0].description
    if desc0.lstrip().startswith("<") and "leica" in desc0[:4096].lower() and "scn" in desc0[:4096].lower():
        raise FormatError("Leica SCN is not supported (its macro image is only described in its XML)")
    return tf


def _read_ifd(r: _Reader, bo: str, big: bool, offset: int, seen: set[int], depth: int) -> tuple[Page, int]:
    if offset in seen:
        raise FormatError("IFD chain loops back on itself")
    seen.add(offset)
    cfmt, csize, esize, vfmt, inline = ("Q", 8, 20, "Q", 8) if big else ("H", 2, 12, "I", 4)
    n = struct.unpack(bo + cfmt, r.read(offset, csize, "IFD"))[0]
    if n == 0 or n > MAX_ENTRIES:
        raise FormatError(f"IFD with {n} entries")
    table = r.read(offset + csize, n * esize + (8 if big else 4), "IFD")
    entries: dict[int, Entry] = {}
    for i in range(n):
        e = table[i * esize:(i + 1) * esize]
        if big:
            tag, typ, count = struct.unpack(bo + "HHQ", e[:12])
            value = e[12:20]
        else:
            tag, typ, count = struct.unpack(bo + "HHI", e[:8])
            value = e[8:12]
        if typ not in TYPE_SIZES:
            if tag in KEEP or tag in _STRUCTURAL:
                raise FormatError(f"tag {tag} has unknown type {typ}")
            continue  # an unknown type in a tag that is removed anyway
        nbytes = count * TYPE_SIZES[typ]
        if tag not in KEEP and tag not in _STRUCTURAL and tag not in TEXT_FOUND:
            entries[tag] = Entry(tag, typ, count, b"")  # removed: its value is never read
            continue
        if nbytes > MAX_VALUE_BYTES:
            raise FormatError(f"tag {tag} value of {nbytes} bytes")
        if nbytes <= inline:
            raw = value[:nbytes]
        else:
            where = struct.unpack(bo + vfmt, value)[0]
            raw = r.read(where, nbytes, f"value of tag {tag}")
        entries[tag] = Entry(tag, typ, count, raw)
    nxt = struct.unpack(bo + vfmt, table[n * esize:])[0]
    page = Page(offset, entries, bo=bo)
    _check_page(page, r.size)
    sub = entries.get(SUBIFDS)
    if sub is not None and sub.count:
        if depth >= MAX_SUBIFD_DEPTH:
            raise FormatError("SubIFDs nested too deeply")
        if sub.type not in (4, 13, 16, 18):
            raise FormatError("SubIFDs tag of a non-offset type")
        for off in page._ints(sub):
            child, _ = _read_ifd(r, bo, big, off, seen, depth + 1)
            page.subifds.append(child)
    return page, nxt


_STRUCTURAL = {STRIP_OFFSETS, STRIP_COUNTS, TILE_OFFSETS, TILE_COUNTS, SUBIFDS, DESCRIPTION, SOFTWARE, DATETIME}


def _check_page(page: Page, size: int) -> None:
    """Sizes, tiling and strip/tile byte ranges are consistent and inside the file."""
    w, h = page.width, page.height
    if w < 1 or h < 1:
        raise FormatError("image width or length missing or zero")
    spp = page._first(277, 1) or 1
    planes = spp if page._first(284, 1) == 2 else 1
    if page.tiled:
        tw, th = page._first(322), page._first(323)
        if tw < 1 or th < 1 or TILE_COUNTS not in page.entries:
            raise FormatError("tiled page without tile size or tile byte counts")
        depth, tdepth = page._first(32997, 1) or 1, page._first(32998, 1) or 1
        need = math.ceil(w / tw) * math.ceil(h / th) * math.ceil(depth / tdepth) * planes
        offs, cnts = page.entries[TILE_OFFSETS], page.entries[TILE_COUNTS]
    else:
        if STRIP_OFFSETS not in page.entries or STRIP_COUNTS not in page.entries:
            raise FormatError("page without strip or tile offsets")
        rps = page._first(278, h) or h
        need = math.ceil(h / min(rps, h)) * planes
        offs, cnts = page.entries[STRIP_OFFSETS], page.entries[STRIP_COUNTS]
    if offs.type not in _INT_CODES or cnts.type not in _INT_CODES:
        raise FormatError("strip or tile offsets of a non-integer type")
    o, c = page._ints(offs), page._ints(cnts)
    if len(o) != len(c):
        raise FormatError("strip/tile offsets and byte counts differ in number")
    if len(o) < need:
        raise FormatError(f"{len(o)} strips/tiles where the image needs {need}")
    for off, cnt in zip(o, c):
        if cnt and off + cnt > size:
            raise FormatError("strip or tile data past the end of the file (truncated)")
    page.blocks = list(zip(o, c))


# ------------------------------------------------------------------------------------------------
# Which pages stay
# ------------------------------------------------------------------------------------------------
def _reduced(page: Page, base: Page) -> bool:
    """``page`` is a reduced copy of ``base`` (one shrink factor for width and height)."""
    if page.width > base.width or page.height > base.height:
        return False
    fw, fh = base.width / page.width, base.height / page.height
    # rounding of the reduced size: up to one pixel on each axis
    tol = ASPECT_TOLERANCE + 1.0 / min(page.width, page.height)
    return abs(fw - fh) <= tol * max(fw, fh)


def _aperio_kind(desc: str) -> str:
    """``label``, ``macro`` or ``""`` from the second line of an Aperio description."""
    lines = desc.split("\n", 1)
    second = lines[1].strip().lower() if len(lines) > 1 else ""
    word = second.split(" ", 1)[0].split("|", 1)[0]
    return word if word in ("label", "macro") else ""


def classify(tf: TiffFile) -> list[str]:
    """For each top-level page: ``""`` (kept) or why it is removed."""
    pages = tf.pages
    base = pages[0]
    out = []
    for i, p in enumerate(pages):
        desc = p.description
        if tf.aperio:
            named = _aperio_kind(desc)
            if named:
                out.append(named)
                continue
            if p._first(254) == 9:
                out.append("macro")
                continue
        elif desc and not desc.lstrip().startswith("<"):
            m = _ASSOCIATED.search(desc[:256])
            if m:
                out.append(m.group(1).lower())
                continue
        if i == 0 or not base.tiled:
            out.append("")
        elif p.tiled and _reduced(p, base):
            out.append("")
        elif tf.aperio and i == 1 and _reduced(p, base):
            out.append("")  # the thumbnail: a reduced copy of the scanned area
        else:
            out.append("associated image")
    return out


# ------------------------------------------------------------------------------------------------
# Tag rules
# ------------------------------------------------------------------------------------------------
def _date8(text: str) -> str | None:
    """YYYYMMDD of an Aperio ``MM/DD/YY`` or a TIFF ``YYYY:MM:DD`` date."""
    m = re.match(r"^\s*(\d{4})[:\-/](\d{2})[:\-/](\d{2})", text)
    if m:
        return "".join(m.groups())
    m = re.match(r"^\s*(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})\s*$", text)
    if m:
        mo, d, y = m.groups()
        y = y if len(y) == 4 else ("20" + y if int(y) < 70 else "19" + y)
        return f"{y}{int(mo):02d}{int(d):02d}"
    return None


def _aperio_date(value: str, ctx: ScrubContext) -> str | None:
    d8 = _date8(value)
    if d8 is None:
        return None
    new = ctx.date(d8)
    if new is None:
        return None
    short = len(value.strip().split("/")[-1]) == 2
    return f"{new[4:6]}/{new[6:8]}/{new[2:4] if short else new[:4]}"


def aperio_fields(desc: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(header line, geometry line, [(key, value)]) of an Aperio description."""
    items = desc.split("|")
    first = items[0]
    head, _, geometry = first.partition("\n")
    fields = []
    for item in items[1:]:
        key, eq, value = item.partition("=")
        if eq:
            fields.append((key.strip(), value.strip()))
        elif item.strip():
            fields.append(("", item.strip()))
    return head.rstrip("\r").strip(), geometry.strip(), fields


def scrub_aperio(desc: str, ctx: ScrubContext, res: ScrubResult) -> str:
    """The Aperio description with only its safe parts (see the module docstring)."""
    head, geometry, fields = aperio_fields(desc)
    head = head if _APERIO_HEADER.match(head) else "Aperio Image Library"
    tokens = geometry.split()
    kept_tokens = [t for t in tokens if _GEOMETRY_TOKEN.match(t)]
    if len(kept_tokens) != len(tokens):
        res.act("ImageDescription: geometry line", "cleaned")
    out = []
    date_kept = False
    for key, value in fields:
        low = key.lower()
        if low == "date":
            new = _aperio_date(value, ctx)
            res.found("Aperio Date", _date8(value) or value)
            if new is not None:
                out.append(("Date", new))
                date_kept = True
                res.act("ImageDescription: Date", "kept" if new == value else "shifted")
            else:
                res.act("ImageDescription: Date", "removed")
            continue
        if low in ("time", "time zone"):
            continue  # decided below, with the date
        if low in _APERIO_KEEP and _NUMBER.match(value):
            out.append((key, value))
            continue
        name = _APERIO_KEEP.get(low) or _known_aperio_name(key)
        res.act(f"ImageDescription: {name}", "removed")
        res.found(f"Aperio {key[:64] or 'text'}", value)
    for key, value in fields:
        if key.lower() in ("time", "time zone"):
            if date_kept and key.lower() == "time" and re.match(r"^\d{1,2}:\d{2}(:\d{2})?$", value):
                out.append((key, value))
                res.act("ImageDescription: Time", "kept")
            else:
                res.act(f"ImageDescription: {'Time' if key.lower() == 'time' else 'Time Zone'}", "removed")
    text = head + "\r\n" + " ".join(kept_tokens)
    return text + "".join(f"|{k} = {v}" for k, v in out)


_APERIO_NAMES = ("Filename", "User", "ScanScope ID", "ImageID", "Barcode", "Title", "Parmset", "ICC Profile",
                 "Rack", "Slide", "DSR ID", "Session Mode", "SessionMode", "Copyright", "Patient", "PatientID",
                 "Patient ID", "Patient Name", "MRN", "Case", "Accession", "Specimen", "Block", "Stain",
                 "ScannerType", "Scanner Type", "Description", "Comments", "Notes", "Operator")


def _known_aperio_name(key: str) -> str:
    for n in _APERIO_NAMES:
        if n.lower() == key.lower():
            return n
    return "other fields"


def scrub_imagej(desc: str) -> str | None:
    """An ImageJ description with only its allow-listed numeric lines (None: nothing to keep)."""
    lines = []
    for line in desc.splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip().lower() in IMAGEJ_KEYS and _IMAGEJ_VALUE.match(value.strip()):
            lines.append(f"{key.strip()}={value.strip()}")
    return "\n".join(lines) + "\n" if lines and lines[0].lower().startswith("imagej=") else None


JPEG_TABLES = 347
_JPEG_TABLE_MARKERS = {0xDB: "DQT", 0xC4: "DHT", 0xCC: "DAC", 0xDD: "DRI"}


def _jpeg_tables(raw: bytes, res: ScrubResult) -> tuple[int, bytes]:
    """(count, bytes) of a JPEGTables stream with only its tables (quantisation, Huffman,
    arithmetic conditioning, restart interval): comment and application segments, which can hold
    text, are dropped.  The tiles' decoding does not change."""
    if raw[:2] != b"\xff\xd8":
        raise FormatError("JPEGTables does not start with a JPEG SOI marker")
    out, pos, dropped = bytearray(b"\xff\xd8"), 2, 0
    while pos < len(raw):
        if raw[pos] != 0xFF or pos + 1 >= len(raw):
            raise FormatError("JPEGTables damaged (marker expected)")
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            break
        if pos + 4 > len(raw):
            raise FormatError("JPEGTables damaged (segment cut short)")
        n = struct.unpack(">H", raw[pos + 2:pos + 4])[0]
        if n < 2 or pos + 2 + n > len(raw):
            raise FormatError("JPEGTables damaged (segment length)")
        if marker in _JPEG_TABLE_MARKERS:
            out += raw[pos:pos + 2 + n]
        else:
            dropped += 1
        pos += 2 + n
    out += b"\xff\xd9"
    res.act("JPEGTables", "cleaned" if dropped else "kept")
    return len(out), bytes(out)


def _ascii(text: str) -> bytes:
    return text.encode("latin-1", "replace") + b"\x00"


def page_tags(page: Page, tf: TiffFile, ctx: ScrubContext, res: ScrubResult,
              own: tuple[str, ...] = ()) -> dict[int, Entry]:
    """The tags written for ``page`` (offsets and SubIFDs are filled in by the writer); ``own``:
    the identifying values found anywhere in the file, which kept free text is cleaned of."""
    out: dict[int, Entry] = {}
    for tag, e in page.entries.items():
        name = NAMES.get(tag) or (f"private tag {tag}" if tag >= 32768 else f"tag {tag}")
        if tag == JPEG_TABLES:
            if e.type not in (1, 7):
                raise FormatError("JPEGTables of a non-byte type")
            out[tag] = Entry(tag, e.type, *_jpeg_tables(e.raw, res))
        elif tag in KEEP:
            out[tag] = e
            res.act(name, "kept")
        elif tag in (STRIP_OFFSETS, STRIP_COUNTS, TILE_OFFSETS, TILE_COUNTS, SUBIFDS):
            out[tag] = e
        elif tag == DESCRIPTION:
            desc = page.text(DESCRIPTION)
            new = None
            if tf.aperio and desc.startswith("Aperio "):
                new = scrub_aperio(desc, ctx, res)
            elif desc.startswith("ImageJ="):
                new = scrub_imagej(desc)
                res.act(name, "cleaned" if new else "removed")
            else:
                res.act(name, "removed")
            if new is not None:
                raw = _ascii(new)
                out[tag] = Entry(tag, ASCII, len(raw), raw)
        elif tag == SOFTWARE:
            text = page.text(SOFTWARE)
            clean = ctx.clean(text, own).strip()
            if clean and clean.isascii() and clean.isprintable() and len(clean) <= 128:
                raw = _ascii(clean)
                out[tag] = Entry(tag, ASCII, len(raw), raw)
                res.act(name, "kept" if clean == text.strip() else "cleaned")
            else:
                res.act(name, "removed")
        elif tag == DATETIME:
            text = page.text(DATETIME)
            d8 = _date8(text)
            res.found("DateTime", d8 or text)
            new = ctx.date(d8) if d8 else None
            if new is not None and len(text) >= 10:
                value = f"{new[:4]}:{new[4:6]}:{new[6:8]}{text[10:19]}"
                raw = _ascii(value)
                out[tag] = Entry(tag, ASCII, len(raw), raw)
                res.act(name, "kept" if value == text else "shifted")
            else:
                res.act(name, "removed")
        else:
            if tag in TEXT_FOUND:
                res.found(name, page.text(tag))
            res.act(name, "removed")
    return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
class _Writer:
    """Sequential writer of the new file; IFD next-pointers are patched in place."""

    def __init__(self, sink, src, tf: TiffFile, replaced: dict[tuple[int, int], bytes] | None = None):
        self.sink, self.src, self.tf = sink, src, tf
        self.bo, self.big = tf.byteorder, tf.big
        self.pos = 0
        self._ifd_sizes: dict[int, int] = {}
        self.replaced = replaced or {}  # strips/tiles written with other bytes (see _clean_blocks)

    def write(self, data: bytes) -> int:
        at = self.pos
        self.sink.write(data)
        self.pos += len(data)
        return at

    def align(self, n: int = 2) -> None:
        if self.pos % n:
            self.write(bytes(n - self.pos % n))

    def copy_blocks(self, blocks: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """Copy every (offset, count) byte range, contiguous ranges in one go; their new offsets."""
        where: dict[tuple[int, int], int] = {}
        todo = sorted({b for b in blocks if b[1] > 0 and b not in self.replaced})
        i = 0
        while i < len(todo):
            start, end = todo[i][0], todo[i][0] + todo[i][1]
            j = i + 1
            while j < len(todo) and todo[j][0] <= end:  # contiguous or overlapping: one run
                end = max(end, todo[j][0] + todo[j][1])
                j += 1
            self.align()
            base = self.pos
            self.src.seek(start)
            got = copy_exact(self.src, self.sink, end - start)
            if got != end - start:
                raise FormatError("strip or tile data past the end of the file (truncated)")
            self.pos += got
            for b in todo[i:j]:
                where[b] = base + b[0] - start
            i = j
        for b in sorted(set(blocks) & self.replaced.keys()):
            self.align()
            where[b] = self.write(self.replaced[b])
        return where

    def page(self, page: Page, tags: dict[int, Entry], subpages: list[tuple[Page, dict[int, Entry]]],
             where: dict[tuple[int, int], int]) -> int:
        """Write the IFDs of ``page``'s kept SubIFDs and its own (its data are at ``where``);
        returns the IFD's offset."""
        tags = dict(tags)
        otag, ctag = (TILE_OFFSETS, TILE_COUNTS) if page.tiled else (STRIP_OFFSETS, STRIP_COUNTS)
        offs = [where.get(b, 0) if b[1] > 0 else 0 for b in page.blocks]
        tags[otag] = self._offsets(otag, offs)
        tags[ctag] = counts = page.entries[ctag]
        if any(b in self.replaced for b in page.blocks):
            tags[ctag] = Entry(ctag, counts.type, counts.count, struct.pack(
                f"{self.bo}{counts.count}{_INT_CODES[counts.type]}",
                *(len(self.replaced[b]) if b in self.replaced else b[1] for b in page.blocks)))
        for t in (STRIP_OFFSETS, STRIP_COUNTS, TILE_OFFSETS, TILE_COUNTS):
            if t not in (otag, ctag):
                tags.pop(t, None)
        children = []
        for sp, st in subpages:
            children.append(self.page(sp, st, [], where))
        if children:
            for k in range(len(children) - 1):  # chain the SubIFDs as libtiff does
                self._patch_next(children[k], children[k + 1])
            typ = page.entries[SUBIFDS].type
            typ = typ if typ in ((16, 18) if self.big else (4, 13)) else (18 if self.big else 13)
            tags[SUBIFDS] = Entry(SUBIFDS, typ, len(children),
                                  struct.pack(f"{self.bo}{len(children)}{'Q' if self.big else 'I'}", *children))
        else:
            tags.pop(SUBIFDS, None)
        return self._ifd(tags)

    def _offsets(self, tag: int, values: list[int]) -> Entry:
        if self.big:
            return Entry(tag, 16, len(values), struct.pack(f"{self.bo}{len(values)}Q", *values))
        if values and max(values) >= 1 << 32:
            raise FormatError("rewritten file exceeds the 4 GiB of a classic TIFF")
        return Entry(tag, 4, len(values), struct.pack(f"{self.bo}{len(values)}I", *values))

    def _ifd(self, tags: dict[int, Entry]) -> int:
        big, bo = self.big, self.bo
        inline = 8 if big else 4
        # out-of-line values first, then the IFD (so the IFD's size is known when it is written)
        placed: dict[int, int] = {}
        for tag in sorted(tags):
            e = tags[tag]
            if len(e.raw) > inline:
                self.align()
                placed[tag] = self.write(e.raw)
        self.align(8 if big else 2)
        ifd = bytearray(struct.pack(bo + ("Q" if big else "H"), len(tags)))
        for tag in sorted(tags):
            e = tags[tag]
            if big:
                ifd += struct.pack(bo + "HHQ", tag, e.type, e.count)
            else:
                ifd += struct.pack(bo + "HHI", tag, e.type, e.count)
            if tag in placed:
                ifd += struct.pack(bo + ("Q" if big else "I"), placed[tag])
            else:
                ifd += e.raw + bytes(inline - len(e.raw))
        ifd += bytes(8 if big else 4)  # next IFD: patched later
        at = self.write(bytes(ifd))
        if not big and self.pos >= 1 << 32:
            raise FormatError("rewritten file exceeds the 4 GiB of a classic TIFF")
        self._ifd_sizes[at] = len(ifd)
        return at

    def _patch_next(self, ifd: int, nxt: int) -> None:
        size = self._ifd_sizes[ifd]
        w = 8 if self.big else 4
        self.sink.seek(ifd + size - w)
        self.sink.write(struct.pack(self.bo + ("Q" if self.big else "I"), nxt))
        self.sink.seek(self.pos)


# Compressions whose strips and tiles are JPEG or JPEG 2000 streams (JPEG, lossy JPEG of DNG;
# Aperio JPEG 2000 YCbCr/RGB, JPEG 2000)
_JPEG_COMPRESSIONS = frozenset((7, 34892))
_J2K_COMPRESSIONS = frozenset((33003, 33004, 33005, 34712))


_DEFLATE_COMPRESSIONS = frozenset((8, 32946))
_LZMA_COMPRESSION = 34925
_PACKBITS_COMPRESSION = 32773


def _block_sizes(page: Page) -> list[int]:
    """Bytes of each uncompressed strip or tile of ``page`` (rows × row bytes; the last strip of a
    plane holds only the rows left)."""
    bps = page._ints(page.entries[258]) if 258 in page.entries else [1]
    spp = page._first(277, 1) or 1
    planar = page._first(284, 1) == 2
    bits = (bps[0] if planar else sum(bps) if len(bps) == spp else bps[0] * spp)
    if page.tiled:
        tw, th = page._first(322), page._first(323)
        one = math.ceil(tw * bits / 8) * th * (page._first(32998, 1) or 1)
        return [one] * len(page.blocks)
    w, h = page.width, page.height
    rps = min(page._first(278, h) or h, h)
    per_plane = math.ceil(h / rps)
    row = math.ceil(w * bits / 8)
    return [row * min(rps, h - (k % per_plane) * rps) for k in range(len(page.blocks))]


def _image_end(data: bytes, comp: int, size: int) -> int | None:
    """Where the coded image of one strip or tile ends (a decoder reads nothing after it), from its
    coding: ``size`` bytes when uncompressed, the end of the deflate / LZMA stream, of the PackBits
    runs that give ``size`` bytes, the JPEG end-of-image, the JPEG 2000 end-of-codestream (the DICOM
    engine's readers, :mod:`deidflow.codestreams`).  None when it cannot be told."""
    from ..codestreams import j2k_end, jpeg_end, packbits_length
    if comp == 1:
        return size if len(data) >= size else len(data)
    if comp in _DEFLATE_COMPRESSIONS or comp == _LZMA_COMPRESSION:
        import lzma
        import zlib
        d = zlib.decompressobj() if comp != _LZMA_COMPRESSION else lzma.LZMADecompressor()
        try:
            d.decompress(data)
        except (zlib.error, lzma.LZMAError):
            return None
        return len(data) - len(d.unused_data) if d.eof else None
    if comp == _PACKBITS_COMPRESSION:
        return packbits_length(data, 0, len(data), size)
    if comp in _JPEG_COMPRESSIONS:
        return jpeg_end(data)
    if comp in _J2K_COMPRESSIONS:
        return j2k_end(data)
    return None


def _clean_blocks(src, pages: list[Page], res: ScrubResult) -> dict[tuple[int, int], bytes]:
    """The strips and tiles of ``pages`` that hold more than their coded image, without the rest:
    (offset, count) -> new bytes.  Bytes after the image inside a block's byte count (text a
    converter appended, a description's bytes the count was stretched over) are dropped (zero
    padding is left); a JPEG stream's comment and application segments (COM, EXIF/XMP APP1, IPTC:
    a converter's "scanned for <patient>") and a JPEG 2000 stream's comments go too (the DICOM
    engine's frame rules, one implementation).  The coded data stay byte for byte, so the pixels
    decode the same.  A coding whose end cannot be found (LZW, CCITT, WebP, …) or a damaged
    stream raises FormatError: what is not read is not released (the leak scan skips these
    bytes)."""
    from ..codestreams import padding
    from ..dicomio import DicomError, j2k_frame_without_comments, jpeg_frame_without_metadata
    out: dict[tuple[int, int], bytes] = {}
    trimmed = stripped = False
    for page in pages:
        comp = page._first(259, 1) or 1
        strip = (jpeg_frame_without_metadata if comp in _JPEG_COMPRESSIONS
                 else j2k_frame_without_comments if comp in _J2K_COMPRESSIONS else None)
        for (off, n), size in zip(page.blocks, _block_sizes(page)):
            if n <= 0 or (off, n) in out:
                continue
            src.seek(off)
            data = src.read(n)
            end = _image_end(data, comp, size)
            if end is None:
                raise FormatError(f"strip or tile of compression {comp}: where its image ends cannot be checked")
            new = data
            if not padding(data[end:]):
                new, trimmed = data[:end], True
            if strip is not None:
                try:
                    cleaned = strip(new)
                except DicomError as exc:
                    raise FormatError(f"strip or tile: {exc}") from None
                stripped, new = stripped or cleaned is not new, cleaned
            if new is not data:
                out[(off, n)] = new
    if trimmed:
        res.act("bytes after the image in strips and tiles", "removed")
    if stripped:
        res.act("JPEG comment and application segments of strips and tiles", "removed")
    return out


def _own_values(tf: TiffFile, ctx: ScrubContext) -> tuple[str, ...]:
    """Every identifying value the tag rules find in the file (all pages, SubIFDs included)."""
    scratch = ScrubResult()
    for page in tf.all_pages():
        for tag in TEXT_FOUND:
            scratch.found(NAMES[tag], page.text(tag))
        page_tags(page, tf, ctx, scratch)
    return tuple(sorted(set(scratch.identifiers.values())))


def _header(tf: TiffFile) -> bytes:
    mark = b"II" if tf.byteorder == "<" else b"MM"
    if tf.big:
        return mark + struct.pack(tf.byteorder + "HHHQ", 43, 8, 0, 0)
    return mark + struct.pack(tf.byteorder + "HI", 42, 0)


# ------------------------------------------------------------------------------------------------
# The format interface
# ------------------------------------------------------------------------------------------------
def identity(path: Path) -> dict:
    try:
        tf = read_structure(Path(path))
    except (struct.error, ValueError, OverflowError, MemoryError) as exc:
        raise FormatError(f"TIFF structure unreadable ({type(exc).__name__})") from None
    out: dict[str, str] = {}
    if tf.aperio:
        _, _, fields = aperio_fields(tf.pages[0].description)
        for key, value in fields:
            norm = re.sub(r"[\s_'.]+", "", key.lower())
            slot = APERIO_PATIENT_KEYS.get(norm)
            if slot and value and slot not in out:
                out[slot] = value
            if key.lower() == "date" and _date8(value):
                out.setdefault("study_date", _date8(value))
    return out


def companions(path: Path) -> list[Path]:
    return []


def extension(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    return suffix if suffix in (".svs", ".tif", ".tiff") else ".tif"


def _no_text(src: Path, keep: list[int]) -> None:
    """A plain TIFF's pages are released with their pixels as they are (scans, screenshots, photos
    of forms): one that shows text, or cannot be decoded to look, withholds the file.  So is a
    tiled TIFF whose first page has at most ``WSI_SCREENED_TILES`` tiles (a label or a scan saved
    as a few tiles, as DICOM whole-slide images of a few tiles are screened); larger tiled files
    are slide pyramids of tissue, not screened."""
    import tifffile

    from ..pixels.screen import page_with_text
    def page(t, i: int):
        def read():
            try:
                return t.pages[i].asarray()
            except ValueError:  # a codec tifffile lacks here (JPEG needs imagecodecs): Pillow's libtiff
                import numpy as np
                from PIL import Image
                with Image.open(src) as im:
                    im.seek(i)
                    return np.asarray(im.convert("RGB"))
        return read
    try:
        with tifffile.TiffFile(src) as t:
            found = page_with_text([page(t, i) for i in keep])
    except Exception as exc:  # a codec tifffile lacks, damaged strips
        raise FormatError(f"TIFF pixels cannot be decoded to screen them for burned-in text ({type(exc).__name__})") \
            from None
    if found is not None:
        raise FormatError(f"page {keep[found]} shows text (burned-in text in TIFF pixels is not removed)")


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    try:
        tf = read_structure(src)
        kinds = classify(tf)
        if all(kinds):
            raise FormatError("every page is a label, macro or associated image (nothing to release)")
        from ..pixels.policy import WSI_SCREENED_TILES
        if not tf.pages[0].tiled or len(tf.pages[0].blocks) <= WSI_SCREENED_TILES:
            _no_text(src, [i for i, kind in enumerate(kinds) if not kind])
        own = _own_values(tf, ctx)
        with open(src, "rb") as fh, Outputs() as out:
            tmp = out.path(dst)
            with open(tmp, "wb") as sink:
                w = _Writer(sink, fh, tf)
                w.write(_header(tf))
                kept = []
                for i, (page, kind) in enumerate(zip(tf.pages, kinds)):
                    if kind:
                        res.act(f"page {i} ({kind})", "removed")
                        for tag in TEXT_FOUND:
                            if page.has(tag):
                                res.found(NAMES[tag], page.text(tag))
                        continue
                    tags = page_tags(page, tf, ctx, res, own)
                    subs = []
                    for k, sp in enumerate(page.subifds):
                        if _reduced(sp, page):
                            subs.append((sp, page_tags(sp, tf, ctx, res, own)))
                        else:
                            res.act(f"page {i} SubIFD {k} (associated image)", "removed")
                    kept.append((page, tags, subs))
                pages = [q for p, _, subs in kept for q in (p, *(s for s, _ in subs))]
                w.replaced = _clean_blocks(fh, pages, res)
                # all image data first, in their original order and contiguity (ImageJ stacks are
                # read as one block), then the IFDs
                where = w.copy_blocks([b for q in pages for b in q.blocks])
                ifds = [w.page(p, tags, subs, where) for p, tags, subs in kept]
                for a, b in zip(ifds, ifds[1:]):
                    w._patch_next(a, b)
                first_at = 8 if tf.big else 4
                sink.seek(first_at)
                sink.write(struct.pack(tf.byteorder + ("Q" if tf.big else "I"), ifds[0]))
            res.outputs = out.finals
    except (struct.error, ValueError, OverflowError) as exc:
        raise FormatError(f"TIFF structure unreadable ({type(exc).__name__})") from None
    return res


FORMAT = Format(name="tiff", release_dir="tiff", identity=identity, companions=companions, scrub=scrub,
                extension=extension)
