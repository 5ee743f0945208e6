"""The ``face`` job of one unit: deface or skull-strip every selected head MRI image of the unit's
BIDS release and the de-identified DICOM series it was converted from, and the head volumes
that arrived as NIfTI / Analyze / MGH (released by the ``other`` stage).

Inputs are the ``convert`` stage's done marker (release path, series folder and BIDS suffix of every
image) when the unit has a BIDS release, and the ``other`` stage's marker with the unit's manifest
(release paths of its non-DICOM files) when it has non-DICOM files. DICOM files are written back
once every new SOP Instance UID of the unit is known, so that references to a rewritten image in
the unit's other DICOM files follow it (:func:`_follow_references`). Release files are changed in
place, each by a temporary file and a rename. Before a
release file is first changed its pristine bytes are kept in
``<restricted>/work/face/<unit>/orig/``; every run computes from that copy and records the hash of
what it wrote (before writing it), so a rerun — also after SIGKILL at any point — gives the same
bytes as an uninterrupted run. When a release file is neither the kept copy nor the recorded
output (the convert or dicom stage wrote it anew), the copy is refreshed from it.

QC pictures go to ``<release>/derivatives/deidflow/qc/<subject>/face/`` with an ``index.json``;
the front view of the *original* face is identifying, so it is written to
``<restricted>/qc/<subject>/face/`` unless ``face.qc_before_in_release`` is set.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_bytes, atomic_write_text, make_restricted_dir
from . import render
from .apply import GeometryMismatch, Nifti, derived_sidecar, mask_dicom, remap_file, uids_in
from .select import Decision, ImageFacts, decide, extent_mm
from .volume import reference_volume

log = logging.getLogger("deidflow")
QC_DIR = "derivatives/deidflow/qc"
UID_DOMAIN = "deidflow-face"
RELEASE_FILE_MODE = 0o644


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Keeper:
    """Pristine copies and recorded outputs of the release files a unit's face job changes."""

    def __init__(self, release_root: Path, work: Path):
        self.root = Path(release_root)
        self.orig = work / "orig"
        self.out = work / "out"
        self.touched: set[str] = set()

    def _rec(self, rel: str) -> Path:
        return self.out / (rel + ".sha256")

    def _recorded(self, rel: str) -> str | None:
        rec = self._rec(rel)
        return rec.read_text().strip() if rec.exists() else None

    def available(self, rel: str) -> bool:
        """In the release, or withheld from it by an earlier run of this job."""
        return (self.root / rel).is_file() or ((self.orig / rel).is_file() and self._recorded(rel) == "withdrawn")

    def source(self, rel: str) -> bytes:
        """The pristine bytes of release file ``rel`` (kept, or refreshed from the release)."""
        self.touched.add(rel)
        kept, path = self.orig / rel, self.root / rel
        recorded = self._recorded(rel)
        if not path.exists():
            if kept.exists() and recorded == "withdrawn":
                return kept.read_bytes()
            raise FileNotFoundError(f"{rel} is not in the release")
        cur = path.read_bytes()
        if kept.exists():
            pristine = kept.read_bytes()
            if cur == pristine or recorded == _sha(cur):
                return pristine
        make_restricted_dir(kept.parent)
        atomic_write_bytes(kept, cur, RESTRICTED_FILE_MODE)
        self._rec(rel).unlink(missing_ok=True)
        return cur

    def pristine(self, rel: str) -> bytes:
        """The pristine bytes of release file ``rel`` without keeping a copy (for read-only checks)."""
        kept, path = self.orig / rel, self.root / rel
        if not path.exists():
            return self.source(rel)             # withheld earlier: only the kept copy exists
        cur = path.read_bytes()
        if kept.exists():
            recorded = self._recorded(rel)
            if recorded == _sha(cur) or cur == kept.read_bytes():
                return kept.read_bytes()
        return cur

    def publish(self, rel: str, data: bytes) -> None:
        """Write ``data`` to release file ``rel`` (its hash recorded first; unchanged files untouched)."""
        self._record(rel, _sha(data))
        path = self.root / rel
        if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
        atomic_write_bytes(path, data, path.stat().st_mode & 0o777 if path.exists() else RELEASE_FILE_MODE)

    def dicom_files(self, folder: Path) -> list[str]:
        """Release-relative paths of the DICOM files of a series folder, withheld ones included."""
        rel_dir = folder.relative_to(self.root)
        rels = {str(p.relative_to(self.root)) for p in folder.glob("*.dcm") if p.is_file()}
        kept = self.orig / rel_dir
        if kept.is_dir():
            rels |= {str(rel_dir / p.name) for p in kept.glob("*.dcm") if self.available(str(rel_dir / p.name))}
        return sorted(rels)

    def withdraw(self, rel: str) -> None:
        """Take a release file out (its pristine copy stays in the restricted folder)."""
        self.source(rel)
        self._record(rel, "withdrawn")
        (self.root / rel).unlink(missing_ok=True)

    def restore_untouched(self) -> list[str]:
        """Put back the pristine bytes of every file an earlier run changed and this run did not
        (its image is no longer selected), unless another stage has written it anew since."""
        restored = []
        if not self.out.is_dir():
            return restored
        for rec in sorted(self.out.rglob("*.sha256")):
            rel = str(rec.relative_to(self.out))[: -len(".sha256")]
            if rel in self.touched:
                continue
            kept, path = self.orig / rel, self.root / rel
            want = rec.read_text().strip()
            cur = path.read_bytes() if path.exists() else None
            if kept.exists() and ((cur is None and want == "withdrawn") or (cur is not None and _sha(cur) == want)):
                atomic_write_bytes(path, kept.read_bytes(),
                                   path.stat().st_mode & 0o777 if path.exists() else RELEASE_FILE_MODE)
                restored.append(rel)
            rec.unlink()
        return restored

    def _record(self, rel: str, value: str) -> None:
        rec = self._rec(rel)
        make_restricted_dir(rec.parent)
        atomic_write_text(rec, value + "\n", RESTRICTED_FILE_MODE)


