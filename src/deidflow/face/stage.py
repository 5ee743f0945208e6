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
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..fsutil import QC_SUBDIR, RESTRICTED_FILE_MODE, atomic_write_bytes, atomic_write_text, gzip_bytes, make_restricted_dir
from . import render
from ..qc import captions
from ..errors import PublicError, output_error_of
from ..formats import VOLUME_FORMATS
from .apply import GeometryMismatch, Nifti, derived_sidecar, mask_dicom, remap_file, uids_in
from .select import (MAX_BARE_VOLUMES, MIN_PICTURE_PIXELS, MR_SUFFIXES, PROFILE, SERIES_SUFFIXES, Decision,
                     ImageFacts, ct_under_pet_label, decide, extent_mm, head_picture, head_shape, kind_of, label_image,
                     modality_of, names_head, rendering, sagittal)
from .volume import for_backend, reference_volume, removed_value

log = logging.getLogger("deidflow")
UID_DOMAIN = "deidflow-face"
STAGED_FILE_MODE = RESTRICTED_FILE_MODE  # staged files; the release gate makes them 0644


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
        return (self.root / rel).is_file() or ((self.orig / rel).is_file() and self._recorded(rel) in ("withdrawn", None))

    def source(self, rel: str) -> bytes:
        """The pristine bytes of release file ``rel`` (kept, or refreshed from the release)."""
        self.touched.add(rel)
        kept, path = self.orig / rel, self.root / rel
        recorded = self._recorded(rel)
        if not path.exists():
            if kept.exists() and recorded in ("withdrawn", None):
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
        atomic_write_bytes(path, data, path.stat().st_mode & 0o777 if path.exists() else STAGED_FILE_MODE)

    def dicom_files(self, folder: Path) -> list[str]:
        """Release-relative paths of the DICOM files of a series folder, withheld ones included."""
        rel_dir = folder.relative_to(self.root)
        rels = {str(p.relative_to(self.root)) for p in folder.glob("*.dcm") if p.is_file()}
        kept = self.orig / rel_dir
        if kept.is_dir():
            rels |= {str(rel_dir / p.name) for p in kept.glob("*.dcm") if self.available(str(rel_dir / p.name))}
        return sorted(rels)

    def withdraw(self, rel: str) -> None:
        """Take a release file out (its pristine copy stays in the restricted folder). When the
        copy cannot be written (disk full), the release file itself is moved there when it is
        still pristine, else deleted: a face never stays in the release for lack of space."""
        try:
            self.source(rel)
            self._record(rel, "withdrawn")
        except OSError:
            path, kept = self.root / rel, self.orig / rel
            if path.exists():
                try:
                    if kept.exists() or self._recorded(rel) not in (None, "withdrawn"):
                        raise OSError("not pristine")
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, kept)
                except OSError:
                    path.unlink(missing_ok=True)
            try:
                self._record(rel, "withdrawn")
            except OSError:
                pass
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
                                   path.stat().st_mode & 0o777 if path.exists() else STAGED_FILE_MODE)
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


