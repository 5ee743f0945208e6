"""No original identifier survives a release of real, public DICOM (an independent byte scan).

Acceptance criterion under test: on the ../shared/data DICOM (dcm_qa_xa30, dcm_qa_decubitus,
jsl_pseudo_phi, highdicom) and pydicom's bundled files, no original PatientName, PatientID, birth
date, institution name/address, station name, device serial number, accession number or UID
survives anywhere in the release, and every output file parses with pydicom.

How the test works (it trusts nothing the library reports about values):

* The release is built with the library itself (``inventory.build`` → ``inventory.write`` → the
  DICOM job: ``release.deidentify_unit`` per job unit, or ``release.deidentify_subject`` per
  subject in the older API), straight from the read-only input folder, with the Basic Profile and
  private attributes removed (``SETTINGS``), which is what the criterion is about.
* The *original* identifiers are collected independently with pydicom from every input DICOM file,
  at any depth (``Dataset.iterall`` over the data set and its file meta): see
  :func:`collect_identifiers` for the exact attributes and for the rule that leaves out values too
  short or too generic to be searched for as byte strings.
* Every byte of every output file, and every output path name, is searched for every identifier of
  the whole input folder (not only the identifiers of the file's own source), encoded as
  UTF-8/ASCII and as latin-1.  A hit names the output file, the attribute the value came from, the
  value, the byte offset and the surrounding bytes (this is public test data, printing is fine).
* Besides the scan: every output file parses with ``pydicom.dcmread`` without ``force`` (128-byte
  preamble + ``DICM``, file meta whose MediaStorageSOPInstanceUID equals the SOPInstanceUID), every
  input file is either released or quarantined with a reason (nothing is dropped silently), and the
  pixel data of every released file is byte-identical to its source (output → source through the
  inventory row, cross-checked against the audit's ``source`` id).

The end-to-end test runs the real CLI (``python -m deidflow.cli run``) over
``dcm_qa_decubitus/In`` and also scans the Snakemake bookkeeping folder (``.snakemake`` in the
restricted folder, where the CLI starts Snakemake) for identifiers and original file/folder names.

Beyond the criterion's default settings, the same scan runs with the clean options
(clean_descriptors, clean_structured_content, clean_graphics) and with ``private: safe``.  The
two leaks it found (patient names in cleaned descriptions; original UIDs and the device serial
inside Siemens CSA blobs kept by ``private: safe``) are fixed in the library and guarded here.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from deidflow import inventory, release
from deidflow.pseudonym import Pseudonymizer

from .conftest import assert_finished

SETTINGS = {"options": [], "private": "remove", "overrides": [], "pseudonym_length": 8,
            "date_offset_days": [-365, -1], "mapping_csv": "", "key_file": ""}

PYDICOM_TEST_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"

# ------------------------------------------------------------------------------------------------
# Which original values are searched for
# ------------------------------------------------------------------------------------------------
# Text attributes whose values must not survive (matched case-insensitively on word boundaries).
TEXT_KEYWORDS = ("PatientID", "OtherPatientIDs", "InstitutionName", "InstitutionAddress",
                 "StationName", "DeviceSerialNumber", "AccessionNumber")
# Values below this length are left out: a 1-3 character string ("2", "ID1", "204") is found by
# chance in any binary file and says nothing.  PatientName components are the exception: they are
# searched from 3 characters on, always on word boundaries.
MIN_LEN = 4
MIN_NAME_PART = 3
# Placeholders that de-identified or test data use instead of a real value ("Test^Patient" in
# highdicom, "Lastname^Firstname" in pydicom's RT files): ordinary English words that also occur
# in kept, non-identifying text such as "Image Position Patient" or "test segmentation of …".
GENERIC = {"", "^", "ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "REMOVED", "NONE", "NULL",
           "UNKNOWN", "N/A", "NA", "TEST", "PATIENT", "PHANTOM", "NAME", "LAST", "FIRST",
           "LASTNAME", "FIRSTNAME", "MIDDLE", "MID", "PRE"}
# Kept, non-identifying attributes of the same file: a candidate value that also occurs in one of
# them (as a word) cannot be told apart from it in the release (pydicom's MR_small has
# InstitutionName "TOSHIBA" and Manufacturer "TOSHIBA_MEC"; rtplan has InstitutionName "Here" and
# ManufacturerModelName "Treatment Planning System name here").  Coded (CS) values likewise.
EQUIPMENT_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")
# Inside the pixel data (which is checked to be byte-identical to the source), values shorter than
# this many bytes can occur by chance in compressed or binary image bytes ("Mr1" in a JPEG 2000
# code stream): such hits are counted and reported, not failed.  Longer values (UIDs, full names,
# addresses, 8-digit dates) fail wherever they are.
PIXEL_CHANCE_MAX = 8
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
_ALNUM = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_DIGITS = frozenset(b"0123456789")


@dataclass(frozen=True)
class Ident:
    """One original value to look for.

    mode: ``uid``   – exact byte substring (a trailing NUL pad is covered, since the value without
                      it is a substring of the value with it);
          ``word``  – case-insensitive, and the match must not touch a letter or digit on either
                      side (so the name part MARY does not hit PRIMARY);
          ``digits``– all-digit values: the match must not touch a digit on either side (so an
                      ID 67093 is not "found" inside the random decimal digits of a new 2.25 UID,
                      but is found inside an old UID 1.3.12.2.1107.5.2.43.67093.2022…);
          ``date``  – birth dates: no digit right before the match (a date at the start of a DT
                      value still hits).
    """

    kind: str
    value: str
    mode: str

    def needles(self) -> list[bytes]:
        forms = []
        for enc in ("utf-8", "latin-1"):
            try:
                b = self.value.encode(enc)
            except UnicodeEncodeError:
                continue
            if self.mode == "word":
                b = b.lower()
            if b not in forms:
                forms.append(b)
        return forms


def _str_values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [s for v in value for s in _str_values(v)]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return [str(value).strip("\x00 ")]


def _uid_excluded(keyword: str) -> bool:
    # *ClassUID (incl. ReferencedSOPClassUIDInFile), TransferSyntaxUID, ImplementationClassUID
    return "ClassUID" in keyword or keyword.endswith("SyntaxUID")


def _is_generic(value: str) -> bool:
    return value.strip("^= ").upper() in GENERIC


def collect_identifiers(path: Path, *, excluded: Counter | None = None) -> set[Ident]:
    """The original identifying values of one input file (any depth, file meta included).

    * PatientName: the whole value (≥ 4 characters) and each component (split on ``^``, ``=``
      and white space) of ≥ 3 characters, as ``word``.
    * PatientID, OtherPatientIDs, InstitutionName, InstitutionAddress, StationName,
      DeviceSerialNumber, AccessionNumber: the whole value (≥ 4 characters) as ``word``, or as
      ``digits`` when it is all digits.
    * PatientBirthDate: ``date``.
    * Every UI value that is not a registered UID (``pydicom.uid.UID_dictionary``) and does not
      belong to a ``*ClassUID``/``*TransferSyntaxUID``/``ImplementationClassUID`` attribute: ``uid``.

    Left out (counted in ``excluded``): values shorter than the limits above, the generic
    placeholders in ``GENERIC``, name parts/values that equal a coded (CS) value of the same
    file (dcm_qa_decubitus names its patients "HFS"/"HFP", the same string as their
    PatientPosition: finding HFS in the release would prove nothing), and values that occur as a
    word in the same file's Manufacturer, ManufacturerModelName or SoftwareVersions.
    """
    excluded = excluded if excluded is not None else Counter()
    ds = pydicom.dcmread(path, force=True)
    elements = list(ds.iterall())
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        elements += list(meta.iterall())
    coded = {v.upper() for e in elements if e.VR == "CS" for v in _str_values(e.value)}
    equipment = [v.lower() for e in elements if e.keyword in EQUIPMENT_KEYWORDS
                 for v in _str_values(e.value)]
    out: set[Ident] = set()

    def in_equipment(value: str) -> bool:
        probe = Ident("probe", value, "word")
        return any(scan_bytes(t.encode("utf-8", "replace"), [probe], "") for t in equipment)

    def add_text(kind: str, value: str, minimum: int) -> None:
        if not value:
            return
        if (_is_generic(value) or len(value) < minimum or value.upper() in coded
                or in_equipment(value)):
            excluded[f"{kind}={value!r}"] += 1
            return
        out.add(Ident(kind, value, "digits" if value.isdigit() else "word"))

    for e in elements:
        kw = e.keyword or ""
        if e.VR == "UI":
            for v in _str_values(e.value):
                if not v or v in UID_dictionary or _uid_excluded(kw):
                    continue
                if len(v) < MIN_LEN:
                    excluded[f"{kw or e.tag}={v!r}"] += 1
                    continue
                out.add(Ident(kw or str(e.tag), v, "uid"))
        elif kw == "PatientName":
            for v in _str_values(e.value):
                add_text("PatientName", v, MIN_LEN)
                for part in re.split(r"[\^=\s]+", v):
                    if part != v:
                        add_text("PatientName part", part, MIN_NAME_PART)
        elif kw == "PatientBirthDate":
            for v in _str_values(e.value):
                if len(v) < MIN_LEN:
                    continue
                out.add(Ident("PatientBirthDate", v, "date"))
        elif kw in TEXT_KEYWORDS:
            for v in _str_values(e.value):
                add_text(kw, v, MIN_LEN)
    return out


# ------------------------------------------------------------------------------------------------
# Scanning
# ------------------------------------------------------------------------------------------------
@dataclass
class Hit:
    where: str
    ident: Ident
    offset: int
    context: bytes
    in_pixels: bool = False

    @property
    def chance(self) -> bool:
        """A short value inside (verified, source-identical) pixel data: a chance match."""
        return self.in_pixels and len(self.ident.value.encode("utf-8")) < PIXEL_CHANCE_MAX

    def __str__(self) -> str:
        where = " (inside pixel data)" if self.in_pixels else ""
        return (f"{self.where} @ byte {self.offset}{where}: {self.ident.kind} {self.ident.value!r} "
                f"({self.ident.mode}) in …{self.context!r}…")


def _bounded(hay: bytes, start: int, end: int, mode: str) -> bool:
    before = hay[start - 1] if start > 0 else None
    after = hay[end] if end < len(hay) else None
    if mode == "word":
        return before not in _ALNUM and after not in _ALNUM
    if mode == "digits":
        return before not in _DIGITS and after not in _DIGITS
    if mode == "date":
        return before not in _DIGITS
    return True


def scan_bytes(data: bytes, idents, where: str) -> list[Hit]:
    hits: list[Hit] = []
    lower = None
    for ident in idents:
        if ident.mode == "word" and lower is None:
            lower = data.lower()  # ASCII-only lowering: offsets stay the same
        hay = lower if ident.mode == "word" else data
        for needle in ident.needles():
            pos = hay.find(needle)
            while pos != -1:
                if _bounded(hay, pos, pos + len(needle), ident.mode):
                    hits.append(Hit(where, ident, pos, data[max(0, pos - 40):pos + len(needle) + 40]))
                pos = hay.find(needle, pos + 1)
    return hits


@dataclass
class ScanStats:
    files: int = 0
    bytes: int = 0
    paths: int = 0
    chance_hits: list = field(default_factory=list)


def inflated_body(data: bytes) -> bytes | None:
    """The inflated data set of a Deflated Explicit VR Little Endian Part-10 file, else None: a
    deflated release file must be scanned after inflating, or a surviving value would be hidden."""
    if data[128:132] != b"DICM" or pydicom.uid.DeflatedExplicitVRLittleEndian.encode() not in data[132:1024]:
        return None
    # file meta: explicit VR little endian, starting with (0002,0000) UL group length
    assert data[132:136] == b"\x02\x00\x00\x00", "file meta without group length"
    end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[end:])


def scan_file_bytes(data: bytes, idents, where: str) -> list[Hit]:
    """Raw bytes, plus the inflated data set of a deflated file."""
    hits = scan_bytes(data, idents, where)
    body = inflated_body(data)
    if body is not None:
        hits += scan_bytes(body, idents, f"{where} (inflated data set)")
    return hits


def pixel_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the top-level pixel data values of a Part-10 file (empty if none, or if the
    file cannot be parsed or is deflated, where file offsets do not match the parsed stream)."""
    try:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian:
            return []
    except Exception:
        return []
    out = []
    for tag in PIXEL_TAGS:
        raw = ds.get_item(tag)
        if raw is not None and getattr(raw, "value_tell", None) is not None and raw.value:
            out.append((raw.value_tell, raw.value_tell + len(raw.value)))
    return out


