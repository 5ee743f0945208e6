"""Inventory of an input tree: what every file is, whose it is, and where it goes in the release.

The walk reads only headers (DICOM up to group 0020), reuses the rows of an earlier inventory for
files whose size and mtime are unchanged, and groups DICOM into patient → study → series.  Every
file ends as ``status == "ok"`` (with a subject and a release path) or ``"quarantine"`` with a
one-line reason.  The table lives in the restricted folder: it holds original identifiers.
"""
from __future__ import annotations

import gzip
import json
import mmap
import os
import re
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from . import dicomio, formats, sniff
from .fsutil import RESTRICTED_FILE_MODE, display_path, write_if_changed
from .pseudonym import Pseudonymizer, patient_key

SUPPORTED = {"dicom"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
HEADER_TAGS = {
    0x00080005: "charset", 0x00080016: "sop_class", 0x00080018: "sop_uid", 0x00080020: "study_date",
    0x00080050: "accession", 0x00080060: "modality", 0x00100010: "patient_name",
    0x00100020: "patient_id", 0x00100021: "issuer", 0x00100030: "birth_date",
    0x0020000D: "study_uid", 0x0020000E: "series_uid", 0x00200011: "series_number",
    0x00200013: "instance_number",
}
STR_COLUMNS = ("relpath", "format", "status", "reason", "transfer_syntax", *[
    c for c in HEADER_TAGS.values() if c not in ("series_number", "instance_number")],
    "subject", "session", "series_label", "out_relpath", "src_id", "release_dir", "primary", "compression")
INT_COLUMNS = ("size", "mtime_ns", "ctime_ns", "series_number", "instance_number", "date_offset")
CACHED = ("relpath", "size", "mtime_ns", "ctime_ns", "format", "reason", "transfer_syntax", "compression",
          *HEADER_TAGS.values())


class InventoryError(RuntimeError):
    """The inventory cannot be built (a problem with the whole input, not one file)."""


@dataclass
class Inventory:
    """Rows (one dict per input file) and the subjects that have something to release."""

    input_dir: Path
    rows: list[dict]
    subjects: list[str] = field(default_factory=list)

    def by_subject(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = defaultdict(list)
        for r in self.rows:
            if r["status"] == "ok":
                out[r["subject"]].append(r)
        return out

    def quarantined(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "quarantine"]


# ------------------------------------------------------------------------------------------------
# Header reading
# ------------------------------------------------------------------------------------------------
def read_dicom_header(path: Path) -> dict:
    """Identity and grouping fields of a DICOM file (groups ≤ 0020 only), gzip-compressed or not;
    raises DicomError."""
    if sniff.is_gzip(path):
        out = _read_with_pydicom(path, None, opener=gzip.open)
        out["compression"] = "gzip"
        return out
    size = path.stat().st_size
    with open(path, "rb") as fp:
        meta, ts = dicomio._transfer_syntax(fp)
        encoding = dicomio.stream_encoding(ts)
        if encoding is None:
            return _read_with_pydicom(path, ts)
        body = fp.tell()
        implicit, little = encoding
        raw: dict[int, tuple[bytes, str | None]] = {}
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            walker = dicomio._Walker(mm, size, implicit, little)
            pos = body
            while pos < size:
                el = walker.element(pos)
                if el.tag > 0x0020FFFF:
                    break
                if el.tag in HEADER_TAGS and not el.undefined:
                    raw[el.tag] = (mm[el.vstart:el.vend], el.vr.decode("ascii") if el.vr else None)
                pos = el.end
    out = _fields_fast(raw, implicit, little)
    out["transfer_syntax"] = ts
    if not out.get("sop_class") and meta is not None:
        out["sop_class"] = str(meta.get("MediaStorageSOPClassUID", "") or "")
    return out


def _fields_fast(raw: dict[int, tuple[bytes, str | None]], implicit: bool, little: bool) -> dict:
    """Decode the identity fields; plain ASCII directly, anything else through pydicom's
    character-set handling."""
    if any(max(v, default=0) > 0x7F or b"\x1b" in v for v, _ in raw.values()):
        ds = Dataset()
        for tag, (value, vr) in raw.items():
            ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, implicit, little, True)
        return _fields(ds)
    out: dict = {}
    for tag, (value, _vr) in raw.items():
        name = HEADER_TAGS[tag]
        text = value.decode("ascii").strip("\x00 ")
        if name in ("series_number", "instance_number"):
            try:
                out[name] = int(text.split("\\")[0]) if text else None
            except ValueError:
                raise dicomio.DicomError(f"{name} is not an integer string") from None
        else:
            out[name] = text
    return out


def _read_with_pydicom(path: Path, ts: str | None, opener=open) -> dict:
    try:
        with opener(path, "rb") as fp:
            ds = pydicom.filereader.read_partial(fp, stop_when=_after_group_20, force=True)
    except Exception as exc:
        raise dicomio.DicomError(f"header unreadable: {type(exc).__name__}") from None
    if not len(ds) or ds.original_encoding[0] is None:
        raise dicomio.DicomError("no data elements (not a DICOM data set)")
    out = _fields(ds)
    meta_ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    out["transfer_syntax"] = ts or str(meta_ts or "")
    return out


def _after_group_20(tag, vr, length) -> bool:
    return tag.group > 0x0020


def _fields(ds: Dataset) -> dict:
    out: dict = {}
    try:
        if 0x00080005 in ds:
            convert_encodings(ds.SpecificCharacterSet)
        for tag, name in HEADER_TAGS.items():
            if tag not in ds:
                continue
            value = ds[tag].value
            if name in ("series_number", "instance_number"):
                out[name] = int(value) if value not in (None, "") else None
            elif name == "charset":
                out[name] = "\\".join(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else str(value or "")
            else:
                out[name] = str(value if value is not None else "").strip("\x00 ")
    except Exception as exc:
        raise dicomio.DicomError(f"identity attributes unreadable: {type(exc).__name__}") from None
    return out


# ------------------------------------------------------------------------------------------------
# Walking
# ------------------------------------------------------------------------------------------------
def _walk(input_dir: Path):
    """Yield (relpath, lstat or None, problem) for every entry below ``input_dir`` (sorted)."""
    for root, dirs, files in os.walk(input_dir, followlinks=False, onerror=None):
        dirs.sort()
        rel_root = Path(root).relative_to(input_dir)
        for d in list(dirs):
            full = Path(root) / d
            if full.is_symlink():
                dirs.remove(d)
                yield (rel_root / d).as_posix(), None, "symbolic link to a folder (not followed)"
            elif not os.access(full, os.R_OK | os.X_OK):
                dirs.remove(d)
                yield (rel_root / d).as_posix(), None, "folder not readable (permission denied)"
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            full = Path(root) / name
            try:
                st = full.lstat()
            except OSError as exc:
                yield rel, None, f"cannot stat file: {exc.strerror}"
                continue
            if stat.S_ISLNK(st.st_mode):
                yield rel, None, "symbolic link (not followed)"
            elif not stat.S_ISREG(st.st_mode):
                yield rel, None, "not a regular file"
            else:
                yield rel, st, None


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What says a file is the one examined before: size, modification and status-change times."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _examine(full: Path, rel: str, st: os.stat_result) -> dict:
    row = {"relpath": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "reason": ""}
    if st.st_size == 0:
        row.update(format="empty", reason="zero-byte file")
        return row
    try:
        fmt = sniff.sniff(full)
    except OSError as exc:
        row.update(format="unreadable", reason=f"file not readable: {exc.strerror}")
        return row
    row["format"] = fmt
    if fmt == "dicom":
        try:
            row.update(read_dicom_header(full))
        except dicomio.DicomError as exc:
            row["reason"] = str(exc)
        except OSError as exc:
            row["reason"] = f"file not readable: {exc.strerror}"
    elif fmt == "unknown":
        row["reason"] = _unknown_reason(rel)
    elif fmt in sniff.ARCHIVES:
        row["reason"] = (f"{fmt} archive: deidflow does not unpack archives (only gzip-compressed single DICOM files "
                         "are read); extract it into the input folder")
    elif fmt in formats.COMPANION_FORMATS:
        pass  # paired with its header in _assign_other
    elif formats.supported(fmt):
        _examine_other(full, row, fmt)
    elif fmt not in SUPPORTED:
        row["reason"] = f"{fmt}: this format is not yet de-identified by deidflow {__import__('deidflow').__version__}"
    return row


_COMPANION_SUFFIXES = {".img": "Analyze/NIfTI .img without its .hdr header",
                       ".rec": "Philips .REC without its .PAR header"}
IDENTITY_KEYS = ("patient_id", "patient_name", "birth_date", "study_date", "study_uid")


def _unknown_reason(rel: str) -> str:
    why = _COMPANION_SUFFIXES.get(os.path.splitext(rel)[1].lower())
    return why or "unknown format (not DICOM, NIfTI, Analyze, MINC, PAR/REC, twix, TIFF, MGH or JSON)"


def _examine_other(full: Path, row: dict, fmt: str) -> None:
    """Identity of a non-DICOM file from its header (see :mod:`deidflow.formats`)."""
    try:
        ident = formats.get(fmt).identity(full)
        row["out_ext"] = formats.get(fmt).extension(full)
    except formats.FormatError as exc:
        row["reason"] = f"{fmt}: {exc}"
        return
    except OSError as exc:
        row["reason"] = f"file not readable: {exc.strerror}"
        return
    except Exception as exc:  # a reader bug must not stop the inventory: quarantine the file
        row["reason"] = f"{fmt}: header unreadable ({type(exc).__name__})"
        return
    for k in IDENTITY_KEYS:
        if ident.get(k):
            row[k] = str(ident[k])


# ------------------------------------------------------------------------------------------------
# Grouping and release layout
# ------------------------------------------------------------------------------------------------
def _assign(rows: list[dict], pseudo: Pseudonymizer, unmapped: str,
            subject_pattern: re.Pattern | None = None, owner: dict[str, str] | None = None) -> None:
    """Validate DICOM rows, then give each ok row its subject, session, series and release path."""
    for r in rows:
        r.setdefault("status", "ok")
        if r.get("reason"):
            r["status"] = "quarantine"
            continue
        if r["format"] != "dicom":
            continue
        if r.get("sop_class") == DICOMDIR_CLASS:
            _quarantine(r, "DICOMDIR index file (the release has its own layout)")
        elif not r.get("patient_id"):
            _quarantine(r, "no PatientID (0010,0020): the patient cannot be identified")
        elif not r.get("sop_uid"):
            _quarantine(r, "no SOPInstanceUID (0008,0018)")
        elif not r.get("study_uid") or not r.get("series_uid"):
            _quarantine(r, "no StudyInstanceUID or SeriesInstanceUID")
        elif pseudo.mapping and r["patient_id"].strip() not in pseudo.mapping and unmapped == "quarantine":
            _quarantine(r, "PatientID not in the pseudonym mapping file")
    ok = [r for r in rows if r["status"] == "ok" and r["format"] == "dicom"]
    # One patient per series, one file per SOPInstanceUID.
    patients_of_series: dict[str, set] = defaultdict(set)
    for r in ok:
        patients_of_series[r["series_uid"]].add(patient_key(r["patient_id"], r.get("issuer", "")))
    # Of several files with one SOPInstanceUID the largest is released (a cut-off copy is smaller).
    kept_sop: dict[str, dict] = {}
    for r in sorted(ok, key=lambda r: (-(r["size"] or 0), r["relpath"])):
        n = len(patients_of_series[r["series_uid"]])
        if n > 1:
            _quarantine(r, f"series holds {n} different patients (PatientID differs between its files)")
        elif r["sop_uid"] in kept_sop:
            _quarantine(r, "duplicate SOPInstanceUID (a file with the same UID and at least its size is released)")
        else:
            kept_sop[r["sop_uid"]] = r
    ok = [r for r in ok if r["status"] == "ok"]
    owner = {} if owner is None else owner
    series_members: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        pkey = patient_key(r["patient_id"], r.get("issuer", ""))
        r["subject"] = pseudo.subject(pkey, r["patient_id"])
        if owner.setdefault(r["subject"], pkey) != pkey:
            raise InventoryError(f"two patients share the pseudonym {r['subject']}: raise pseudonym.length")
        r["date_offset"] = pseudo.date_offset(pkey)
        r["session"] = pseudo.session(r["study_uid"])
        modality = re.sub(r"[^A-Za-z0-9]", "", r.get("modality") or "") or "OT"
        number = r.get("series_number")
        r["series_label"] = f"{modality}{'' if number is None else f'{number:03d}'}-{pseudo.series(r['series_uid'])}"
        series_members[r["series_uid"]].append(r)
    for members in series_members.values():
        members.sort(key=lambda r: (r.get("instance_number") is None, r.get("instance_number") or 0,
                                    pseudo.uid(r["sop_uid"])))
        for i, r in enumerate(members, start=1):
            r["out_relpath"] = f"{r['session']}/{r['series_label']}/{i:04d}.dcm"
    for r in rows:
        r["src_id"] = pseudo.source_id(r["relpath"])
        if r.get("status") == "ok" and r["format"] == "dicom":
            r["release_dir"] = "sourcedata/dicom"
    _assign_other(rows, pseudo, unmapped, subject_pattern, owner)


_MASKED_ID = re.compile(r"^[xX*0\s_-]*$")
_HDR_PAIRED = {"analyze", "nifti1", "nifti2"}


def _subject_identity(r: dict, pattern: re.Pattern | None) -> tuple[str, str]:
    """(identity string, where it came from) of a non-DICOM file: header identity, else the
    configured ``subject_pattern``'s named group, else the top-level folder (a file at the top
    level: its name without extension)."""
    for key in ("patient_id", "patient_name"):
        v = (r.get(key) or "").strip()
        if v and not _MASKED_ID.match(v):
            return v, "header"
    rel = display_path(r["relpath"])
    if pattern is not None:
        m = pattern.search(rel)
        if m:
            groups = [g for g in m.groupdict().values() if g]
            if groups:
                return groups[0], "pattern"
    parts = rel.split("/")
    return (parts[0] if len(parts) > 1 else formats.base.stem_of(parts[0])), "folder"


def _sibling(index: dict[str, dict], rel: str, suffixes: tuple[str, ...]) -> dict | None:
    base = rel[: -len(os.path.splitext(rel)[1])] if os.path.splitext(rel)[1] else rel
    for suf in suffixes:
        hit = index.get(base + suf)
        if hit is not None:
            return hit
    return None


def _assign_other(rows: list[dict], pseudo: Pseudonymizer, unmapped: str, pattern: re.Pattern | None,
                  owner: dict[str, str]) -> None:
    """Subjects and release paths of non-DICOM files; companions (.img, .REC) and BIDS JSON
    sidecars follow their image; anything unpaired is quarantined with a reason."""
    index = {r["relpath"]: r for r in rows}
    claimed: set[str] = set()
    primaries = [r for r in rows if r.get("status") == "ok" and r["format"] not in ("dicom", "json")
                 and r["format"] not in formats.COMPANION_FORMATS]
    for r in primaries:
        comp = None
        if r["format"] in _HDR_PAIRED and not r.get("out_ext", "").startswith(".nii"):
            comp = _sibling(index, r["relpath"], (".img", ".IMG", ".Img"))
            if comp is None or comp["format"] != "img":
                _quarantine(r, f"{r['format']}: .hdr without its .img image file")
                continue
        elif r["format"] == "parrec":
            comp = _sibling(index, r["relpath"], (".REC", ".rec", ".Rec"))
            if comp is None or comp["format"] != "rec":
                _quarantine(r, "parrec: PAR header without its REC image file")
                continue
        ident, _source = _subject_identity(r, pattern)
        if pseudo.mapping and ident not in pseudo.mapping and unmapped == "quarantine":
            _quarantine(r, "subject identity not in the pseudonym mapping file")
            continue
        pkey = patient_key(ident, "")
        subject = pseudo.subject(pkey, ident)
        if owner.setdefault(subject, pkey) != pkey:
            raise InventoryError(f"two patients share the pseudonym {subject}: raise pseudonym.length")
        fmt = formats.get(r["format"])
        stem = r["src_id"]
        r.update(subject=subject, patient_id=ident, date_offset=pseudo.date_offset(pkey),
                 release_dir=f"sourcedata/{fmt.release_dir}", out_relpath=stem + r.get("out_ext", ""), primary="")
        if comp is not None:
            claimed.add(comp["relpath"])
            ext = ".img" if r["format"] in _HDR_PAIRED else ".rec"
            comp.update(status="ok", reason="", subject=subject, patient_id=ident, date_offset=r["date_offset"],
                        release_dir=r["release_dir"], out_relpath=stem + ext, primary=r["relpath"])
    by_stem: dict[str, dict] = {}
    for r in primaries:
        if r.get("status") == "ok":
            by_stem.setdefault(formats.base.stem_of(r["relpath"]).lower(), r)
    for r in rows:
        if r["format"] in formats.COMPANION_FORMATS and r["relpath"] not in claimed:
            why = _COMPANION_SUFFIXES.get(os.path.splitext(r["relpath"])[1].lower(), "companion file without its header")
            _quarantine(r, why.replace("without its", "whose") + " was quarantined" if _sibling_exists(index, r)
                        else why)
        elif r["format"] == "json" and r.get("status") == "ok":
            img = by_stem.get(formats.base.stem_of(r["relpath"]).lower())
            if img is None:
                _quarantine(r, "json: not a BIDS sidecar (no NIfTI/Analyze/MINC/MGH/PAR image with its name beside it)")
                continue
            r.update(subject=img["subject"], patient_id=img["patient_id"], date_offset=img["date_offset"],
                     release_dir=img["release_dir"], out_relpath=img["src_id"] + ".json", primary=img["relpath"])


def _sibling_exists(index: dict[str, dict], r: dict) -> bool:
    return _sibling(index, r["relpath"], (".hdr", ".HDR", ".Hdr", ".PAR", ".par", ".Par")) is not None


def _quarantine(row: dict, reason: str) -> None:
    row["status"] = "quarantine"
    row["reason"] = reason


def build(input_dir: Path, pseudo: Pseudonymizer, *, previous: Path | None = None,
          unmapped: str = "quarantine", subject_pattern: str = "") -> Inventory:
    """Inventory ``input_dir``; rows of ``previous`` (an inventory.parquet) are reused for files
    whose size, modification and status-change times are unchanged, so re-runs only read new or
    changed headers (a file copied over another with its times kept, ``cp -p``, has a new ctime)."""
    input_dir = Path(input_dir).resolve()
    if not input_dir.is_dir():
        raise InventoryError(f"input folder {input_dir} does not exist or is not a folder")
    cache = _load_cache(previous) if previous else {}
    rows = []
    for rel, st, problem in _walk(input_dir):
        if problem:
            rows.append({"relpath": rel, "format": "unreadable" if st is None else "other", "reason": problem,
                         "size": None, "mtime_ns": None, "ctime_ns": None})
            continue
        hit = cache.get(display_path(rel))
        if hit and hit["format"] == "dicom" and (hit["size"], hit["mtime_ns"], hit["ctime_ns"]) == _stamp(st):
            rows.append({**hit, "relpath": rel})
        else:
            rows.append(_examine(input_dir / rel, rel, st))
    _assign(rows, pseudo, unmapped, compile_subject_pattern(subject_pattern))
    subjects = sorted({r["subject"] for r in rows if r["status"] == "ok" and r.get("subject")})
    return Inventory(input_dir, rows, subjects)


def compile_subject_pattern(pattern: str) -> re.Pattern | None:
    """The ``formats.subject_pattern`` regex (searched in input-relative paths of non-DICOM files
    without header identity); it must have a named group, whose match is the subject identity."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise InventoryError(f"config key formats.subject_pattern: not a regular expression ({exc})") from None
    if not compiled.groupindex:
        raise InventoryError("config key formats.subject_pattern: needs a named group, e.g. (?P<subject>[^/]+)")
    return compiled


def _load_cache(path: Path) -> dict[str, dict]:
    if not Path(path).is_file():  # a first run: pq.read_table would import pyarrow.dataset (0.3 s) to fail
        return {}
    try:
        table = pq.ParquetFile(path).read(columns=list(CACHED))
    except (OSError, pa.ArrowInvalid, KeyError):
        return {}
    return {r["relpath"]: r for r in table.to_pylist()}


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def to_table(inv: Inventory) -> pa.Table:
    cols = {}
    for c in STR_COLUMNS:
        conv = display_path if c == "relpath" else str
        cols[c] = pa.array([conv(r.get(c) or "") for r in inv.rows], pa.string())
    for c in INT_COLUMNS:
        cols[c] = pa.array([r.get(c) for r in inv.rows], pa.int64())
    return pa.table(cols)


def write(inv: Inventory, restricted: Path, units: dict[str, list[str]] | None = None) -> Path:
    """Write ``inventory.parquet`` and one manifest per job unit (default: one per subject) into
    ``restricted``; files whose content is unchanged keep their mtime, so Snakemake re-runs only
    what changed."""
    restricted = Path(restricted)
    sink = pa.BufferOutputStream()
    pq.write_table(to_table(inv), sink, compression="zstd")
    target = restricted / "inventory.parquet"
    write_if_changed(target, sink.getvalue().to_pybytes(), RESTRICTED_FILE_MODE)
    mdir = restricted / "manifests"
    mdir.mkdir(mode=0o700, exist_ok=True)
    by_subject = inv.by_subject()
    for unit, subjects in (units or {s: [s] for s in inv.subjects}).items():
        manifest = {"unit": unit, "input_dir": str(inv.input_dir),
                    "subjects": [_subject_manifest(s, by_subject[s]) for s in subjects]}
        write_if_changed(mdir / f"{unit}.json", json.dumps(manifest, indent=1).encode(), RESTRICTED_FILE_MODE)
    return target


def _subject_manifest(subject: str, rows: list[dict]) -> dict:
    return {"subject": subject, "date_offset": rows[0]["date_offset"],
            "files": [_file_manifest(r) for r in sorted(rows, key=lambda r: (r.get("release_dir") or "",
                                                                             r["out_relpath"]))]}


def _file_manifest(r: dict) -> dict:
    out = {k: r.get(k) for k in ("relpath", "size", "mtime_ns", "ctime_ns", "src_id", "out_relpath", "format")}
    if r.get("compression"):
        out["compression"] = r["compression"]  # the dicom job reads a decompressed copy (restricted)
    if r["format"] != "dicom":  # where it goes, what it follows, and the identity to clean text of
        out.update(release_dir=r.get("release_dir"), primary=r.get("primary") or "",
                   known=[r[k] for k in ("patient_id", "patient_name", "birth_date") if r.get(k)])
    return out


def files_per_subject(inv: Inventory) -> dict[str, int]:
    return {s: len(rows) for s, rows in inv.by_subject().items()}


def read(restricted: Path, columns: list[str] | None = None) -> pa.Table:
    """``inventory.parquet`` of a restricted folder (``ParquetFile``: ``pq.read_table`` would
    import ``pyarrow.dataset``, 0.3 s of every job that reads it)."""
    return pq.ParquetFile(Path(restricted) / "inventory.parquet").read(columns=columns)
