"""The ``face`` job of one unit: deface or skull-strip every selected head MRI image of the unit's
BIDS release and the de-identified DICOM series it was converted from.

Input is the ``convert`` stage's done marker (release path, series folder and BIDS suffix of every
image). Release files are changed in place, each by a temporary file and a rename. Before a
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
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_bytes, atomic_write_text, make_restricted_dir
from . import render
from .apply import GeometryMismatch, Nifti, mask_dicom
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
    result: dict = field(default_factory=dict)
    nifti: Nifti | None = None

    def load(self, keeper: "Keeper") -> Nifti:
        """The pristine image (kept in the restricted folder before anything changes)."""
        if self.nifti is None:
            self.nifti = Nifti.from_bytes(keeper.source(self.rel))
        return self.nifti


def face_unit(convert_done: Path, dicom_root: Path, release_root: Path, restricted: Path, done: Path,
              quarantine: Path, settings: Mapping[str, Any], face_cfg: Mapping[str, Any]) -> dict:
    """Run the face stage for one unit; returns counts (images treated, DICOM files rewritten…)."""
    marker = json.loads(Path(convert_done).read_text())
    unit = marker["unit"]
    release_root, restricted, dicom_root = Path(release_root), Path(restricted), Path(dicom_root)
    work = make_restricted_dir(restricted / "work" / "face" / unit)
    keeper = Keeper(release_root, work)
    dicom_in_release = dicom_root.resolve().is_relative_to(release_root.resolve())
    images: list[_Image] = []
    for subj in marker.get("subjects", []):
        series_cache: dict[str, Any] = {}
        for entry in list(subj.get("images", [])) + list(subj.get("unsorted", [])):
            if not keeper.available(entry["nifti"]):
                log.warning("%s: listed by convert but not in the release; skipped", entry["nifti"])
                continue
            images.append(_describe(entry, subj["subject"], keeper, dicom_root, series_cache, face_cfg))
    bad: list[tuple[str, str]] = []
    uid_map: dict[str, str] = {}
    qc: dict[str, list[dict]] = {}
    counts = {"images": len(images), "treated": 0, "dicom_files": 0, "withheld": 0}
    pseudo = None
    for group in _groups([im for im in images if im.decision.method != "none"]):
        ref = group[0]
        method = ref.decision.method
        backend_name = face_cfg["deface_backend"] if method == "deface" else face_cfg["skullstrip_backend"]
        program = face_cfg["external"][method]
        from .backends import get_backend
        backend = get_backend(backend_name, program)
        t0 = time.perf_counter()
        nii = ref.load(keeper)
        vol = reference_volume(nii.real(), nii.affine)
        removed_ras = np.asarray(backend.removal_mask(vol), dtype=bool)
        native = vol.to_native(removed_ras)
        seconds = round(time.perf_counter() - t0, 2)
        frac = float(removed_ras.mean())
        _save_mask(work / "masks" / ref.rel, native, nii.affine)
        problem = implausible(vol, removed_ras, method)
        if problem:  # never release a face the backend missed: withhold the group's files
            for im in group:
                keeper.withdraw(im.rel)
                bad.append((im.rel, f"face: {problem}; withheld from the release"))
                im.result = {"backend": backend_name, "withheld": problem}
            if dicom_in_release and ref.series_dir is not None:
                for rel in keeper.dicom_files(ref.series_dir):
                    keeper.withdraw(rel)
                    bad.append((rel, f"face: {problem}; withheld from the release"))
            counts["withheld"] += len(group)
            log.warning("%s: %s; withheld", ref.rel, problem)
            continue
        for im in group:
            keeper.publish(im.rel, im.load(keeper).masked(native))
            im.result = {"backend": backend_name, "removed_fraction": round(frac, 4), "mask_from": ref.rel,
                         "seconds": seconds if im is ref else 0.0}
            counts["treated"] += 1
            if im is not ref:
                im.nifti = None  # free memory early (4D series)
        log.info("%s: %s by %s, %.1f%% of voxels removed, %.1f s", ref.rel, method, backend_name, 100 * frac, seconds)
        qc.setdefault(ref.subject, []).extend(
            _qc(ref, vol, removed_ras, method, backend_name, release_root, restricted, face_cfg))
        if dicom_in_release and ref.series_dir is not None:
            if pseudo is None:
                from ..release import pseudonymizer_from_settings
                pseudo = pseudonymizer_from_settings(settings)
            n, withheld = _dicom_series(ref, group, native, method, backend_name, keeper, release_root, pseudo,
                                        uid_map, bad)
            counts["dicom_files"] += n
            counts["withheld"] += withheld
            ref.result["dicom_files"] = n
    for rel in keeper.restore_untouched():  # files of images no longer selected: undo earlier runs
        log.info("%s: restored (no longer selected)", rel)
    for subject, entries in sorted(qc.items()):
        _write_qc_index(release_root / QC_DIR / subject / "face", [e for e in entries if not e.get("restricted")],
                        RELEASE_FILE_MODE)
        _write_qc_index(restricted / "qc" / subject / "face", entries, RESTRICTED_FILE_MODE)
    from ..fsutil import csv_text
    atomic_write_text(work / "uids.csv", csv_text([("id_old", "id_new"), *sorted(uid_map.items())]),
                      RESTRICTED_FILE_MODE)
    make_restricted_dir(Path(quarantine).parent)
    atomic_write_text(quarantine, "".join(json.dumps({"file": p, "reason": r}) + "\n" for p, r in sorted(bad)),
                      RESTRICTED_FILE_MODE)
    report = {"unit": unit, "deidflow": __version__, "images": [
        {"nifti": im.rel, "series": im.entry.get("series", ""), "suffix": im.facts.suffix,
         "method": im.decision.method, "reason": im.decision.reason, **im.result} for im in images]}
    make_restricted_dir(Path(done).parent)
    atomic_write_text(done, json.dumps(report, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    return counts


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
    return _Image(entry, subject, rel, shape, affine, facts, decide(facts, face_cfg),
                  series_dir if series_dir is not None and series_dir.is_dir() else None)


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


def _dicom_series(ref: _Image, group: list[_Image], native: np.ndarray, method: str, backend: str,
                  keeper: Keeper, release_root: Path, pseudo, uid_map: dict, bad: list) -> tuple[int, int]:
    """Write the mask into every file of the series the group was converted from."""
    grids = [(ref.nifti.affine, native)]  # members share the reference's grid
    rels = keeper.dicom_files(ref.series_dir)
    derivation = (f"{'Defaced' if method == 'deface' else 'Skull-stripped'} by deidflow {__version__} "
                  f"(backend {backend}): voxels of the removed region set to 0")
    note = f"deidflow face: {method} ({backend})"
    n = withheld = 0
    for rel in rels:
        data = keeper.source(rel)
        try:
            res = mask_dicom(data, grids, lambda old: pseudo.uid(f"{UID_DOMAIN}\x00{method}\x00{old}"),
                             derivation, note)
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


def _stem(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


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