# Formats of the other stage (VOLUME_FORMATS) whose voxels the face stage can write back.
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
    unit_manifest = json.loads(Path(manifest).read_text()) if manifest else {"subjects": []}
    if convert is None and other is None and not manifest:
        raise ValueError("the face job needs the unit's manifest or the convert or other stage's done marker")
    unit = (convert or other or unit_manifest)["unit"]
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
    if other is not None:
        images += _other_images(unit_manifest, keeper, face_cfg)
    series = _dicom_only_series(convert, unit_manifest, keeper, dicom_root, dicom_in_release, face_cfg)
    _split_heads(series, face_cfg)
    bad: list[tuple[str, str]] = []  # (release path, reason); listed by input path (quarantine.tsv's form)
    uid_map: dict[str, str] = {}
    qc: dict[str, list[dict]] = {}
    counts = {"images": len(images) + len(series), "treated": 0, "dicom_files": 0, "withheld": 0, "references": 0}
    jobs: list[_SeriesJob] = []
    fatal: list[BaseException] = []
    registrations: dict[tuple[str, str], Any] = {}   # one registration per head: see _removal_mask
    for group in _groups([im for im in images if im.decision.method != "none"]):
        ref = group[0]
        method = ref.decision.method
        backend_name = face_cfg["deface_backend"] if method == "deface" else face_cfg["skullstrip_backend"]
        series_dir = ref.series_dir if dicom_in_release else None
        if method == "withhold":   # a rendering of the head: a picture, nothing to deface
            _withhold(group, ref.decision.reason, "", keeper, bad, counts)
            if series_dir is not None:
                _withdraw_all(keeper.dicom_files(series_dir), ref.decision.reason, keeper, bad)
            continue
        if ref.fmt not in WRITABLE_FORMATS:   # selected, but its voxels cannot be rewritten: never release the face
            _withhold(group, f"{ref.fmt} volumes cannot be {method}d in place", backend_name, keeper, bad, counts)
            continue
        try:
            t0 = time.perf_counter()
            nii = ref.load(keeper)
            vol = reference_volume(nii.real(), nii.affine)
            bvol = for_backend(vol, ref.facts.modality)
            thr = render.skin_threshold(bvol.data)   # once per image: registration crop, plausibility, QC
            removed_ras = _removal_mask(bvol, method, backend_name, face_cfg, _frame_of_reference(ref), registrations,
                                        threshold=thr)
            native = vol.to_native(removed_ras)
            seconds = round(time.perf_counter() - t0, 2)
            frac = float(removed_ras.mean())
            _save_mask(work / "masks" / ref.rel, native, nii.affine)
            problem = implausible(bvol, removed_ras, method, thr)
            if problem:  # never release a face the backend missed: withhold the group's files
                raise _Implausible(problem)
            fill = removed_value(ref.facts.modality)
            for im in group:
                real = im.load(keeper).real() if len(im.shape) > 3 and int(np.prod(im.shape[3:])) > 1 else None
                if real is not None:   # a 4D image: every volume gets this mask, so each must show the head here
                    flat = real.reshape(real.shape[:3] + (-1,))
                    moved = moved_volume((flat[..., 0], (flat[..., k] for k in range(1, flat.shape[-1]))), im.affine)
                    del real, flat
                    if moved:
                        raise _Implausible(moved)
            for im in group:
                keeper.publish(im.data_rel, im.load(keeper).masked(native, fill))
                _mark_sidecar(im, keeper)
                im.result = {"backend": backend_name, "removed_fraction": round(frac, 4), "mask_from": ref.rel,
                             "seconds": seconds if im is ref else 0.0}
                counts["treated"] += 1
                if im is not ref:
                    im.nifti = None  # free memory early (4D series)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the face is not released
            problem = _why(exc)
            _withhold(group, problem, backend_name, keeper, bad, counts)
            if series_dir is not None:
                _withdraw_all(keeper.dicom_files(series_dir), problem, keeper, bad)
            log.warning("%s: %s; withheld", ref.rel, problem)
            if isinstance(exc, OSError):
                fatal.append(exc)
            continue
        log.info("%s: %s by %s, %.1f%% of voxels removed, %.1f s", ref.rel, method, backend_name, 100 * frac, seconds)
        qc.setdefault(ref.subject, []).extend(
            _qc(ref.rel, ref.subject, bvol, removed_ras, method, backend_name, release_root, restricted, face_cfg, thr))
        if series_dir is not None:
            jobs.append(_SeriesJob(ref.subject, series_dir, ref.rel, method, backend_name, [(nii.affine, native)],
                                   False, fill, ref.facts.modality, ref.result))
        ref.nifti = None
    for ser in series:  # DICOM series without a converted image: reconstructed from the DICOM itself
        for rel in ser.unreadable:
            _withdraw_all([rel], "not readable as DICOM: cannot tell whether it shows a face", keeper, bad)
            counts["withheld"] += 1
        if ser.decision.method == "withhold":   # a rendering of the head: a picture, nothing to deface
            _withdraw_all(keeper.dicom_files(ser.folder), ser.decision.reason, keeper, bad)
            ser.result = {"withheld": ser.decision.reason}
            counts["withheld"] += 1
            continue
        if ser.decision.method == "none":
            ser.files, ser.volume = {}, None
            continue
        job = _series_job(ser, ser.decision.method, keeper, work, release_root, restricted, face_cfg, qc, bad,
                          counts, fatal)
        if job is not None:
            jobs.append(job)
    if jobs:  # DICOM write-back once every new UID is known, so references follow them
        from ..release import pseudonymizer_from_settings
        pseudo = pseudonymizer_from_settings(settings)
        planned = _planned_uids(jobs, keeper, pseudo)
        done_jobs = []
        for job in jobs:
            try:
                n, withheld = _dicom_series(job, keeper, pseudo, planned, uid_map, bad)
            except _GridMismatch:
                # the converted image's grid is not the series' (tilted gantry, irregular spacing,
                # frames dcm2niix left out): deface the series from its own reconstruction
                ser = _describe_series(job.subject, job.folder, keeper, face_cfg)
                sjob = _series_job(ser, job.method, keeper, work, release_root, restricted, face_cfg, qc, bad,
                                   counts, fatal, count=False)
                if sjob is None:
                    continue
                job.result["dicom_mask_from"] = "series reconstruction (frames off the converted image's grid)"
                job = sjob
                try:
                    n, withheld = _dicom_series(job, keeper, pseudo, planned, uid_map, bad)
                except Exception as exc:  # noqa: BLE001
                    _fail_series(job, exc, keeper, bad, fatal)
                    continue
            except Exception as exc:  # noqa: BLE001 - disk full, encoder failure: withheld, never released
                _fail_series(job, exc, keeper, bad, fatal)
                continue
            counts["dicom_files"] += n
            counts["withheld"] += withheld
            job.result["dicom_files"] = n
            done_jobs.append(job)
        rewritten = {rel for job in done_jobs for rel in keeper.dicom_files(job.folder)}
        counts["references"] = _follow_references(images, series, dicom_root, keeper, rewritten, planned)
    for rel in keeper.restore_untouched():  # files of images no longer selected: undo earlier runs
        log.info("%s: restored (no longer selected)", rel)
    for subject, entries in sorted(qc.items()):
        _write_qc_index(release_root / QC_SUBDIR / subject / "face", [e for e in entries if not e.get("restricted")],
                        STAGED_FILE_MODE)
        _write_qc_index(restricted / "qc" / subject / "face", entries, RESTRICTED_FILE_MODE)
    from ..fsutil import csv_text
    atomic_write_text(work / "uids.csv", csv_text([("id_old", "id_new"), *sorted(uid_map.items())]),
                      RESTRICTED_FILE_MODE)
    lines = _input_lines(bad, unit_manifest, images)
    make_restricted_dir(Path(quarantine).parent)
    atomic_write_text(quarantine, "".join(json.dumps({"file": p, "reason": r}) + "\n" for p, r in lines),
                      RESTRICTED_FILE_MODE)
    if fatal:  # the job fails (disk full, …): a rerun recomputes everything from the kept copies
        exc = fatal[0]
        raise FaceOutputError(f"face job of {unit}: {_why(exc)}; the affected images were withheld") from None
    report = {"unit": unit, "deidflow": __version__, "references_updated": counts["references"], "images": [
        {"nifti": im.rel, "series": im.entry.get("series", ""), "suffix": im.facts.suffix, "format": im.fmt,
         "method": im.decision.method, "reason": im.decision.reason, **im.result} for im in images] + [
        {"dicom_series": ser.rel, "modality": ser.facts.modality if ser.facts else "",
         "method": ser.decision.method, "reason": ser.decision.reason, **ser.result} for ser in series]}
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
    """Take every file of the group's images out of the release (kept in the restricted folder),
    their sidecars (JSON, bval, bvec) with them."""
    for im in group:
        extra = [f for f in (im.sidecar_rel, *im.entry.get("files", ())) if f and f not in im.files]
        for rel in im.files + [f for f in dict.fromkeys(extra) if keeper.available(f)]:
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
    suffix = str(entry.get("suffix") or "")
    volumes = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    kind, _ = kind_of(suffix, rel, attrs, volumes)
    facts = ImageFacts(
        path=rel, suffix=suffix,
        modality=modality_of(attrs) or modality_of({"Modality": entry.get("modality") or ""}),
        body_part=str(attrs.get("BodyPartExamined") or ""),
        description=" ".join(str(attrs.get(k) or "") for k in ("SeriesDescription", "ProtocolName")).strip(),
        extent_mm=extent_mm(shape[:3], zooms), volumes=volumes, kind=kind,
        in_plane_mm=float(sorted(zooms)[1]) if len(zooms) >= 2 else 0.0, sagittal=_thin_sagittal(shape, affine),
        picture=head_picture(attrs, face_cfg["select"]["body_parts"], tuple(shape[:2])) if attrs else "")
    sidecar = next((f for f in entry.get("files", ()) if f.endswith(".json")), "")
    why = rendering(attrs, face_cfg["select"]["body_parts"])
    im = _Image(entry, subject, rel, shape, affine, facts, Decision("withhold", why) if why else decide(facts, face_cfg),
                series_dir if series_dir is not None and series_dir.is_dir() else None, sidecar_rel=sidecar)
    _pet_holding_ct(im, keeper, face_cfg)
    _shape_test(im, keeper, face_cfg)
    return im


