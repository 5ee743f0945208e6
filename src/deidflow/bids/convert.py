"""The ``convert`` job: BIDS NIfTI of one job unit from its *de-identified* DICOM.

For every subject of the unit: each series folder of the conversion working copy the ``dicom``
stage wrote (``<work_root>/sub-X/ses-Y/<series>/NNNN.dcm``, restricted: the de-identified DICOM
with the vendor private elements dcm2niix needs, :mod:`.workcopy`; the released DICOM under
``<dicom_root>`` when there is none) is converted by dcm2niix into a temporary folder
inside the restricted folder, classified (:mod:`.heuristic`), named (:mod:`.naming`), its sidecar
scrubbed (:func:`deidflow.sidecar.scrub_sidecar`) and written to a staging folder; the subject's
BIDS folder ``OUT/sub-X`` and its ``OUT/sourcedata/unsorted/sub-X`` then appear in one rename each.
The done marker ``restricted/done/convert/<unit>.json`` lists every image (release path, series it
came from, datatype, suffix, rule), the unsorted images and the series dcm2niix could not convert —
the input of the face stage and of the QC report.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..errors import PublicError, output_error_of
from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir, publish_dir, staging_dir_for
from ..sidecar import capped_age, scrub_sidecar, sidecar_text
from . import dcm2niix
from .heuristic import classify, image_attributes, rules_for
from .naming import Image, assign_names
from .series import SeriesInfo, read_series
from .sessions import acquisition_datetime, subject_tables

log = logging.getLogger("deidflow")


class ConvertOutputError(PublicError):
    """The release cannot be written (the job fails; nothing is quarantined)."""


def convert_unit(manifest: Path, dicom_root: Path, release_root: Path, restricted: Path, done: Path,
                 settings: Mapping[str, Any], bids: Mapping[str, Any], work_root: Path | str | None = None) -> dict:
    """Convert every subject of one job unit; write the done marker; return counts.

    ``settings`` are the profile settings (options…); ``bids`` holds ``mapping`` (user rules) and
    ``dicom_released`` (whether the de-identified DICOM is part of the release; when not, series
    dcm2niix cannot convert are copied to sourcedata/unsorted so nothing is dropped)."""
    m = json.loads(Path(manifest).read_text())
    rules = rules_for(bids.get("mapping"))
    options = list(settings.get("options", []))
    restricted = Path(restricted)
    work = make_restricted_dir(restricted / "tmp" / f"convert-{m['unit']}")
    summary = []
    try:
        for subj in m["subjects"]:
            summary.append(_subject(subj, Path(dicom_root), Path(work_root) if work_root else None,
                                    Path(release_root), restricted, work, rules, options,
                                    bool(bids.get("dicom_released", True))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    make_restricted_dir(Path(done).parent)
    marker = {"unit": m["unit"], "dcm2niix": dcm2niix.version(), "subjects": summary}
    atomic_write_text(done, json.dumps(marker, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    return {"subjects": len(summary), "images": sum(len(s["images"]) for s in summary),
            "unsorted": sum(len(s["unsorted"]) for s in summary),
            "not_converted": sum(len(s["not_converted"]) for s in summary)}


def _series_of(subj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(session, series folder) pairs of the DICOM files of a subject's manifest, in order."""
    seen = []
    for f in subj["files"]:
        if f.get("format", "dicom") != "dicom" or not f.get("out_relpath"):
            continue  # other formats are released by their own stage
        parts = f["out_relpath"].split("/")
        if len(parts) >= 3 and (parts[0], parts[1]) not in seen:
            seen.append((parts[0], parts[1]))
    return sorted(seen)