def _b64_name(name: str) -> bytes | None:
    """Snakemake names its metadata files after the base64 of the output path: decode them."""
    try:
        raw = base64.b64decode(name, validate=True)
        raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return raw


def scan_tree(root: Path, idents, stats: ScanStats | None = None, *, names_too=()) -> list[Hit]:
    """Every byte of every file below ``root`` and every path name (relative to ``root``; names
    that are base64, like Snakemake's metadata files, are also scanned decoded).

    ``names_too``: extra literal strings (original file or folder names) searched for like
    ``uid`` identifiers.
    """
    stats = stats if stats is not None else ScanStats()
    idents = list(idents) + [Ident("original file/folder name", n, "uid") for n in names_too]
    hits: list[Hit] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        stats.paths += 1
        hits += scan_bytes(rel.encode("utf-8"), idents, f"path name {rel!r}")
        decoded = _b64_name(p.name) if len(p.name) >= 8 else None
        if decoded is not None:
            hits += scan_bytes(decoded, idents, f"path name {rel!r} (base64-decoded: {decoded!r})")
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            stats.files += 1
            stats.bytes += len(data)
            found = scan_file_bytes(data, idents, rel)
            if found:
                ranges = pixel_ranges(p) if data[128:132] == b"DICM" else []
                for h in found:
                    h.in_pixels = any(a <= h.offset < b for a, b in ranges)
                stats.chance_hits += [h for h in found if h.chance]
                hits += [h for h in found if not h.chance]
    return hits