def _pet_holding_ct(im: "_Image", keeper: "Keeper", face_cfg) -> None:
    """A converted image under a PET label holding CT values is decided as a CT
    (:func:`.select.ct_under_pet_label`)."""
    def volume() -> np.ndarray:
        try:
            return reference_volume(im.load(keeper).real(), im.affine).data
        finally:
            im.nifti = None
    found = ct_under_pet_label(im.facts, im.decision, face_cfg, volume)
    if found:
        im.facts, im.decision = found


def _volume_picture(img, spatial) -> str:
    """What 2D picture a NIfTI file is — colour (RGB) pixels, or no scanner geometry at all
    (qform and sform codes 0: a photograph or rendering saved as NIfTI) — or "" (red-team 7).
    A picture without 3D coverage is withheld by :func:`.select.decide`; an icon is no picture."""
    dims = sorted(int(n) for n in tuple(spatial[:3]) + (1,) * (3 - len(spatial[:3])))
    if dims[1] < MIN_PICTURE_PIXELS:
        return ""
    import nibabel as nib
    if img.get_data_dtype().names:
        return "a 2D colour picture"
    if isinstance(img, nib.Nifti1Pair) and not (int(img.header["qform_code"]) or int(img.header["sform_code"])):
        return "a 2D picture without scanner geometry"   # (NIfTI-1/2 images and pairs are Nifti1Pairs)
    return ""


def _thin_sagittal(shape, affine: np.ndarray) -> bool:
    """Whether the thinnest axis of an image (its slices' normal) points left-right."""
    from .select import sagittal
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ext = [float(n) * float(z) for n, z in zip(tuple(shape[:3]) + (1,) * (3 - len(shape[:3])), zooms)]
    return sagittal(np.asarray(affine)[:3, int(np.argmin(ext))])