@dataclass
class _Image:
    entry: Mapping[str, Any]
    subject: str
    rel: str
    shape: tuple
    affine: np.ndarray
    facts: ImageFacts
    decision: Decision
    series_dir: Path | None
    fmt: str = "nifti1"
    data_rel: str = ""          # the file holding the voxels (the .img of a pair), default ``rel``
    sidecar_rel: str = ""       # the released JSON sidecar, if any
    result: dict = field(default_factory=dict)
    nifti: Nifti | None = None

    def __post_init__(self) -> None:
        self.data_rel = self.data_rel or self.rel

    @property
    def files(self) -> list[str]:
        """The release files of the image (header and image file of a pair)."""
        return sorted({self.rel, self.data_rel})

    def load(self, keeper: "Keeper") -> Nifti:
        """The pristine image (kept in the restricted folder before anything changes)."""
        if self.nifti is None:
            if self.fmt == "mgh":
                self.nifti = Nifti.from_mgh(keeper.source(self.rel))
            elif self.data_rel != self.rel:
                self.nifti = Nifti.from_pair(keeper.source(self.rel), keeper.source(self.data_rel))
            else:
                self.nifti = Nifti.from_bytes(keeper.source(self.rel))
        return self.nifti


# Formats of the other stage the face stage reads, and those whose voxels it can write back.
VOLUME_FORMATS = ("nifti1", "nifti2", "analyze", "mgh", "minc1", "minc2", "parrec")
WRITABLE_FORMATS = ("nifti1", "nifti2", "analyze", "mgh")