def _fail_on_hits(hits: list[Hit], what: str) -> None:
    if hits:
        shown = "\n".join(str(h) for h in hits[:60])
        more = f"\n… and {len(hits) - 60} more" if len(hits) > 60 else ""
        pytest.fail(f"{len(hits)} original identifier(s) found in {what}:\n{shown}{more}")


# ------------------------------------------------------------------------------------------------
# Building a release with the library
# ------------------------------------------------------------------------------------------------
def is_dicom_input(path: Path) -> bool:
    """Independent of deidflow's sniffer: Part-10 magic, or a data set pydicom reads with a
    SOPClassUID (bare data sets without preamble, like pydicom's rtstruct.dcm)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return True
    try:
        return "SOPClassUID" in pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return False


@dataclass
class Release:
    input_dir: Path
    out: Path  # the release root
    restricted: Path
    inv: inventory.Inventory
    job_quarantine: dict[str, str] = field(default_factory=dict)  # relpath -> reason
    audit: dict[str, str] = field(default_factory=dict)  # "<subject>/<out_relpath>" -> source id

    @property
    def dicom_root(self) -> Path:
        return self.out / "sourcedata" / "dicom"

    def released(self) -> dict[Path, Path]:
        """output file -> source file, for every file that was released."""
        pairs = {}
        for r in self.inv.rows:
            if r["status"] == "ok" and r["relpath"] not in self.job_quarantine:
                pairs[self.dicom_root / r["subject"] / r["out_relpath"]] = self.input_dir / r["relpath"]
        return pairs

    def quarantined(self) -> dict[str, str]:
        q = {r["relpath"]: r["reason"] for r in self.inv.rows if r["status"] == "quarantine"}
        q.update(self.job_quarantine)
        return q


def _release_jobs(inv: inventory.Inventory, restricted: Path, dicom_root: Path,
                  files_per_job: int, settings: dict) -> dict[str, str]:
    """Run the library's DICOM job(s) like the workflow does; return {relpath: reason} of the files
    the jobs quarantined.  Works with both job APIs of deidflow: one job per subject
    (``release.deidentify_subject``) or per job unit, a subject or a batch of small subjects
    (``release.deidentify_unit`` with ``batching.plan_units``)."""
    bad: dict[str, str] = {}
    if hasattr(release, "deidentify_unit"):
        from deidflow.batching import plan_units
        units = plan_units(inventory.files_per_subject(inv), files_per_job, 1)
        inventory.write(inv, restricted, units)
        for unit in units:
            work = restricted / "work" / unit
            release.deidentify_unit(manifest=restricted / "manifests" / f"{unit}.json",
                                    release_root=dicom_root, restricted=restricted,
                                    done=restricted / "done" / "dicom" / f"{unit}.json",
                                    uids=work / "uids.csv", quarantine=work / "quarantine.tsv",
                                    settings=settings)
    else:
        inventory.write(inv, restricted)
        for subject in inv.subjects:
            work = restricted / "work" / subject
            release.deidentify_subject(manifest=restricted / "manifests" / f"{subject}.json",
                                       release_dir=dicom_root / subject, restricted=restricted,
                                       audit=restricted / "audit" / f"{subject}.jsonl",
                                       uids=work / "uids.csv", quarantine=work / "quarantine.tsv",
                                       settings=settings)
    for q in sorted((restricted / "work").glob("*/quarantine.tsv")):
        for line in q.read_text().splitlines():
            relpath, reason = line.split("\t", 1)
            bad[relpath] = reason
    return bad


def build_release(input_dir: Path, work: Path, key: bytes, *, files_per_job: int = 0,
                  settings: dict | None = None) -> Release:
    """Inventory ``input_dir`` and release it into ``work/release`` with the library's own jobs.
    ``files_per_job``: 0 gives one job per subject; a small number packs small subjects into
    batches (when the library has job batching).  ``settings``: the job settings (default
    ``SETTINGS``: the Basic Profile, private attributes removed)."""
    inv = inventory.build(input_dir, Pseudonymizer(key), unmapped="hmac")
    restricted = work / "restricted"
    restricted.mkdir(parents=True)
    rel = Release(Path(input_dir).resolve(), work / "release", restricted, inv)
    rel.job_quarantine = _release_jobs(inv, restricted, rel.dicom_root, files_per_job,
                                       SETTINGS if settings is None else settings)
    for subject in inv.subjects:
        for line in (restricted / "audit" / f"{subject}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rel.audit[rec["file"]] = rec["source"]
    return rel


def _without_frame_comments(ds) -> list[bytes] | bytes:
    """The frames of compressed Pixel Data without their comment and application segments (what
    the dicom stage removes); the value itself for native pixel data."""
    from pydicom.encaps import generate_frames
    from deidflow.dicomio import (J2K_SYNTAXES, JPEG_SYNTAXES, j2k_frame_without_comments,
                                  jpeg_frame_without_metadata)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts not in JPEG_SYNTAXES | J2K_SYNTAXES:
        return ds.PixelData
    strip = jpeg_frame_without_metadata if ts in JPEG_SYNTAXES else j2k_frame_without_comments
    frames = generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1))
    return [strip(f).rstrip(b"\x00") for f in frames]  # a frame of odd length is padded to even


def check_release(rel: Release, *, expected_quarantine: dict[str, str], label: str) -> dict:
    """All checks of the acceptance criterion on one release; returns figures for the report."""
    inputs = sorted(p for p in rel.input_dir.rglob("*") if p.is_file())
    input_rel = {p.relative_to(rel.input_dir).as_posix(): p for p in inputs}
    dicom_inputs = {r for r, p in input_rel.items() if is_dicom_input(p)}
    released = rel.released()
    quarantined = rel.quarantined()
    released_src = {src.relative_to(rel.input_dir).as_posix() for src in released.values()}

    # 1. Nothing is dropped silently: every input file is released or quarantined with a reason.
    assert released_src.isdisjoint(quarantined)
    assert released_src | set(quarantined) == set(input_rel), (
        f"{label}: files neither released nor quarantined: "
        f"{sorted(set(input_rel) - released_src - set(quarantined))}")
    assert all(reason.strip() for reason in quarantined.values())
    assert len(dicom_inputs) == len(released) + len(set(quarantined) & dicom_inputs)
    assert released_src <= dicom_inputs
    # ... and exactly the expected files are quarantined, each for the expected reason.
    got = {k: v for k, v in quarantined.items()}
    assert set(got) == set(expected_quarantine), f"{label}: quarantine {got}"
    for relpath, reason_part in expected_quarantine.items():
        assert reason_part in got[relpath], f"{label}: {relpath} quarantined for {got[relpath]!r}"

    # 2. The release holds exactly the released files (no staging leftovers, no temporaries).
    on_disk = {p for p in rel.out.rglob("*") if p.is_file()}
    assert on_disk == set(released), f"{label}: unexpected files {sorted(on_disk ^ set(released))}"

    # 3. Every output file is a valid Part-10 file; pixel data byte-identical to the source;
    #    the audit names the right source for it.
    src_id_of = {r["relpath"]: r["src_id"] for r in rel.inv.rows}
    for out, src in released.items():
        raw = out.read_bytes()
        assert raw[128:132] == b"DICM", out
        ds = pydicom.dcmread(out)  # no force: preamble, DICM and file meta are required
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, out
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID, out
        ds.remove_private_tags()
        assert len(ds) > 0
        key = out.relative_to(rel.dicom_root).as_posix()
        assert rel.audit.get(key) == src_id_of[src.relative_to(rel.input_dir).as_posix()], out
        orig = pydicom.dcmread(src, force=True)
        assert ds.SOPClassUID == orig.SOPClassUID
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            assert (kw in ds) == (kw in orig), f"{out}: {kw} present in one only"
            if kw in orig and ds[kw].value != orig[kw].value:
                # the one change allowed: comment and application segments of compressed frames
                assert kw == "PixelData", f"{out}: {kw} differs from {src}"
                assert _without_frame_comments(orig) == _without_frame_comments(ds), \
                    f"{out}: {kw} differs from {src} beyond its frames' comment segments"

    # 4. The byte scan.
    excluded: Counter = Counter()
    idents: set[Ident] = set()
    per_kind: Counter = Counter()
    for relpath in sorted(dicom_inputs):
        idents |= collect_identifiers(input_rel[relpath], excluded=excluded)
    for i in idents:
        per_kind[i.kind] += 1
    assert idents, f"{label}: no identifiers collected: the scan would prove nothing"
    # Positive control: the same scan over the *inputs* finds every identifier (so the needles
    # are encoded the way the values are stored, and a miss in the release means absence).
    found = set()
    for relpath in sorted(dicom_inputs):
        found |= {h.ident for h in scan_file_bytes(input_rel[relpath].read_bytes(), idents, relpath)}
    assert found == idents, f"{label}: the scan misses {sorted(i.value for i in idents - found)[:20]}"
    stats = ScanStats()
    hits = scan_tree(rel.out, idents, stats)
    _fail_on_hits(hits, f"the release of {label}")
    figures = {"label": label, "inputs": len(inputs), "dicom_inputs": len(dicom_inputs),
               "released": len(released), "quarantined": len(quarantined),
               "identifiers": len(idents), "by_kind": dict(per_kind), "excluded": dict(excluded),
               "files_scanned": stats.files, "paths_scanned": stats.paths,
               "bytes_scanned": stats.bytes,
               "chance_hits_in_pixel_data": [str(h)[:160] for h in stats.chance_hits]}
    print(f"\n[realdata] {json.dumps(figures, sort_keys=True)}")
    return figures


# ------------------------------------------------------------------------------------------------
# Self-tests of the scanner (no real data needed)
# ------------------------------------------------------------------------------------------------
def test_scanner_boundaries():
    name = Ident("PatientName part", "MARY", "word")
    assert scan_bytes(b"ORIGINAL\\PRIMARY", [name], "x") == []
    assert len(scan_bytes(b"xx\x00mary^smith", [name], "x")) == 1
    serial = Ident("DeviceSerialNumber", "67093", "digits")
    assert scan_bytes(b"2.25.1267093887", [serial], "x") == []
    assert len(scan_bytes(b"1.3.12.2.1107.5.2.43.67093.2022", [serial], "x")) == 1
    bd = Ident("PatientBirthDate", "19700606", "date")
    assert len(scan_bytes(b"DT\x0e\x0019700606120000", [bd], "x")) == 1
    assert scan_bytes(b"2.25.119700606", [bd], "x") == []
    uid = Ident("StudyInstanceUID", "1.2.3.4.5", "uid")
    assert len(scan_bytes(b"UI\x0a\x001.2.3.4.5\x00", [uid], "x")) == 1
    latin = Ident("InstitutionName", "Clínica Müller", "word")
    assert len(scan_bytes(b"LO\x0e\x00" + "Clínica Müller".encode("latin-1"), [latin], "x")) == 1
    assert len(scan_bytes("CLíNICA MüLLER".encode("latin-1"), [latin], "x")) == 1  # ASCII case folded
    assert len(scan_bytes("Clínica Müller".encode("utf-8"), [latin], "x")) == 1


def test_identifier_collection_rules(tmp_path):
    """The exclusion rule in practice, on a bundled file: short or generic values are left out,
    UIDs of classes and transfer syntaxes are not searched, instance UIDs are."""
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.PatientName = "Anonymous^Jo^Abcdef"
    ds.StationName = "ID1"
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    excluded: Counter = Counter()
    got = collect_identifiers(path, excluded=excluded)
    values = {i.value for i in got}
    assert "Abcdef" in values and "Anonymous^Jo^Abcdef" in values
    assert "Jo" not in values and "Anonymous" not in values and "ID1" not in values
    assert str(ds.SOPInstanceUID) in values and str(ds.StudyInstanceUID) in values
    assert str(ds.SOPClassUID) not in values
    assert str(ds.file_meta.TransferSyntaxUID) not in values
    assert str(ds.file_meta.ImplementationClassUID) not in values
    assert any("ID1" in k for k in excluded)


# ------------------------------------------------------------------------------------------------
# ../shared/data
# ------------------------------------------------------------------------------------------------
SHARED_CASES = {
    # name: (path parts, {relpath: part of the expected quarantine reason})
    "dcm_qa_xa30": (("dcm_qa_xa30", "In"), {}),
    "dcm_qa_decubitus": (("dcm_qa_decubitus", "In"), {"HFP/HFP.txt": "unknown format"}),
    "jsl_pseudo_phi": (("jsl_pseudo_phi",), "json sidecars"),
    "highdicom": (("highdicom", "data", "test_files"), {
        "README.md": "unknown format", "frame_rgb.jpeg": "unknown format",
        "frame_rgb_empty.jpeg": "unknown format",
        # sm_image_control.dcm is a copy of sm_image.dcm with the same SOPInstanceUID
        "sm_image_control.dcm": "duplicate SOPInstanceUID"}),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_release_has_no_original_identifiers(name, tmp_path, key_env, shared_data):
    input_dir = shared_data(*SHARED_CASES[name][0])
    # jsl_pseudo_phi: the burned-in-text ground truth (.json) is not a format deidflow releases
    expected = _shared_expected(name, input_dir)
    if name == "jsl_pseudo_phi":
        assert len(expected) == 28
    rel = build_release(input_dir, tmp_path, key_env)
    figures = check_release(rel, expected_quarantine=expected, label=name)
    assert figures["released"] > 0
    # the real identifiers named in ../shared/data/README.md were found, so were searched for
    kinds = set(figures["by_kind"])
    assert {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= kinds
    if name in ("dcm_qa_xa30", "dcm_qa_decubitus"):
        assert {"InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber",
                "PatientBirthDate"} <= kinds
    if name == "jsl_pseudo_phi":
        assert {"PatientName", "PatientName part", "AccessionNumber", "InstitutionName",
                "InstitutionAddress", "PatientBirthDate", "DeviceSerialNumber"} <= kinds


def _shared_expected(name: str, input_dir: Path):
    parts, expected = SHARED_CASES[name]
    if expected == "json sidecars":
        expected = {p.name: "json: not a BIDS sidecar" for p in input_dir.glob("*.json")}
    return expected


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["jsl_pseudo_phi", "highdicom"])
def test_shared_release_in_batched_jobs_has_no_original_identifiers(name, tmp_path, key_env, shared_data):
    """Small subjects packed several to a job (the workflow's batching): same guarantees."""
    if not hasattr(release, "deidentify_unit"):
        pytest.skip("this deidflow runs one job per subject (no job batching)")
    input_dir = shared_data(*SHARED_CASES[name][0])
    rel = build_release(input_dir, tmp_path, key_env, files_per_job=20)
    units = sorted(p.stem for p in (rel.restricted / "manifests").glob("*.json"))
    assert any(u.startswith("batch-") for u in units), units
    assert len(units) < len(rel.inv.subjects)
    check_release(rel, expected_quarantine=_shared_expected(name, input_dir), label=f"{name} (batched)")


# The PS3.15 options that keep free text but must clean it of identifying information.
CLEAN_OPTIONS = ["clean_descriptors", "clean_structured_content", "clean_graphics"]
# Regression guard: Scrubber._collect_identifiers (dicom.py) used to turn each PN value into single
# characters (pydicom's PersonName is iterable, so it was taken for a multi-value and
# ``str(x) for x in v`` gave 'K', 'A', …), so no patient-name part reached textclean and
# jsl_pseudo_phi's StudyDescription "XR CHEST AP PORTABLE for Scott Kaufman" was released with the
# name of patient KAUFMAN^SCOTT (likewise DAVIDSON^DOUGLAS).  Found by this file; fixed in dicom.py.


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["dcm_qa_xa30", "dcm_qa_decubitus", "highdicom", "jsl_pseudo_phi"])
def test_shared_release_with_clean_options_has_no_original_identifiers(name, tmp_path, key_env, shared_data):
    """With the clean options descriptions and structured content stay, cleaned: still no
    original identifier may survive (jsl_pseudo_phi writes patients' names into descriptions)."""
    input_dir = shared_data(*SHARED_CASES[name][0])
    rel = build_release(input_dir, tmp_path, key_env, settings={**SETTINGS, "options": CLEAN_OPTIONS})
    check_release(rel, expected_quarantine=_shared_expected(name, input_dir), label=f"{name} (clean options)")


