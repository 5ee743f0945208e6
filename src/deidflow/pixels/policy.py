"""Which objects have their pixel data cleaned: the selection table and the device region rules.

Both are data files (``data/pixel_policy.tsv``, ``data/pixel_regions.tsv``); a site can replace the
selection table and add region rows with files of the same columns (``pixels.selection_file``,
``pixels.regions_file``).  Decisions use only header values the DICOM engine captured from the
original file (see :data:`deidflow.pixels.clean.CAPTURE_TAGS`), so selection costs no extra read.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

DATA = Path(__file__).resolve().parents[1] / "data"
ACTIONS = ("clean", "skip", "wsi_label", "wsi_overview")  # of the table; decide() may also say "withhold"


class PolicyError(ValueError):
    """A selection or region table cannot be used (the message names the file and line)."""


@dataclass(frozen=True)
class Rule:
    modalities: frozenset[str] | None
    sop_classes: frozenset[str] | None
    image_type: str | None
    burned_in: str | None  # YES / NO / ABSENT
    action: str
    why: str

    def matches(self, h: "HeaderFacts") -> bool:
        return ((self.modalities is None or h.modality in self.modalities)
                and (self.sop_classes is None or h.sop_class in self.sop_classes)
                and (self.image_type is None or self.image_type in h.image_type)
                and (self.burned_in is None or self.burned_in == h.burned_in))


@dataclass(frozen=True)
class Decision:
    action: str  # one of ACTIONS
    why: str


@dataclass(frozen=True)
class HeaderFacts:
    """The header values selection and region rules look at (upper-cased, stripped)."""

    modality: str = ""
    sop_class: str = ""
    image_type: tuple[str, ...] = ()
    burned_in: str = "ABSENT"
    manufacturer: str = ""
    model: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    label_in_image: str = ""  # SpecimenLabelInImage (whole-slide images)

    @classmethod
    def from_dataset(cls, ds) -> "HeaderFacts":
        def text(kw: str) -> str:
            try:
                v = ds.get(kw)
            except Exception:  # an undecodable value counts as absent
                return ""
            return "" if v is None else str(v).strip().upper()

        def number(kw: str) -> int:
            try:
                return int(ds.get(kw) or 0)
            except Exception:
                return 0
        try:
            it = ds.get("ImageType") or ()
            image_type = tuple(str(v).strip().upper() for v in ([it] if isinstance(it, str) else it))
        except Exception:
            image_type = ()
        return cls(modality=text("Modality"), sop_class=text("SOPClassUID"), image_type=image_type,
                   burned_in=text("BurnedInAnnotation") or "ABSENT", manufacturer=text("Manufacturer"),
                   model=text("ManufacturerModelName"), rows=number("Rows"), columns=number("Columns"),
                   frames=number("NumberOfFrames") or 1, label_in_image=text("SpecimenLabelInImage"))


def raw_key(header, tags: tuple[int, ...]) -> tuple:
    """The stored bytes of ``tags`` in ``header`` (not decoded): files of a series repeat them,
    so a decision made from those values can be remembered under this key."""
    raw = getattr(header, "_dict", {})
    return tuple(_hashable(getattr(raw.get(t), "value", None)) for t in tags)


def _hashable(value):
    """A raw value as it is, or, for a data set pydicom decoded (deflated files are read whole),
    a multi-valued element as a tuple of its values' text."""
    try:
        hash(value)
        return value
    except TypeError:
        return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") \
            else repr(value)


def _rows(path: Path) -> Iterable[tuple[int, dict]]:
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1)
             if line.strip() and not line.startswith("#")]
    if not lines:
        raise PolicyError(f"{path}: no header line")
    header = lines[0][1].split("\t")
    for lineno, line in lines[1:]:
        cells = next(csv.reader([line], delimiter="\t"))
        if len(cells) < len(header) - 1:  # the last column (a note) may be missing
            raise PolicyError(f"{path} line {lineno}: expected {len(header)} tab-separated columns")
        yield lineno, dict(zip(header, [c.strip() for c in cells]))


def _set(cell: str) -> frozenset[str] | None:
    return None if cell in ("", "*") else frozenset(v.strip().upper() for v in cell.split("|"))


@lru_cache(maxsize=8)
def load_policy(path: str = "") -> tuple[Rule, ...]:
    """The selection table (the bundled one unless ``path`` names another)."""
    p = Path(path) if path else DATA / "pixel_policy.tsv"
    rules = []
    for lineno, r in _rows(p):
        action = r.get("action", "")
        if action not in ACTIONS:
            raise PolicyError(f"{p} line {lineno}: action must be one of {', '.join(ACTIONS)}")
        bi = r.get("burned_in", "*").upper()
        if bi not in ("*", "YES", "NO", "ABSENT"):
            raise PolicyError(f"{p} line {lineno}: burned_in must be YES, NO, absent or *")
        it = r.get("image_type", "*").upper()
        rules.append(Rule(_set(r.get("modality", "*")), _set(r.get("sop_class", "*")),
                          None if it in ("", "*") else it, None if bi == "*" else bi, action, r.get("why", "")))
    if not rules:
        raise PolicyError(f"{p}: no rules")
    return tuple(rules)