def _marker(path) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def face_unit(convert_done: Path | None, dicom_root: Path, release_root: Path, restricted: Path, done: Path,
              quarantine: Path, settings: Mapping[str, Any], face_cfg: Mapping[str, Any],
              other_done: Path | None = None, manifest: Path | None = None) -> dict:
    """Run the face stage for one unit; returns counts (images treated, DICOM files rewritten…).

    ``convert_done`` is the unit's ``convert`` done marker (BIDS images and their DICOM series) or
    None when the unit has no BIDS release; ``other_done`` the ``other`` stage's marker when the
    unit has non-DICOM files, whose volumes are found through the unit's ``manifest``."""
    convert, other = _marker(convert_done), _marker(other_done)
    if convert is None and other is None:
        raise ValueError("the face job needs the convert or the other stage's done marker")
    unit = (convert or other)["unit"]
    release_root, restricted, dicom_root = Path(release_root), Path(restricted), Path(dicom_root)
    work = make_restricted_dir(restricted / "work" / "face" / unit)
    keeper = Keeper(release_root, work)
    dicom_in_release = dicom_root.resolve().is_relative_to(release_root.resolve())
    images: list[_Image] = []
    for subj in (convert or {}).get("subjects", []):
        series_cache: dict[str, Any] = {}
        for entry in list(subj.get("images", [])) + list(subj.get("unsorted", [])):
            if not keeper.available(entry["nifti"]):
                log.warning("%s: listed by convert but not in the release; skipped", entry["nifti"])
                continue
            images.append(_describe(entry, subj["subject"], keeper, dicom_root, series_cache, face_cfg))
    unit_manifest = json.loads(Path(manifest).read_text()) if manifest else {"subjects": []}
    if other is not None:
        images += _other_images(unit_manifest, keeper, face_cfg)
    bad: list[tuple[str, str]] = []  # (release path, reason); listed by input path (quarantine.tsv's form)
    uid_map: dict[str, str] = {}
    qc: dict[str, list[dict]] = {}
    counts = {"images": len(images), "treated": 0, "dicom_files": 0, "withheld": 0, "references": 0}
    pseudo = None
    series_todo = []
    registrations: dict[tuple[str, str], Any] = {}   # one registration per head: see _removal
    for group in _groups([im for im in images if im.decision.method != "none"]):
        ref = group[0]
        method = ref.decision.method
        backend_name = face_cfg["deface_backend"] if method == "deface" else face_cfg["skullstrip_backend"]
        if ref.fmt not in WRITABLE_FORMATS:   # selected, but its voxels cannot be rewritten: never release the face
            _withhold(group, f"{ref.fmt} volumes cannot be {method}d in place", backend_name, keeper, bad, counts)
            continue
        program = face_cfg["external"][method]
        from .backends import get_backend
        backend = get_backend(backend_name, program)
        t0 = time.perf_counter()
        nii = ref.load(keeper)
        vol = reference_volume(nii.real(), nii.affine)
        removed_ras = _removal(backend, vol, ref, registrations)
        native = vol.to_native(removed_ras)
        seconds = round(time.perf_counter() - t0, 2)
        frac = float(removed_ras.mean())
        _save_mask(work / "masks" / ref.rel, native, nii.affine)
        problem = implausible(vol, removed_ras, method)
        if problem:  # never release a face the backend missed: withhold the group's files
            _withhold(group, problem, backend_name, keeper, bad, counts)
            if dicom_in_release and ref.series_dir is not None:
                for rel in keeper.dicom_files(ref.series_dir):
                    keeper.withdraw(rel)
                    bad.append((rel, f"face: {problem}; withheld from the release"))
            log.warning("%s: %s; withheld", ref.rel, problem)
            continue
        for im in group:
            keeper.publish(im.data_rel, im.load(keeper).masked(native))
            _mark_sidecar(im, keeper)
            im.result = {"backend": backend_name, "removed_fraction": round(frac, 4), "mask_from": ref.rel,
                         "seconds": seconds if im is ref else 0.0}
            counts["treated"] += 1
            if im is not ref:
                im.nifti = None  # free memory early (4D series)
        log.info("%s: %s by %s, %.1f%% of voxels removed, %.1f s", ref.rel, method, backend_name, 100 * frac, seconds)
        qc.setdefault(ref.subject, []).extend(
            _qc(ref, vol, removed_ras, method, backend_name, release_root, restricted, face_cfg))
        if dicom_in_release and ref.series_dir is not None:
            series_todo.append((ref, group, (nii.affine, native), method, backend_name))
        ref.nifti = None
    if series_todo:  # DICOM write-back once every new UID is known, so references follow them
        from ..release import pseudonymizer_from_settings
        pseudo = pseudonymizer_from_settings(settings)
        planned = _planned_uids(series_todo, keeper, pseudo)
        for ref, group, grid, method, backend_name in series_todo:
            n, withheld = _dicom_series(ref, group, grid, method, backend_name, keeper, pseudo, planned, uid_map, bad)
            counts["dicom_files"] += n
            counts["withheld"] += withheld
            ref.result["dicom_files"] = n
        rewritten = {rel for ref, *_ in series_todo for rel in keeper.dicom_files(ref.series_dir)}
        counts["references"] = _follow_references(images, dicom_root, keeper, rewritten, planned)
    for rel in keeper.restore_untouched():  # files of images no longer selected: undo earlier runs
        log.info("%s: restored (no longer selected)", rel)
    for subject, entries in sorted(qc.items()):
        _write_qc_index(release_root / QC_DIR / subject / "face", [e for e in entries if not e.get("restricted")],
                        RELEASE_FILE_MODE)
        _write_qc_index(restricted / "qc" / subject / "face", entries, RESTRICTED_FILE_MODE)
    from ..fsutil import csv_text
    atomic_write_text(work / "uids.csv", csv_text([("id_old", "id_new"), *sorted(uid_map.items())]),
                      RESTRICTED_FILE_MODE)
    lines = _input_lines(bad, unit_manifest, images)
    make_restricted_dir(Path(quarantine).parent)
    atomic_write_text(quarantine, "".join(json.dumps({"file": p, "reason": r}) + "\n" for p, r in lines),
                      RESTRICTED_FILE_MODE)
    report = {"unit": unit, "deidflow": __version__, "references_updated": counts["references"], "images": [
        {"nifti": im.rel, "series": im.entry.get("series", ""), "suffix": im.facts.suffix, "format": im.fmt,
         "method": im.decision.method, "reason": im.decision.reason, **im.result} for im in images]}
    make_restricted_dir(Path(done).parent)
    atomic_write_text(done, json.dumps(report, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    return counts


def _input_lines(bad: list[tuple[str, str]], manifest: Mapping[str, Any], images: list[_Image]) -> list[tuple[str, str]]:
    """Quarantine lines by input file (paths relative to the input folder, as every stage lists
    them): a withheld release file is its input file; a BIDS image is the DICOM series it was
    converted from. A path the manifest does not know is listed as it is."""
    where: dict[str, str] = {}
    for subj in manifest.get("subjects", []):
        for f in subj["files"]:
            where[f"{f.get('release_dir') or 'sourcedata/dicom'}/{subj['subject']}/{f['out_relpath']}"] = f["relpath"]
    series = {im.rel: f"sourcedata/dicom/{im.subject}/{im.entry['series']}/" for im in images if im.entry.get("series")}
    lines = set()
    for rel, reason in bad:
        if rel in series:
            srcs = [src for w, src in where.items() if w.startswith(series[rel])]
        else:
            srcs = [where[rel]] if rel in where else []
        lines.update((src, reason) for src in (srcs or [rel]))
    return sorted(lines)


def _withhold(group: list[_Image], problem: str, backend: str, keeper: Keeper, bad: list, counts: dict) -> None:
    """Take every file of the group's images out of the release (kept in the restricted folder)."""
    for im in group:
        for rel in im.files:
            keeper.withdraw(rel)
            bad.append((rel, f"face: {problem}; withheld from the release"))
        im.result = {"backend": backend, "withheld": problem}
        im.nifti = None
    counts["withheld"] += len(group)


def _mark_sidecar(im: _Image, keeper: Keeper) -> None:
    """The released sidecar of a changed image says DERIVED (kept pristine like the image)."""
    if im.sidecar_rel and keeper.available(im.sidecar_rel):
        text = derived_sidecar(keeper.source(im.sidecar_rel).decode("utf-8"))
        if text is not None:
            keeper.publish(im.sidecar_rel, text.encode("utf-8"))


def _describe(entry, subject, keeper: Keeper, dicom_root: Path, series_cache, face_cfg) -> _Image:
    from ..bids.series import read_series
    rel = entry["nifti"]
    import nibabel as nib
    where = keeper.root / rel if (keeper.root / rel).is_file() else keeper.orig / rel  # withheld earlier
    hdr_img = nib.load(where)  # header only; the data are read from the pristine copy
    shape, affine = tuple(hdr_img.shape), hdr_img.affine
    series_dir = None
    attrs: Mapping[str, Any] = {}
    if entry.get("series"):
        series_dir = dicom_root / subject / entry["series"]
        if entry["series"] not in series_cache:
            try:
                series_cache[entry["series"]] = read_series(series_dir.parent, series_dir.name).attrs \
                    if series_dir.is_dir() else {}
            except ValueError:
                series_cache[entry["series"]] = {}
        attrs = series_cache[entry["series"]]
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    facts = ImageFacts(
        path=rel, suffix=str(entry.get("suffix") or ""),
        modality=str(attrs.get("Modality") or entry.get("modality") or ""),
        body_part=str(attrs.get("BodyPartExamined") or ""),
        description=" ".join(str(attrs.get(k) or "") for k in ("SeriesDescription", "ProtocolName")).strip(),
        extent_mm=extent_mm(shape[:3], zooms))
    sidecar = next((f for f in entry.get("files", ()) if f.endswith(".json")), "")
    return _Image(entry, subject, rel, shape, affine, facts, decide(facts, face_cfg),
                  series_dir if series_dir is not None and series_dir.is_dir() else None, sidecar_rel=sidecar)


_BIDS_NAME = re.compile(r"^sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*_([A-Za-z0-9]+)$")


def bids_suffix(name: str) -> str:
    """The BIDS suffix of a file name (``sub-01_ses-1_T1w.nii.gz`` → ``T1w``), or "" when the name
    is not BIDS-shaped."""
    from ..formats.base import stem_of
    m = _BIDS_NAME.match(stem_of(name))
    return m.group(1) if m else ""


def _other_images(manifest: Mapping[str, Any], keeper: Keeper, face_cfg) -> list[_Image]:
    """The volumes the ``other`` stage released for this unit (NIfTI, Analyze, MGH, MINC, PAR/REC),
    described for the selector. There is no DICOM header: facts come from the released sidecar
    (Modality, BodyPartExamined, SeriesDescription/ProtocolName when kept), from the format (PAR/REC
    is MR), from the original file name in the restricted manifest (its BIDS suffix, and as a
    description) and from the volume's shape and voxel size. Nothing of the original name leaves
    this function: decisions record only which rule applied."""
    images = []
    for subj in manifest.get("subjects", []):
        subject = subj["subject"]
        rows = [f for f in subj["files"] if f.get("format") not in (None, "dicom")]
        follow: dict[str, list[dict]] = {}
        for f in rows:
            if f.get("primary"):
                follow.setdefault(f["primary"], []).append(f)
        for f in rows:
            if f.get("primary") or f["format"] not in VOLUME_FORMATS:
                continue
            base = f"{f['release_dir']}/{subject}/"
            rel = base + f["out_relpath"]
            if not keeper.available(rel):
                continue                        # quarantined by the other stage
            data_rel = sidecar = ""
            for g in follow.get(f["relpath"], []):
                if g["format"] == "json":
                    sidecar = base + g["out_relpath"]
                elif g["format"] in ("img", "rec"):
                    data_rel = base + g["out_relpath"]
            try:
                images.append(_describe_other(f, subject, rel, data_rel, sidecar, keeper, face_cfg))
            except Exception as exc:  # a volume nibabel cannot read is not known to be a head
                log.warning("%s: not readable as a volume (%s); released as it is", rel, type(exc).__name__)
    return images


def _describe_other(f: Mapping[str, Any], subject: str, rel: str, data_rel: str, sidecar_rel: str,
                    keeper: Keeper, face_cfg) -> _Image:
    import nibabel as nib
    from ..formats.base import stem_of
    where = keeper.root / rel if (keeper.root / rel).is_file() else keeper.orig / rel  # withheld earlier
    hdr_img = nib.load(where)
    shape, affine = tuple(hdr_img.shape), np.asarray(hdr_img.affine, float)
    side: Mapping[str, Any] = {}
    if sidecar_rel and (keeper.root / sidecar_rel).is_file():
        try:
            side = json.loads((keeper.root / sidecar_rel).read_text(encoding="utf-8"))
        except ValueError:
            side = {}
    name = f["relpath"].rsplit("/", 1)[-1]
    suffix = bids_suffix(name)
    modality = str(side.get("Modality") or ("MR" if f["format"] == "parrec" else ""))
    body = str(side.get("BodyPartExamined") or "")
    description = " ".join([*(str(side.get(k) or "") for k in ("SeriesDescription", "ProtocolName")),
                            stem_of(name)]).strip()
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    facts = ImageFacts(path=rel, suffix=suffix, modality=modality, body_part=body, description=description,
                       extent_mm=extent_mm(shape[:3], zooms), bare=not (modality or body or suffix),
                       volumes=int(np.prod(shape[3:])) if len(shape) > 3 else 1)
    return _Image({"format": f["format"]}, subject, rel, shape, affine, facts, decide(facts, face_cfg), None,
                  fmt=f["format"], data_rel=data_rel, sidecar_rel=sidecar_rel)


def _groups(images: list[_Image]) -> list[list[_Image]]:
    """Images sharing one mask: same series folder, same method and same voxel grid. The
    reference (first) is a magnitude image when there is one, then the first by path."""
    groups: dict[tuple, list[_Image]] = {}
    for im in images:
        key = (im.subject, im.entry.get("series") or im.rel, im.decision.method, im.shape[:3],
               tuple(np.round(im.affine, 3).ravel()))
        groups.setdefault(key, []).append(im)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], str(k[1]), k[2])):
        members = sorted(groups[key], key=lambda im: ("part-phase" in im.rel, im.rel))
        out.append(members)
    return out