@pytest.mark.realdata
def test_clean_descriptors_removes_patient_name_from_study_description(tmp_path, key_env, shared_data):
    """The PN bug above, pinned on one real file: the cleaned StudyDescription must not name the
    patient."""
    src_dir = shared_data("jsl_pseudo_phi")
    (src,) = [p for p in src_dir.glob("*Scott_Kaufman-73078*.dcm")]
    orig = pydicom.dcmread(src)
    assert str(orig.PatientName) == "KAUFMAN^SCOTT" and "Kaufman" in orig.StudyDescription
    inp = tmp_path / "input"
    inp.mkdir()
    shutil.copyfile(src, inp / "x.dcm")
    rel = build_release(inp, tmp_path / "work", key_env,
                        settings={**SETTINGS, "options": ["clean_descriptors"]})
    (out,) = rel.released()
    ds = pydicom.dcmread(out)
    assert "StudyDescription" in ds  # kept (cleaned) under clean_descriptors
    assert "kaufman" not in ds.StudyDescription.lower() and "scott" not in ds.StudyDescription.lower(), \
        ds.StudyDescription


@pytest.mark.realdata
def test_embedded_overlay_in_unused_pixel_bits_is_cleared(tmp_path, key_env, shared_data):
    """Siemens MR (16 bits allocated, 12 stored) with the patient's name drawn into bit 12 and a
    retired embedded overlay (OverlayBitPosition 12) pointing at it: the profile removes the
    overlay group, and the name stayed in the released Pixel Data's unused bits, exit 0 (found by
    red-team 2).  The bits above HighBit are cleared; every stored pixel value stays the same."""
    src_dir = shared_data("dcm_qa_decubitus", "In", "HFS", "3_t1_fl2d_sag")
    inp = tmp_path / "input"
    inp.mkdir()
    originals = {}
    for i, src in enumerate(sorted(src_dir.iterdir())[:3]):
        ds = pydicom.dcmread(src)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        stored = ds.pixel_array & 0x0FFF
        text = np.zeros_like(stored)
        text[10:30, 10:120] = 1  # the "text": any set bit above HighBit is hidden content
        ds.PixelData = (stored | (text << 12)).astype("<u2").tobytes()
        for elem, vr, value in ((0x0010, "US", ds.Rows), (0x0011, "US", ds.Columns), (0x0040, "CS", "G"),
                                (0x0050, "SS", [1, 1]), (0x0100, "US", 16), (0x0102, "US", 12)):
            ds.add_new(0x60000000 | elem, vr, value)
        ds.save_as(inp / f"{i}.dcm")
        originals[ds.SOPInstanceUID] = stored
    rel = build_release(inp, tmp_path / "work", key_env)
    assert len(rel.released()) == 3
    for out in rel.released():
        ds = pydicom.dcmread(out)
        raw = np.frombuffer(ds.PixelData, "<u2")
        assert not (raw >> 12).any(), out
        assert any(np.array_equal(raw.reshape(ds.Rows, ds.Columns), v) for v in originals.values())