def _shape_test(im: "_Image", keeper: "Keeper", face_cfg) -> None:
    """When the labels do not say whether an image is a head, its volume decides (head_shape)."""
    from dataclasses import replace
    if not im.decision.pending:
        return
    try:
        nii = im.load(keeper) if im.fmt in WRITABLE_FORMATS else None
        if nii is None:
            raise ValueError("not readable here")
        real = nii.real()
        flat = real.reshape(real.shape[:3] + (-1,)) if real.ndim > 3 else real[..., None]
        # a few volumes: any of them may be the head (a decoy first volume, red-team 7)
        for k in range(flat.shape[-1] if flat.shape[-1] <= MAX_BARE_VOLUMES else 1):
            vol = for_backend(reference_volume(flat[..., k], nii.affine), im.facts.modality)
            ok, why = head_shape(vol.data, vol.zooms, render.skin_threshold(vol.data))
            if ok:
                break
    except Exception as exc:  # noqa: BLE001 - it cannot be looked at: it might be a head
        im.decision = Decision(face_cfg["method"], f"labels do not say whether this is a head and the volume "
                                                   f"cannot be read ({type(exc).__name__})")
        return
    finally:
        im.nifti = None
    d = decide(replace(im.facts, head_shape=ok), face_cfg)
    im.decision = Decision(d.method, f"{d.reason} ({why})")


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
            except Exception as exc:  # noqa: BLE001 - not known not to be a head: never released
                # (the other stage withholds a volume it cannot read, so this is a second line)
                why = f"not readable as a volume ({type(exc).__name__}), so not known to show no face"
                images.append(_Image({"format": f["format"]}, subject, rel, (0, 0, 0), np.eye(4), ImageFacts(
                    rel, "", "", "", "", ()), Decision("withhold", why), None, fmt=f["format"], data_rel=data_rel,
                    sidecar_rel=sidecar))
    return images


def _describe_other(f: Mapping[str, Any], subject: str, rel: str, data_rel: str, sidecar_rel: str,
                    keeper: Keeper, face_cfg) -> _Image:
    import nibabel as nib
    from ..formats.base import stem_of
    from ..pixels.volumes import spatial_shape
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
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spatial, volumes = spatial_shape(hdr_img)  # a MINC's time dimension may come first
    modality = modality_of(side) or ("MR" if f["format"] == "parrec" or suffix in MR_SUFFIXES else "")
    if suffix in SERIES_SUFFIXES and volumes < 2:
        suffix = ""     # BIDS bold / dwi / asl are 4D: a 3D file so named is no such series (red-team 6)
    labels = False
    if suffix and not modality and suffix not in MR_SUFFIXES and suffix not in face_cfg["select"]["suffixes"]:
        # a derivative's name (_mask, _dseg, ...): a mask or label image shows no face; a greyscale
        # image so named is what its voxels show, not what its name says (red-team 7)
        labels = label_image(np.asanyarray(hdr_img.dataobj))
        suffix = suffix if labels else ""
    body = str(side.get("BodyPartExamined") or "")
    description = " ".join([*(str(side.get(k) or "") for k in ("SeriesDescription", "ProtocolName")),
                            stem_of(name)]).strip()
    facts = ImageFacts(path=rel, suffix=suffix, modality=modality, body_part=body, description=description,
                       extent_mm=extent_mm(spatial[:3], zooms), bare=not (modality or body or suffix),
                       volumes=volumes, in_plane_mm=float(sorted(zooms)[1]) if len(zooms) >= 2 else 0.0,
                       sagittal=_thin_sagittal(spatial, affine), picture=_volume_picture(hdr_img, spatial))
    decision = Decision("none", "a mask or label image (few whole-number values, piecewise constant): no face") \
        if labels else decide(facts, face_cfg)
    im = _Image({"format": f["format"]}, subject, rel, shape, affine, facts, decision, None,
                fmt=f["format"], data_rel=data_rel, sidecar_rel=sidecar_rel)
    _shape_test(im, keeper, face_cfg)
    return im


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
SAME_HEAD_NMI = 1.1   # normalised mutual information of a later volume with the first, at 6 mm


def moved_volume(volumes, affine: np.ndarray) -> str | None:
    """Why a later volume of an image cannot get the first volume's mask, or None. Every volume of
    a selected image (echoes, inversions, time points) is masked with the first one's region: a
    later volume whose head lies elsewhere (moved, turned: a 4D file or series whose first volume is
    a decoy) kept its face (red-team 6). ``volumes``: the first volume, then an iterable of the
    others (arrays on the same grid). On the real chris_t1 the first volume against echoes at 0.45-1
    of its intensity gives 1.80-2.00, against a non-monotone contrast (an inversion) 1.48, against
    itself moved 10 mm 1.06 or turned 1.03."""
    from . import ants_deface as ad
    first, others = volumes
    small0, _ = ad.downsample(np.asarray(first, np.float32), affine, 6.0)
    for k, data in enumerate(others, start=2):
        small, _ = ad.downsample(np.asarray(data, np.float32), affine, 6.0)
        both = (small0 > render.skin_threshold(small0)) | (small > render.skin_threshold(small))
        if both.any() and ad.nmi(small0[both], small[both]) < SAME_HEAD_NMI:
            return (f"volume {k} does not show the head where volume 1 does (moved or turned): the first "
                    "volume's mask would miss its face")
    return None