# ---------------------------------------------------------------------------------------------- one registration per head
def _removal(backend, vol, im: _Image, registrations: dict) -> np.ndarray:
    """The removal mask (RAS) of ``im``. A backend with a reusable registration (``ants``:
    ``registration(data, affine, modality)`` -> an object with ``mask_for(shape, affine)``) registers
    each head once: series of a subject that share a DICOM frame of reference reuse the first one's
    registration, the mask being looked up in physical space on each series' own grid. Without a
    shared frame of reference (NIfTI inputs, a patient repositioned) every image registers anew:
    physical coordinates of two frames are not comparable, so reuse would risk a missed face."""
    fit = getattr(backend, "registration", None)
    if fit is None:
        return np.asarray(backend.removal_mask(vol), dtype=bool)
    key = _frame_of_reference(im)
    reg = registrations.get(key) if key else None
    if reg is None:
        reg = fit(vol.data, vol.affine, "CT" if im.facts.modality.upper() == "CT" else "MR")
        if key:
            registrations[key] = reg
    else:
        log.info("%s: registration of the same head reused (frame of reference shared)", im.rel)
    return np.asarray(reg.mask_for(vol.data.shape, vol.affine), dtype=bool)


def _frame_of_reference(im: _Image) -> tuple[str, str] | None:
    """(subject, FrameOfReferenceUID) of the image's released DICOM series, or None."""
    if im.series_dir is None:
        return None
    import pydicom
    for path in sorted(im.series_dir.glob("*.dcm")):
        try:
            uid = pydicom.dcmread(path, specific_tags=["FrameOfReferenceUID"]).get("FrameOfReferenceUID")
        except Exception:  # noqa: BLE001 - unreadable: no reuse, the image registers on its own
            return None
        return (im.subject, str(uid)) if uid else None
    return None