def test_jpeg_comment_and_exif_segments_are_stripped_from_pixel_data(tmp_path, key_env):
    """A JPEG frame's COM segment ("Patient MUELLER HANS MRN8283746 DOB 17.03.1958", as converters
    write notes there) and APP1 (EXIF: camera owner, capture date) were released inside the Pixel
    Data with exit 0 (found by red-team 2).  They are removed; the pixels decode the same."""
    import struct
    from pydicom.encaps import encapsulate, generate_frames
    src = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    (frame,) = generate_frames(src.PixelData, number_of_frames=1)
    note = b"Patient MUELLER HANS MRN8283746 DOB 17.03.1958"
    exif = b"Exif\x00\x00MM\x00*OWNER MUELLER 2019:03:14 10:00:00"
    leaky = (frame[:2] + b"\xff\xfe" + struct.pack(">H", len(note) + 2) + note
             + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + frame[2:])
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.PatientName, ds.PatientID = "Mueller^Hans", "MRN8283746"
    ds.PixelData = encapsulate([leaky])
    inp = tmp_path / "input"
    inp.mkdir()
    ds.save_as(inp / "sc.dcm")
    assert np.array_equal(pydicom.dcmread(inp / "sc.dcm").pixel_array, src.pixel_array)
    rel = build_release(inp, tmp_path / "work", key_env)
    (out,) = rel.released()
    data = out.read_bytes()
    assert b"MUELLER" not in data and b"8283746" not in data and b"Exif" not in data
    assert np.array_equal(pydicom.dcmread(out).pixel_array, src.pixel_array)