def _subject(subj: Mapping[str, Any], dicom_root: Path, work_root: Path | None, release_root: Path,
             restricted: Path, work: Path, rules, options: list[str], dicom_released: bool) -> dict:
    subject = subj["subject"]
    images: list[Image] = []
    not_converted: list[dict] = []
    series_infos: list[SeriesInfo] = []
    for ses, label in _series_of(subj):
        folder = dicom_root / subject / ses / label
        if not folder.is_dir():
            continue  # every file of the series was quarantined by the dicom stage
        if work_root is not None and (work_root / subject / ses / label).is_dir():
            folder = work_root / subject / ses / label
        try:
            info = read_series(folder.parent, label)
        except ValueError as exc:
            not_converted.append({"series": f"{ses}/{label}", "reason": str(exc)})
            continue
        series_infos.append(info)
        try:
            outputs = dcm2niix.convert_series(folder, work / f"{ses}_{label}", log=log)
        except dcm2niix.ConversionError as exc:
            # dcm2niix itself failed (a full disk, a crash): the job fails, so the unit is not
            # published and a rerun converts it; "nothing to convert" (SR, documents) is not a failure
            raise ConvertOutputError(f"BIDS conversion of {subject}/{info.relpath} failed: {exc}") from None
        if not outputs:
            not_converted.append({"series": info.relpath, "reason": "dcm2niix found no image to convert (e.g. SR, document)"})
            continue
        for out in outputs:
            attrs = image_attributes(info, out)
            images.append(Image(info, out, attrs, classify(attrs, rules)))
    assign_names(subject, images)
    audit: list[str] = []
    bids_final = release_root / subject
    unsorted_final = release_root / "sourcedata" / "unsorted" / subject
    bids_stage = staging_dir_for(bids_final, restricted / "tmp" / "stage-bids")
    unsorted_stage = staging_dir_for(unsorted_final, restricted / "tmp" / "stage-unsorted")
    try:
        for im in images:
            root, rel = (unsorted_stage, im.stem[len(f"sourcedata/unsorted/{subject}/"):]) \
                if im.target.datatype == "unsorted" else (bids_stage, im.stem[len(subject) + 1:])
            actions = _write_image(im, root / rel, options)
            audit.append(json.dumps({"file": im.stem + ".json", "series": im.series.relpath, "rule": im.target.rule,
                                     "actions": actions}, sort_keys=True))
        when = {id(im): acquisition_datetime(im.series.attrs, im.output.sidecar) for im in images}
        for rel, text in subject_tables(subject, images, when, options).items():
            (bids_stage / rel[len(subject) + 1:]).parent.mkdir(parents=True, exist_ok=True)
            (bids_stage / rel[len(subject) + 1:]).write_text(text, encoding="utf-8")
        if not dicom_released:
            for nc in not_converted:  # nothing is dropped: the de-identified DICOM goes to unsorted
                src = dicom_root / subject / nc["series"]
                if src.is_dir():
                    shutil.copytree(src, unsorted_stage / nc["series"])
                    nc["release"] = f"sourcedata/unsorted/{subject}/{nc['series']}"
        _publish_or_remove(bids_stage, bids_final, restricted)
        _publish_or_remove(unsorted_stage, unsorted_final, restricted)
    except OSError as exc:
        shutil.rmtree(bids_stage, ignore_errors=True)
        shutil.rmtree(unsorted_stage, ignore_errors=True)
        if (full := output_error_of(exc)) is not None:
            raise ConvertOutputError(f"cannot write the BIDS release of {subject}: {full.strerror}") from None
        raise
    except BaseException:
        shutil.rmtree(bids_stage, ignore_errors=True)
        shutil.rmtree(unsorted_stage, ignore_errors=True)
        raise
    adir = make_restricted_dir(restricted / "audit" / "bids")
    atomic_write_text(adir / f"{subject}.jsonl", "".join(a + "\n" for a in audit), RESTRICTED_FILE_MODE)
    if dicom_released:
        for nc in not_converted:
            nc["release"] = f"sourcedata/dicom/{subject}/{nc['series']}"
    return {
        "subject": subject,
        "images": [_entry(im) for im in images if im.target.datatype != "unsorted"],
        "unsorted": [{**_entry(im), "reason": im.target.reason or f"rule {im.target.rule}"}
                     for im in images if im.target.datatype == "unsorted"],
        "not_converted": not_converted,
        "participant": _participant(series_infos, options),
    }


def _entry(im: Image) -> dict:
    files = [im.stem + ".nii.gz", im.stem + ".json"]
    if im.target.datatype != "unsorted" and im.output.bval is not None and im.output.bvec is not None:
        files += [im.stem + ".bval", im.stem + ".bvec"]
    return {"nifti": im.stem + ".nii.gz", "files": files, "series": im.series.relpath,
            "datatype": im.target.datatype, "suffix": im.target.suffix, "entities": dict(im.entities),
            "rule": im.target.rule, "modality": im.series.get("Modality", "")}


def _write_image(im: Image, dest_stem: Path, options: list[str]) -> dict[str, str]:
    """NIfTI (gzipped, fixed header), scrubbed sidecar and, for BIDS images, bval/bvec."""
    dest_stem.parent.mkdir(parents=True, exist_ok=True)
    dcm2niix.gzip_file(im.output.nifti, dest_stem.with_name(dest_stem.name + ".nii.gz"))
    # The DICOM is already de-identified (dates shifted when asked): no second shift here.
    sidecar, actions = scrub_sidecar(im.output.sidecar, options=options, date_offset_days=0)
    if "SliceTiming" not in im.output.sidecar and "MultibandAccelerationFactor" in sidecar:
        # Without slice times (Siemens CSA removed, per-slice AcquisitionTime replaced by the profile)
        # dcm2niix takes slices with equal times for one multiband group: the factor is then wrong.
        del sidecar["MultibandAccelerationFactor"]
        actions["MultibandAccelerationFactor"] = "X"
    if im.target.datatype == "func":
        sidecar["TaskName"] = im.entities.get("task", "unknown")
    (dest_stem.with_name(dest_stem.name + ".json")).write_text(sidecar_text(sidecar), encoding="utf-8")
    if im.target.datatype != "unsorted":
        for src, ext in ((im.output.bval, ".bval"), (im.output.bvec, ".bvec")):
            if src is not None:
                shutil.copyfile(src, dest_stem.with_name(dest_stem.name + ext))
    return actions


def _publish_or_remove(stage: Path, final: Path, restricted: Path) -> None:
    """Publish a non-empty staging folder; an empty one means the subject has nothing there now,
    so an earlier version is taken out of the release (renamed away first, then deleted)."""
    if any(stage.iterdir()):
        publish_dir(stage, final)
        return
    stage.rmdir()
    if final.exists():
        trash = make_restricted_dir(restricted / "tmp") / f".trash-bids-{final.name}"
        if os.stat(trash.parent).st_dev != os.stat(final.parent).st_dev:
            trash = final.with_name(f".trash-{final.name}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _participant(series: list[SeriesInfo], options: list[str]) -> dict:
    """Sex and age (youngest session, capped at 90) when retain_patient_characteristics is on."""
    if "retain_patient_characteristics" not in options:
        return {}
    sexes = sorted({str(s.get("PatientSex")).upper() for s in series if s.get("PatientSex") in ("M", "F", "O")})
    ages = [a for a in (capped_age(s.get("PatientAge")) for s in series if s.get("PatientAge")) if a is not None]
    out: dict = {}
    if len(sexes) == 1:
        out["sex"] = sexes[0]
    if ages:
        out["age"] = min(ages)
    return out