MIN_FACE_TISSUE = 0.005


def implausible(vol, removed: np.ndarray, method: str) -> str | None:
    """Why a removal mask cannot be right (a registration that missed the head removes no
    tissue), or None."""
    tissue = vol.data > render.skin_threshold(vol.data)
    if not tissue.any():
        return "no tissue in the image"
    share = float((removed & tissue).sum()) / float(tissue.sum())
    if method == "deface" and share < MIN_FACE_TISSUE:
        return f"defacing removed only {100 * share:.2f}% of the head (registration failed?)"
    if method == "skullstrip" and share > 0.98:
        return "skull-stripping removed the whole head (no brain found)"
    return None


def _save_mask(path: Path, native: np.ndarray, affine: np.ndarray) -> None:
    """The removed region (uint8 NIfTI, restricted) for audits and tests."""
    import gzip

    import nibabel as nib
    img = nib.Nifti1Image(native.astype(np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    path = path.with_name(_stem(path.name) + "_removed.nii.gz")
    make_restricted_dir(path.parent)
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0), RESTRICTED_FILE_MODE)


def _planned_uids(series_todo, keeper: Keeper, pseudo) -> dict[str, str]:
    """Old → new SOP Instance UID of every DICOM image the unit's write-back will rewrite (new UIDs
    are keyed on the old one and the method, so they are known before anything is written, and
    every file is written once). Files without pixel data are not rewritten and keep their UID."""
    import pydicom
    planned: dict[str, str] = {}
    for ref, _group, _grid, method, _backend in series_todo:
        for rel in keeper.dicom_files(ref.series_dir):
            try:
                ds = pydicom.dcmread(io.BytesIO(keeper.pristine(rel)), specific_tags=["SOPInstanceUID", "PixelData"])
            except Exception:  # noqa: BLE001 - the write-back withholds what it cannot read
                continue
            old = str(ds.get("SOPInstanceUID") or "")
            if old and "PixelData" in ds:
                planned[old] = new_uid(pseudo, method, old)
    return planned