def test_jpeg2000_comment_segment_is_stripped_from_pixel_data(tmp_path, key_env):
    """A JPEG 2000 COM marker in the main header ("Patient MUELLER HANS MRN8283746") was released
    inside the Pixel Data with exit 0 (found by red-team 2); it is removed, the pixels decode the
    same."""
    import struct
    from pydicom.encaps import encapsulate, generate_frames
    src = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm"))
    (frame,) = generate_frames(src.PixelData, number_of_frames=1)
    end_siz = 4 + struct.unpack(">H", frame[4:6])[0]
    note = b"\x00\x01Patient MUELLER HANS MRN8283746"
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.PatientName, ds.PatientID = "Mueller^Hans", "MRN8283746"
    ds.PixelData = encapsulate([frame[:end_siz] + b"\xff\x64" + struct.pack(">H", len(note) + 2) + note
                                + frame[end_siz:]])
    inp = tmp_path / "input"
    inp.mkdir()
    ds.save_as(inp / "mr.dcm")
    rel = build_release(inp, tmp_path / "work", key_env)
    (out,) = rel.released()
    assert b"MUELLER" not in out.read_bytes() and b"8283746" not in out.read_bytes()
    assert np.array_equal(pydicom.dcmread(out).pixel_array, src.pixel_array)