def decide(h: HeaderFacts, mode: str, rules: tuple[Rule, ...]) -> Decision:
    """What to do with one object under ``pixels.clean`` = ``mode`` (auto, always, off).

    ``always`` cleans every image that is not a whole-slide pyramid level; the WSI rows
    (label and overview handling, pyramid kept) apply in every mode but ``off``."""
    if mode == "off":
        return Decision("skip", "pixels.clean is off")
    for rule in rules:
        if rule.matches(h):
            if mode == "always" and rule.action == "skip" and h.sop_class != WSI_CLASS:
                return Decision("clean", "pixels.clean is always")
            if rule.action == "skip" and h.sop_class == WSI_CLASS and "YES" in (h.burned_in, h.label_in_image):
                return _wsi_with_label(h)
            return Decision(rule.action, rule.why)
    return Decision("clean" if mode == "always" else "skip", "no rule matched")


def _wsi_with_label(h: HeaderFacts) -> Decision:
    """A whole-slide image that is neither LABEL nor OVERVIEW but says its pixels show the slide
    label (SpecimenLabelInImage) or burned-in annotation: one frame is cleaned like any image
    with text; a tiled pyramid level (text may cross its tiles, which are not cleaned) is
    withheld."""
    if h.frames > 1:
        return Decision("withhold", "a whole-slide pyramid level that declares the slide label or burned-in "
                                    "annotation in its pixels (its tiles are not cleaned)")
    return Decision("clean", "a whole-slide image that declares the slide label or burned-in annotation in its pixels")


def wsi_level(h: HeaderFacts) -> bool:
    """A whole-slide pyramid level: more tiles than :data:`WSI_SCREENED_TILES`, which show tissue,
    never screened.  A whole-slide image of one frame (a thumbnail, or a label stored under another
    image type) or of a few tiles (a label or overview stored as tiles that does not say so) is
    screened like any image."""
    return h.sop_class == WSI_CLASS and h.frames > WSI_SCREENED_TILES


def tiled_wsi(h: HeaderFacts) -> bool:
    """A whole-slide image stored as tiles (text may cross them, and tiles are not cleaned)."""
    return h.sop_class == WSI_CLASS and h.frames > 1


WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
WSI_SCREENED_TILES = 8  # every tile of such an image is screened (screen.SMALL_SERIES)


@dataclass(frozen=True)
class Region:
    manufacturer: str
    model: str
    rows: int | None
    columns: int | None
    box: tuple[int, int, int, int]
    note: str

    def matches(self, h: HeaderFacts) -> bool:
        return ((self.manufacturer == "*" or self.manufacturer in h.manufacturer)
                and (self.model == "*" or self.model in h.model)
                and (self.rows is None or self.rows == h.rows)
                and (self.columns is None or self.columns == h.columns))


@lru_cache(maxsize=8)
def load_regions(extra: str = "") -> tuple[Region, ...]:
    """The bundled device region rules plus those in ``extra`` (a file with the same columns)."""
    out = []
    for p in [DATA / "pixel_regions.tsv", *([Path(extra)] if extra else [])]:
        for lineno, r in _rows(p):
            try:
                box = tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1"))
                rows = None if r["rows"] in ("", "*") else int(r["rows"])
                cols = None if r["columns"] in ("", "*") else int(r["columns"])
            except (KeyError, ValueError):
                raise PolicyError(f"{p} line {lineno}: rows, columns, x0, y0, x1, y1 must be integers") from None
            if box[2] <= box[0] or box[3] <= box[1]:
                raise PolicyError(f"{p} line {lineno}: empty rectangle")
            out.append(Region(r["manufacturer"].upper() or "*", r["model"].upper() or "*", rows, cols, box,
                              r.get("note", "")))
    return tuple(out)


def regions_for(h: HeaderFacts, regions: tuple[Region, ...]) -> list[Region]:
    return [r for r in regions if r.matches(h)]


SERIES_MODES = ("auto", "always", "off")


@lru_cache(maxsize=8)
def load_series_overrides(path: str = "") -> dict[str, tuple[str, str]]:
    """``pixels.series_file``: per-series modes, ``{SeriesInstanceUID: (mode, note)}`` from a
    table with the columns ``series_uid``, ``clean`` (auto, always, off) and ``note``.  The UIDs
    are the original ones, so the table lives with the site's configuration, not on a command
    line."""
    if not path:
        return {}
    out = {}
    p = Path(path)
    for lineno, r in _rows(p):
        uid, mode = r.get("series_uid", ""), r.get("clean", "").lower()
        if not uid or mode not in SERIES_MODES:
            raise PolicyError(f"{p} line {lineno}: needs series_uid and clean ({', '.join(SERIES_MODES)})")
        out[uid] = (mode, r.get("note", ""))
    return out


def check_config(settings: Mapping) -> None:
    """Configuration check (before any job runs): the tables load and, unless cleaning is off,
    the OCR models are installed.  Raises PolicyError, OSError or OcrUnavailable."""
    if settings.get("clean") in (None, False, "off"):
        return
    load_policy(settings.get("selection_file") or "")
    load_regions(settings.get("regions_file") or "")
    load_series_overrides(settings.get("series_file") or "")
    from .ocr import model_files
    model_files()