def new_uid(pseudo, method: str, old: str) -> str:
    """The keyed SOP Instance UID of the defaced / skull-stripped image whose released UID is ``old``."""
    return pseudo.uid(f"{UID_DOMAIN}\x00{method}\x00{old}")


def _dicom_series(ref: _Image, group: list[_Image], grid: tuple[np.ndarray, np.ndarray], method: str, backend: str,
                  keeper: Keeper, pseudo, planned: dict[str, str], uid_map: dict, bad: list) -> tuple[int, int]:
    """Write the mask (``grid``: the NIfTI affine and the native mask, shared by the group's
    members) into every file of the series the group was converted from; references to any
    rewritten image of the unit (``planned``) follow their new UIDs."""
    grids = [grid]
    rels = keeper.dicom_files(ref.series_dir)
    derivation = (f"{'Defaced' if method == 'deface' else 'Skull-stripped'} by deidflow {__version__} "
                  f"(backend {backend}): voxels of the removed region set to 0")
    note = f"deidflow face: {method} ({backend})"
    n = withheld = 0
    for rel in rels:
        data = keeper.source(rel)
        try:
            res = mask_dicom(data, grids, lambda old: planned.get(old) or new_uid(pseudo, method, old), derivation,
                             note, refs=planned)
        except GeometryMismatch as exc:
            keeper.withdraw(rel)
            bad.append((rel, f"face: {exc}; withheld from the release"))
            withheld += 1
            continue
        if res is None:
            continue
        keeper.publish(rel, res.data)
        uid_map[res.old_sop_instance_uid] = res.new_sop_instance_uid
        n += 1
    return n, withheld