# Regression guard: with dicom.private: safe the Siemens CSA blobs (0029,xx10) CSA Image Header Info
# and (0029,xx20) CSA Series Header Info are kept (private_safe.tsv rows "dcm2niix kCSA…"); in
# dcm_qa_decubitus they carry the original SOPInstanceUIDs of the localizers (MrPhoenixProtocol
# tReferenceImage0..2 = 1.3.12.2.1107.5.2.43.67060.…) and with them the DeviceSerialNumber 67060.
# Found by this file (all 70 released files leaked them); the kept blobs are now scrubbed.


@pytest.mark.realdata
def test_decubitus_release_with_safe_private_has_no_original_identifiers(tmp_path, key_env, shared_data):
    """``private: safe`` keeps vendor blobs that dcm2niix needs; no original UID or serial may
    survive inside them."""
    input_dir = shared_data("dcm_qa_decubitus", "In")
    rel = build_release(input_dir, tmp_path, key_env, settings={**SETTINGS, "private": "safe"})
    check_release(rel, expected_quarantine=_shared_expected("dcm_qa_decubitus", input_dir),
                  label="dcm_qa_decubitus (private: safe)")
    # the scan covered kept CSA blobs (not merely their removal)
    def has_csa_series_header(path: Path) -> bool:
        try:
            return pydicom.dcmread(path).get_private_item(0x0029, 0x20, "SIEMENS CSA HEADER") is not None
        except KeyError:
            return False

    kept = [out for out in rel.released() if has_csa_series_header(out)]
    assert kept, "no CSA Series Header Info kept under private: safe: this test no longer exercises it"


# ------------------------------------------------------------------------------------------------
# pydicom's bundled files
# ------------------------------------------------------------------------------------------------
# Complete objects with a SOPInstanceUID, covering the transfer syntaxes and layouts the engine
# handles differently: explicit/implicit little endian, big endian, encapsulated (JPEG, JPEG-LS,
# JPEG 2000, RLE), deflated (slow path), no preamble (slow path), multi-frame, overlays, palette,
# waveforms, RT objects and SR.
BUNDLED = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
    "MR_small_expb.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm",
    "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm",
    "rtdose_rle.dcm", "rtdose_expb.dcm", "test-SR.dcm", "reportsi.dcm", "waveform_ecg.dcm",
    "examples_overlay.dcm", "examples_palette.dcm", "examples_ybr_color.dcm",
    "examples_jpeg2k.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd_big_endian.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm", "liver_1frame.dcm", "liver_expb_1frame.dcm", "image_dfl.dcm",
    "emri_small.dcm",  # only when present locally (never downloaded)
]
# Files that carry no PatientID: the inventory must quarantine them (they cannot be assigned to a
# subject), so their release is empty and the test checks the reason instead.
NO_PATIENT_ID = {"test-SR.dcm", "reportsi.dcm", "image_dfl.dcm"}


def _bundled(name: str) -> Path:
    """A bundled pydicom test file, only if it is in the installed wheel (no download)."""
    if not (PYDICOM_TEST_FILES / name).is_file():
        pytest.skip(f"{name} is not bundled with this pydicom (not downloaded on purpose)")
    path = Path(pydicom.data.get_testdata_file(name))
    assert path.resolve().parent == PYDICOM_TEST_FILES
    return path


def _bundled_input(tmp_path: Path, names) -> Path:
    inp = tmp_path / "input"
    inp.mkdir()
    for n in names:
        shutil.copyfile(_bundled(n), inp / n)  # a plain copy, no symlink (those are quarantined)
    return inp