def implausible(vol, removed: np.ndarray, method: str, threshold: float | None = None) -> str | None:
    """Why a removal mask cannot be right (a registration that missed the head removes no
    tissue), or None. ``threshold``: :func:`.render.skin_threshold` of ``vol`` if known."""
    tissue = vol.data > (render.skin_threshold(vol.data) if threshold is None else threshold)
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
    import nibabel as nib
    img = nib.Nifti1Image(native.astype(np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    path = path.with_name(_stem(path.name) + "_removed.nii.gz")
    make_restricted_dir(path.parent)
    atomic_write_bytes(path, gzip_bytes(img.to_bytes()), RESTRICTED_FILE_MODE)


class FaceOutputError(PublicError):
    """The face job could not write its output (disk full, …): the affected images are withheld
    and the job fails, so that a rerun completes it."""


class _Implausible(Exception):
    """The backend's mask cannot be right (the message says why)."""


class _GridMismatch(Exception):
    """The series' frames do not lie on the converted image's grid."""


def _why(exc: BaseException) -> str:
    """A one-line reason without values from the data: the exception type, a system error string,
    or our own messages (which are built from counts and types only)."""
    from .ants_deface import OrientationMismatch
    from .backends import BackendUnavailable
    from .dicomvol import VolumeError
    if isinstance(exc, (_Implausible, VolumeError, GeometryMismatch, BackendUnavailable, PublicError,
                        OrientationMismatch)):
        return str(exc)
    if (full := output_error_of(exc)) is not None:
        return f"cannot write: {full.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"I/O error: {exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"{type(exc).__name__} while processing (registration or write-back failed)"


def _removal_mask(vol, method: str, backend_name: str, face_cfg, head: tuple[str, str] | None = None,
                  registrations: dict | None = None, threshold: float | None = None) -> np.ndarray:
    """The backend's mask; a field of view longer than a head (neck, whole body) is registered on
    its top part only (:func:`~.volume.head_part`) and the rest is kept.

    A backend with a reusable registration (``ants``: ``registration(data, affine)`` -> an object
    with ``mask_for(shape, affine)``) registers each ``head`` (subject, FrameOfReferenceUID) once:
    series that share a frame of reference reuse the first one's registration, the mask being
    looked up in physical space on each series' own grid. Without a shared frame of reference
    (NIfTI inputs, a patient repositioned) every image registers anew: physical coordinates of two
    frames are not comparable, so reuse would risk a missed face. ``threshold``: the skin threshold
    of ``vol`` when the caller has it (:func:`.render.skin_threshold`)."""
    from .backends import get_backend
    from .volume import crop, head_part
    backend = get_backend(backend_name, face_cfg["external"][method])
    if method == "deface":
        z0 = head_part(vol, render.skin_threshold(vol.data) if threshold is None else threshold)
    else:
        z0 = 0
    part_vol = crop(vol, z0)
    fit = getattr(backend, "registration", None)
    if fit is None or registrations is None:
        part = np.asarray(backend.removal_mask(part_vol), dtype=bool)
    else:
        reg = registrations.get(head) if head else None
        if reg is None:
            reg = fit(part_vol.data, part_vol.affine)  # CT arrives in T1-like contrast (volume.for_backend)
            if head:
                registrations[head] = reg
        else:
            log.info("registration of the same head reused (frame of reference shared)")
        part = np.asarray(reg.mask_for(part_vol.data.shape, part_vol.affine), dtype=bool)
    if z0 == 0:
        return part
    mask = np.zeros(vol.data.shape, bool)
    mask[:, :, z0:] = part
    return mask


def _withdraw_all(rels, problem: str, keeper: Keeper, bad: list) -> None:
    for rel in rels:
        if keeper.available(rel):
            keeper.withdraw(rel)
            bad.append((rel, f"face: {problem}; withheld from the release"))


@dataclass
class _Series:
    """A DICOM series folder of the release that no converted image covers (not converted,
    conversion failed, BIDS off, a copy in ``sourcedata/unsorted``): selected from its own headers."""

    subject: str
    folder: Path
    rel: str                      # release-relative folder, with a trailing "/"
    facts: ImageFacts | None
    decision: Decision
    files: dict[str, bytes] = field(default_factory=dict)
    stack: list = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    volume: Any = None            # the reconstruction (dicomvol.SeriesVolume), once made


@dataclass
class _SeriesJob:
    """A DICOM series to write a mask into."""

    subject: str
    folder: Path
    label: str                    # what the mask came from (release path), for logs
    method: str
    backend: str
    grids: list[tuple[np.ndarray, np.ndarray]]
    snap: bool                    # grids reconstructed from the series itself
    fill: float
    modality: str
    result: dict


def _dicom_only_series(convert, manifest, keeper: Keeper, dicom_root: Path, dicom_in_release: bool,
                       face_cfg) -> list[_Series]:
    """The released DICOM series folders of the unit that no converted image covers."""
    covered: set[Path] = set()
    folders: dict[Path, str] = {}
    for subj in (convert or {}).get("subjects", []):
        for entry in list(subj.get("images", [])) + list(subj.get("unsorted", [])):
            if entry.get("series"):
                covered.add((dicom_root / subj["subject"] / entry["series"]).resolve())
        for nc in subj.get("not_converted", []):
            if nc.get("release"):
                folders[(keeper.root / nc["release"]).resolve()] = subj["subject"]
    if dicom_in_release:
        for subj in manifest.get("subjects", []):
            for f in subj.get("files", []):
                parts = str(f.get("out_relpath") or "").split("/")
                if f.get("format", "dicom") == "dicom" and len(parts) >= 3 and not f.get("release_dir"):
                    folders[(dicom_root / subj["subject"] / parts[0] / parts[1]).resolve()] = subj["subject"]
    root = keeper.root.resolve()
    out = []
    for folder, subject in sorted(folders.items()):
        if folder in covered or not folder.is_relative_to(root):
            continue
        if not folder.is_dir() and not (keeper.orig / folder.relative_to(root)).is_dir():
            continue
        out.append(_describe_series(subject, keeper.root / folder.relative_to(root), keeper, face_cfg))
    return out


def _describe_series(subject: str, folder: Path, keeper: Keeper, face_cfg) -> _Series:
    """Facts and decision of one DICOM series from its own headers (and, when the labels do not
    say whether it is a head, from the shape of its volume)."""
    from dataclasses import replace

    from . import dicomvol
    rel = str(folder.relative_to(keeper.root)) + "/"
    rels = keeper.dicom_files(folder)
    files = {r: keeper.pristine(r) for r in rels}
    sc = dicomvol.scan(files)
    why = rendering(sc.attrs, face_cfg["select"]["body_parts"])
    if why:
        return _Series(subject, folder, rel, None, Decision("withhold", why), files, unreadable=sc.unreadable)
    stacks = sc.stacks()
    attrs = sc.attrs
    picture = head_picture(attrs, face_cfg["select"]["body_parts"], sc.matrix if any(sc.matrix) else None)
    if not stacks:
        body = str(attrs.get("BodyPartExamined") or "").strip()
        head = picture or (modality_of(attrs) in ("MR", "CT", "") and
                           (not body or names_head(body, face_cfg["select"]["body_parts"])))
        if sc.no_geometry and min(sc.matrix) >= MIN_PICTURE_PIXELS and head:
            # frames of a head without position or orientation (a CT exported as screen saves): a
            # stack anyone can view, with no geometry to find its face in (red-team 6)
            why = (f"{picture or 'image frames of a head'} without position or orientation "
                   f"({sc.no_geometry} frames) can show the face and cannot be defaced")
            return _Series(subject, folder, rel, None, Decision("withhold", why), files, unreadable=sc.unreadable)
        return _Series(subject, folder, rel, None, Decision("none", "no image frames with a position"), files,
                       unreadable=sc.unreadable)
    stack = stacks[0]
    _, at = dicomvol.positions(stack)
    volumes = min(len(a) for a in at)
    kind, evidence = kind_of("", rel, attrs, volumes)
    facts = ImageFacts(path=rel, suffix="", modality=modality_of(attrs),
                       body_part=str(attrs.get("BodyPartExamined") or ""),
                       description=" ".join(str(attrs.get(k) or "") for k in ("SeriesDescription", "ProtocolName")).strip(),
                       extent_mm=dicomvol.extent(stack), volumes=volumes, kind=kind,
                       in_plane_mm=float(max(stack[0].spacing)), picture=picture,
                       sagittal=any(sagittal(np.cross(st[0].iop[:3], st[0].iop[3:])) for st in stacks))
    ser = _Series(subject, folder, rel, facts, decide(facts, face_cfg), files, stack, sc.unreadable)
    found = ct_under_pet_label(facts, ser.decision, face_cfg, lambda: _series_volume(ser).data)
    if found:   # CT values under a PET label (red-team 7): the face outline of a CT, so defaced as one
        facts, decision = found
        ser = _Series(subject, folder, rel, facts, decision, files, stack, sc.unreadable, volume=ser.volume)
    if kind and ser.decision.method == "none" and "face.select.skip" in ser.decision.reason:
        ser.decision = Decision("none", f"{ser.decision.reason} ({evidence})", pending=ser.decision.pending)
    if ser.decision.pending:
        try:
            vol = _series_volume(ser)
            ok, why = head_shape(vol.data, vol.zooms, render.skin_threshold(vol.data))
            for k in range(1, ser.volume.volumes if ser.volume.volumes <= MAX_BARE_VOLUMES and not ok else 1):
                later = dicomvol.reconstruct(ser.files, ser.stack, volume=k)   # a decoy first volume (red-team 7)
                lv = for_backend(reference_volume(later.data, later.affine), facts.modality)
                ok, why = head_shape(lv.data, lv.zooms, render.skin_threshold(lv.data))
                if ok:
                    break
        except Exception as exc:  # noqa: BLE001 - cannot look at it: it might be a head
            ser.decision = Decision(face_cfg["method"], f"labels do not say whether this is a head and the volume "
                                                        f"cannot be read ({_why(exc)})")
            return ser
        d = decide(replace(facts, head_shape=ok), face_cfg)
        ser.decision = Decision(d.method, f"{d.reason} ({why})")
    return ser


def _split_heads(series: list[_Series], face_cfg) -> None:
    """One head split over thin series (a slice per series): each alone has no 3D coverage, together
    they are the head (red-team 6: 96 one-slice series of a head were released untouched). Thin MR,
    CT or unlabelled series of a subject with the same orientation, matrix and pixel spacing, body
    part a head or none, whose frames together cover a face (face.select.min_extent_mm on each
    axis) are withheld: a slice alone gives the face stage no head to register."""
    from . import dicomvol
    from .select import _mm
    sel = face_cfg["select"]
    groups: dict[tuple, list[_Series]] = {}
    for ser in series:
        if ser.facts is None or not (ser.decision.method == "none" and ser.decision.reason.startswith("no 3D coverage")
                                     or ser.decision.method == "withhold" and ser.decision.reason.startswith(PROFILE)):
            continue
        body = ser.facts.body_part.strip()
        if ser.facts.modality not in ("MR", "CT", "") or (body and not names_head(body, sel["body_parts"])):
            continue
        f = ser.stack[0]
        groups.setdefault((ser.subject, tuple(np.round(f.iop, 3)), f.rows, f.cols, tuple(np.round(f.spacing, 3))),
                          []).append(ser)
    for members in groups.values():
        if len(members) < 2:
            continue
        ext = dicomvol.extent([fr for ser in members for fr in ser.stack])
        if min(ext) < sel["min_extent_mm"]:
            continue
        why = (f"one of {len(members)} thin series of a head that together cover a face (extent {_mm(ext)} mm) and "
               "cannot be defaced one by one")
        for ser in members:
            ser.decision = Decision("withhold", why)


def _series_volume(ser: _Series):
    """The series' RAS reference volume as the backends see it (reconstructed once)."""
    from . import dicomvol
    if ser.volume is None:
        ser.volume = dicomvol.reconstruct(ser.files, ser.stack)
    vol = reference_volume(ser.volume.data, ser.volume.affine)
    return for_backend(vol, ser.facts.modality if ser.facts else "")


def _series_job(ser: _Series, method: str, keeper: Keeper, work: Path, release_root: Path, restricted: Path,
                face_cfg, qc: dict, bad: list, counts: dict, fatal: list, count: bool = True) -> _SeriesJob | None:
    """Compute the removal mask of a selected DICOM series from its own volume; on any failure
    every file of the series is withheld (None)."""
    backend_name = face_cfg["deface_backend"] if method == "deface" else face_cfg["skullstrip_backend"]
    try:
        if ser.facts is None or not ser.stack:
            raise GeometryMismatch("no frames with a position to reconstruct a volume from")
        t0 = time.perf_counter()
        bvol = _series_volume(ser)
        thr = render.skin_threshold(bvol.data)   # once per image: registration crop, plausibility, QC
        removed = _removal_mask(bvol, method, backend_name, face_cfg, threshold=thr)
        problem = implausible(bvol, removed, method, thr)
        if not problem and ser.volume.volumes > 1:   # frames at one position: later volumes get this mask
            from . import dicomvol
            later = (dicomvol.reconstruct(ser.files, ser.stack, volume=k).data for k in range(1, ser.volume.volumes))
            problem = moved_volume((ser.volume.data, later), ser.volume.affine)
        if problem:
            raise _Implausible(problem)
        native = bvol.to_native(removed)
        _save_mask(work / "masks" / ser.rel.rstrip("/"), native, ser.volume.affine)
        seconds = round(time.perf_counter() - t0, 2)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the face is not released
        problem = _why(exc)
        _withdraw_all(keeper.dicom_files(ser.folder), problem, keeper, bad)
        ser.result = {"backend": backend_name, "withheld": problem}
        counts["withheld"] += 1
        log.warning("%s: %s; withheld", ser.rel, problem)
        if isinstance(exc, OSError):
            fatal.append(exc)
        return None
    frac = float(removed.mean())
    ser.result = {"backend": backend_name, "removed_fraction": round(frac, 4), "seconds": seconds,
                  "resampled": bool(ser.volume.resampled)}
    if count:
        counts["treated"] += 1
    log.info("%s: %s by %s from the DICOM volume, %.1f%% of voxels removed, %.1f s", ser.rel, method,
             backend_name, 100 * frac, seconds)
    qc.setdefault(ser.subject, []).extend(
        _qc(ser.rel.rstrip("/"), ser.subject, bvol, removed, method, backend_name, release_root, restricted, face_cfg,
            thr))
    modality = ser.facts.modality
    ser.files = {}  # the write-back reads the files again, one at a time
    return _SeriesJob(ser.subject, ser.folder, ser.rel, method, backend_name, [(ser.volume.affine, native)], True,
                      removed_value(modality), modality, ser.result)


def _fail_series(job: _SeriesJob, exc: BaseException, keeper: Keeper, bad: list, fatal: list) -> None:
    problem = _why(exc)
    _withdraw_all(keeper.dicom_files(job.folder), problem, keeper, bad)
    job.result["withheld"] = problem
    log.warning("%s: DICOM write-back failed (%s); series withheld", job.label, problem)
    if isinstance(exc, OSError):
        fatal.append(exc)


def _planned_uids(jobs: list[_SeriesJob], keeper: Keeper, pseudo) -> dict[str, str]:
    """Old → new SOP Instance UID of every DICOM image the unit's write-back will rewrite (new UIDs
    are keyed on the old one and the method, so they are known before anything is written, and
    every file is written once). Files without pixel data are not rewritten and keep their UID."""
    import pydicom
    planned: dict[str, str] = {}
    for job in jobs:
        for rel in keeper.dicom_files(job.folder):
            try:
                ds = pydicom.dcmread(io.BytesIO(keeper.pristine(rel)), specific_tags=["SOPInstanceUID", "PixelData"])
            except Exception:  # noqa: BLE001 - the write-back withholds what it cannot read
                continue
            old = str(ds.get("SOPInstanceUID") or "")
            if old and "PixelData" in ds:
                planned[old] = new_uid(pseudo, job.method, old)
    return planned


def new_uid(pseudo, method: str, old: str) -> str:
    """The keyed SOP Instance UID of the defaced / skull-stripped image whose released UID is ``old``."""
    return pseudo.uid(f"{UID_DOMAIN}\x00{method}\x00{old}")


def _dicom_series(job: _SeriesJob, keeper: Keeper, pseudo, planned: dict[str, str], uid_map: dict,
                  bad: list) -> tuple[int, int]:
    """Write the mask into every file of the series; references to any rewritten image of the unit
    (``planned``) follow their new UIDs. Every file is computed before any is written; a file
    whose frames lie on no grid raises :class:`_GridMismatch` for a converted image's grid (the
    series is then reconstructed from its own frames) and is withheld otherwise."""
    rels = keeper.dicom_files(job.folder)
    derivation = (f"{'Defaced' if job.method == 'deface' else 'Skull-stripped'} by deidflow {__version__} "
                  f"(backend {job.backend}): voxels of the removed region set to "
                  f"{'air' if job.modality.upper() == 'CT' else '0'}")
    note = f"deidflow face: {job.method} ({job.backend})"
    out: list[tuple[str, Any]] = []
    failed: list[tuple[str, str]] = []
    for rel in rels:
        data = keeper.source(rel)
        try:
            res = mask_dicom(data, job.grids, lambda old: planned.get(old) or new_uid(pseudo, job.method, old),
                             derivation, note, refs=planned, snap=job.snap, fill=job.fill)
        except GeometryMismatch as exc:
            if not job.snap:
                raise _GridMismatch(str(exc)) from None
            failed.append((rel, str(exc)))
            continue
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - undecodable pixel data, …: this file is withheld
            failed.append((rel, _why(exc)))
            continue
        out.append((rel, res))
    for rel, why in failed:
        keeper.withdraw(rel)
        bad.append((rel, f"face: {why}; withheld from the release"))
    n = 0
    for rel, res in out:
        if res is None:
            continue
        keeper.publish(rel, res.data)
        uid_map[res.old_sop_instance_uid] = res.new_sop_instance_uid
        n += 1
    return n, len(failed)


def _follow_references(images: list[_Image], series: list[_Series], dicom_root: Path, keeper: Keeper,
                       rewritten: set[str], uid_map: Mapping[str, str]) -> int:
    """Every other released DICOM file of the unit's subjects that references a rewritten image
    (ReferencedSOPInstanceUID or any UI value at any depth) gets the new UID, through the same
    pristine-copy bookkeeping as the write-back (kill-safe, undone when no longer needed)."""
    if not uid_map:
        return 0
    changed = 0
    for subject in sorted({im.subject for im in images} | {s.subject for s in series}):
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


def _qc(rel: str, subject: str, vol, removed: np.ndarray, method: str, backend: str, release_root: Path,
        restricted: Path, face_cfg, thr: float) -> list[dict]:
    """Front views before/after and three-plane slices of one processed image (``thr``: the
    skin threshold of ``vol``)."""
    after = vol.data.copy()
    after[removed] = 0
    stem = _stem(rel)
    what = "defaced" if method == "deface" else "skull-stripped"
    center = None
    tissue = removed & (vol.data > thr)  # where the face was, not the air in front of it
    if tissue.any() and method == "deface":
        c = np.median(np.argwhere(tissue), axis=0).astype(int)
        center = (vol.data.shape[0] // 2, int(c[1]), int(c[2]))
    shots = [
        (f"{stem}_face-front-before.png", "face_front_before",
         captions.FACE_FRONT.format(image=rel, when="before", what=what, backend=backend),
         render.front_view(vol.data, vol.zooms, thr), bool(not face_cfg.get("qc_before_in_release"))),
        (f"{stem}_face-front-after.png", "face_front_after",
         captions.FACE_FRONT.format(image=rel, when="after", what=what, backend=backend),
         render.front_view(after, vol.zooms, thr), False),
        (f"{stem}_face-slices.png", "face_slices", captions.FACE_SLICES.format(image=rel, what=what, backend=backend),
         render.slices_view(after, removed, vol.zooms, center), False),
    ]
    entries = []
    for name, kind, caption, img, private in shots:
        folder = (restricted / "qc" if private else release_root / QC_SUBDIR) / subject / "face"
        if private:
            make_restricted_dir(folder)
        atomic_write_bytes(folder / name, render.png_bytes(img), RESTRICTED_FILE_MODE if private else STAGED_FILE_MODE)
        entries.append({"file": name, "caption": caption, "kind": kind, **({"restricted": True} if private else {})})
    return entries


def _write_qc_index(folder: Path, entries: list[dict], mode: int) -> None:
    if not entries:
        return
    if mode == RESTRICTED_FILE_MODE:
        make_restricted_dir(folder)
    text = json.dumps([{k: e[k] for k in ("file", "caption", "kind")} for e in entries], indent=1) + "\n"
    atomic_write_text(folder / "index.json", text, mode)