def _follow_references(images: list[_Image], dicom_root: Path, keeper: Keeper, rewritten: set[str],
                       uid_map: Mapping[str, str]) -> int:
    """Every other released DICOM file of the unit's subjects that references a rewritten image
    (ReferencedSOPInstanceUID or any UI value at any depth) gets the new UID, through the same
    pristine-copy bookkeeping as the write-back (kill-safe, undone when no longer needed)."""
    if not uid_map:
        return 0
    changed = 0
    for subject in sorted({im.subject for im in images}):
        folder = dicom_root / subject
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.dcm")):
            rel = str(path.relative_to(keeper.root))
            if rel in rewritten or not path.is_file():
                continue
            pristine = keeper.pristine(rel)
            if not (uids_in(pristine) & uid_map.keys()):
                continue
            try:
                new = remap_file(keeper.source(rel), dict(uid_map))
            except Exception as exc:  # unreadable by pydicom: the file stays as the dicom stage wrote it
                log.warning("%s: references not updated (%s)", rel, type(exc).__name__)
                continue
            if new is not None:
                keeper.publish(rel, new)
                changed += 1
    return changed


def _stem(rel: str) -> str:
    from ..formats.base import stem_of
    return stem_of(rel.rsplit("/", 1)[-1])


def _qc(ref: _Image, vol, removed: np.ndarray, method: str, backend: str, release_root: Path, restricted: Path,
        face_cfg) -> list[dict]:
    """Front views before/after and three-plane slices of one processed image."""
    after = vol.data.copy()
    after[removed] = 0
    thr = render.skin_threshold(vol.data)
    stem = _stem(ref.rel)
    what = "defaced" if method == "deface" else "skull-stripped"
    center = None
    tissue = removed & (vol.data > thr)  # where the face was, not the air in front of it
    if tissue.any() and method == "deface":
        c = np.median(np.argwhere(tissue), axis=0).astype(int)
        center = (vol.data.shape[0] // 2, int(c[1]), int(c[2]))
    shots = [
        (f"{stem}_face-front-before.png", "face_front_before",
         f"{ref.rel}: skin surface seen from the front, before ({what} by {backend})",
         render.front_view(vol.data, vol.zooms, thr), bool(not face_cfg.get("qc_before_in_release"))),
        (f"{stem}_face-front-after.png", "face_front_after",
         f"{ref.rel}: skin surface seen from the front, after ({what} by {backend})",
         render.front_view(after, vol.zooms, thr), False),
        (f"{stem}_face-slices.png", "face_slices",
         f"{ref.rel}: sagittal, coronal and axial slices after ({what} by {backend}); removed region outlined in red",
         render.slices_view(after, removed, vol.zooms, center), False),
    ]
    entries = []
    for name, kind, caption, img, private in shots:
        folder = (restricted / "qc" if private else release_root / QC_DIR) / ref.subject / "face"
        if private:
            make_restricted_dir(folder)
        atomic_write_bytes(folder / name, render.png_bytes(img), RESTRICTED_FILE_MODE if private else RELEASE_FILE_MODE)
        entries.append({"file": name, "caption": caption, "kind": kind, **({"restricted": True} if private else {})})
    return entries


def _write_qc_index(folder: Path, entries: list[dict], mode: int) -> None:
    if not entries:
        return
    if mode == RESTRICTED_FILE_MODE:
        make_restricted_dir(folder)
    text = json.dumps([{k: e[k] for k in ("file", "caption", "kind")} for e in entries], indent=1) + "\n"
    atomic_write_text(folder / "index.json", text, mode)