@pytest.mark.realdata
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_file_release_has_no_original_identifiers(name, tmp_path, key_env):
    """One bundled file per input folder, so that every variant (transfer syntax) of a shared
    SOPInstanceUID is actually released rather than quarantined as a duplicate."""
    inp = _bundled_input(tmp_path, [name])
    rel = build_release(inp, tmp_path / "work", key_env)
    expected = {name: "no PatientID"} if name in NO_PATIENT_ID else {}
    figures = check_release(rel, expected_quarantine=expected, label=f"pydicom {name}")
    assert figures["released"] == (0 if name in NO_PATIENT_ID else 1)


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(NO_PATIENT_ID))
def test_bundled_file_without_patient_id_released_once_it_has_one(name, tmp_path, key_env):
    """The files quarantined above for lack of a PatientID (two SRs and the deflated image) are
    released once a PatientID is added (the only change; written with the file's own transfer
    syntax, so image_dfl stays deflated and goes through the engine's whole-data-set path)."""
    src = _bundled(name)
    ds = pydicom.dcmread(src)
    ds.PatientID = f"DERIVED-{Path(name).stem.upper()}-0042"
    ds.InstitutionName = "Derived Test Institution Nordstrand"
    inp = tmp_path / "input"
    inp.mkdir()
    ds.save_as(inp / name, enforce_file_format=True)
    written = (inp / name).read_bytes()
    if name == "image_dfl.dcm":
        assert inflated_body(written) is not None, "the derived input must still be deflated"
    rel = build_release(inp, tmp_path / "work", key_env)
    figures = check_release(rel, expected_quarantine={}, label=f"pydicom {name} + PatientID")
    assert figures["released"] == 1
    assert {"PatientID", "InstitutionName"} <= set(figures["by_kind"])
    if name == "image_dfl.dcm":
        (out,) = rel.released()
        assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
        assert inflated_body(out.read_bytes()) is not None  # and the scan looked inside it


@pytest.mark.realdata
def test_bundled_files_together_quarantine_is_explicit(tmp_path, key_env):
    """All selected bundled files in one input folder: variants that share a SOPInstanceUID are
    quarantined as duplicates (the largest file is released, ties by path), files without PatientID are
    quarantined for that, and the rest of the release is scanned like above."""
    names = [n for n in BUNDLED if (PYDICOM_TEST_FILES / n).is_file()]
    inp = _bundled_input(tmp_path, names)
    sop_of = {n: str(pydicom.dcmread(inp / n, force=True, stop_before_pixels=True).SOPInstanceUID)
              for n in names}
    expected = {n: "no PatientID" for n in NO_PATIENT_ID if n in names}
    first_of: dict[str, str] = {}
    for n in sorted(names, key=lambda n: (-(inp / n).stat().st_size, n)):
        if n in expected:
            continue
        if sop_of[n] in first_of:
            expected[n] = "duplicate SOPInstanceUID"
        else:
            first_of[sop_of[n]] = n
    # duplicates: 7 of the 8 MR_small variants, 2 of the 3 rtdose, 1 of the 2 liver files;
    # and the 3 files without PatientID
    assert len(expected) == 13, expected
    rel = build_release(inp, tmp_path / "work", key_env)
    figures = check_release(rel, expected_quarantine=expected, label="pydicom bundled (together)")
    assert figures["released"] == len(first_of)


# ------------------------------------------------------------------------------------------------
# End to end through the CLI and Snakemake
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.workflow
def test_cli_run_decubitus_leaves_no_identifier_in_release_or_snakemake(tmp_path, key_env, shared_data):
    input_dir = shared_data("dcm_qa_decubitus", "In")
    out = tmp_path / "release"
    env = {**os.environ, "DEIDFLOW_KEY": key_env.decode()}
    proc = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(input_dir), str(out),
                           "--cores", "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert_finished(proc, out)
    restricted = tmp_path / "release_restricted"
    snakemake_dir = restricted / ".snakemake"
    assert snakemake_dir.is_dir(), "the CLI starts Snakemake in the restricted folder"
    assert not (out / ".snakemake").exists() and not (tmp_path / ".snakemake").exists()

    # Original identifiers, plus every original file and folder name below the input.
    dicom_inputs = [p for p in sorted(input_dir.rglob("*")) if p.is_file() and is_dicom_input(p)]
    idents: set[Ident] = set()
    for p in dicom_inputs:
        idents |= collect_identifiers(p)
    names = {p.name for p in input_dir.rglob("*")}
    names |= {p.stem for p in input_dir.rglob("*.dcm")}  # "0001_1.3.12.2.1107…" without .dcm
    names |= {"t1_fl2d_sag"}
    # Names shorter than 6 characters are left out: "In" is part of "Institution", and the folders
    # "HFS"/"HFP" are named after the PatientPosition code, a kept coded value (CS "HFS").
    names = {n for n in names if len(n) >= 6}
    assert any(n.startswith("0001_1.3.12.2.1107.5.2.43.67060.") for n in names)
    stats_release, stats_smk = ScanStats(), ScanStats()
    _fail_on_hits(scan_tree(out, idents, stats_release, names_too=sorted(names)), "the CLI release")
    _fail_on_hits(scan_tree(snakemake_dir, idents, stats_smk, names_too=sorted(names)),
                  f"{snakemake_dir}")

    # The DICOM release is complete: every DICOM input released, the text file quarantined.  Besides
    # the DICOM files it holds only Snakemake's empty marker of each directory() output.
    everything = [p for p in (out / "sourcedata" / "dicom").rglob("*") if p.is_file()]
    markers = [p for p in everything if p.name == ".snakemake_timestamp"]
    assert all(p.stat().st_size == 0 for p in markers)
    assert len(markers) == len({p.parent for p in markers}) <= 1  # one subject in this input
    released = [p for p in everything if p not in markers]
    assert all(p.suffix == ".dcm" for p in released)
    assert len(released) == len(dicom_inputs) == 70
    for p in released:
        ds = pydicom.dcmread(p)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    quarantine = (restricted / "quarantine.tsv").read_text()
    assert "HFP/HFP.txt" in quarantine
    print(f"\n[realdata] cli: {len(idents)} identifiers + {len(names)} names; release "
          f"{stats_release.files} files {stats_release.bytes} bytes; .snakemake "
          f"{stats_smk.files} files {stats_smk.bytes} bytes")
