"""The DICOM release of one job unit (a subject or a batch of small subjects): the ``dicom`` job."""
from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .dicom import Scrubber, SubjectContext
from .dicomio import DicomError, deidentify_path
from .errors import PublicError, output_error_of
from .fsutil import (QC_SUBDIR, RESTRICTED_FILE_MODE, atomic_write_text, changed_input, csv_text, job_tmp,
                     make_restricted_dir, publish_dir, staging_dir_for)
from .profile import build_plan
from .pseudonym import Pseudonymizer, fingerprint, load_key, load_mapping
from .qc import identifiers
from .sniff import decompressed

if TYPE_CHECKING:
    from .bids.workcopy import WorkingCopy
    from .pixels import PixelCleaner


class OutputError(PublicError):
    """The release (not an input file) cannot be written: the job fails, nothing is quarantined."""


def pseudonymizer_from_settings(settings: Mapping[str, Any]) -> Pseudonymizer:
    key = load_key(settings.get("key_file") or None)
    expected = settings.get("key_fingerprint")
    if expected and fingerprint(key) != expected:
        raise RuntimeError("the key available to this job is not the key the workflow was started with")
    lo, hi = settings["date_offset_days"]
    mapping = load_mapping(settings["mapping_csv"]) if settings.get("mapping_csv") else {}
    return Pseudonymizer(key, length=settings["pseudonym_length"], offset_range=(lo, hi), mapping=mapping)


def deidentify_unit(manifest: Path, release_root: Path, restricted: Path, done: Path, uids: Path,
                    quarantine: Path, settings: Mapping[str, Any], work_root: Path | None = None) -> dict:
    """De-identify every subject of one job unit (see :mod:`deidflow.batching`).

    Each subject is written to a staging folder and published as ``release_root/<subject>`` in one
    rename; its audit goes to ``restricted/audit/<subject>.jsonl``.  The unit's UID map and
    quarantined files go to ``uids`` and ``quarantine``; ``done`` lists what was released.
    With ``work_root`` (BIDS on) each released file also gets its conversion working copy
    (:mod:`deidflow.bids.workcopy`, restricted) under ``work_root/<subject>``.
    """
    m = json.loads(Path(manifest).read_text())
    plan = build_plan(settings["options"], settings["private"], settings["overrides"])
    pseudo = pseudonymizer_from_settings(settings)
    input_dir = Path(m["input_dir"])
    uid_map: dict[str, str] = {}
    bad: list[tuple[str, str]] = []
    summary = []
    cleaner = pixel_cleaner(settings, pseudo)
    work_plan = None
    if work_root:
        from .bids.workcopy import WorkingCopy, conversion_plan
        work_plan = conversion_plan(settings["options"], settings["overrides"])
    for subj in m["subjects"]:
        ctx = SubjectContext(pseudo, subj["subject"], subj["date_offset"], uid_map,
                             identifiers=identifiers.IdentifierCollector())
        work = None if work_plan is None else WorkingCopy(work_plan, ctx, Path(work_root), Path(restricted))
        n, subject_bad = _subject(subj, input_dir, Path(release_root), Path(restricted), Scrubber(plan, ctx),
                                  cleaner, work)
        # the values the profile removed or replaced, for the leak scan (restricted)
        entries = ctx.identifiers.entries()
        if work is not None:  # private acquisition values the conversion keeps on purpose
            entries = work.scan_entries(entries)
        identifiers.write(restricted, m["unit"], "dicom", subj["subject"], entries)
        bad += subject_bad
        summary.append({"subject": subj["subject"], "files": n, "quarantined": len(subject_bad)})
    for p in (done, uids, quarantine):
        make_restricted_dir(Path(p).parent)
    atomic_write_text(uids, csv_text([("id_old", "id_new"), *sorted(uid_map.items())]), RESTRICTED_FILE_MODE)
    atomic_write_text(quarantine, "".join(json.dumps({"file": p, "reason": r}) + "\n" for p, r in sorted(bad)),
                      RESTRICTED_FILE_MODE)
    atomic_write_text(done, json.dumps({"unit": m["unit"], "subjects": summary}, indent=1) + "\n",
                      RESTRICTED_FILE_MODE)
    return {"subjects": len(summary), "files": sum(s["files"] for s in summary), "quarantined": len(bad)}


def pixel_cleaner(settings: Mapping[str, Any], pseudo: Pseudonymizer) -> "PixelCleaner | None":
    """The Clean Pixel Data step of the job (None with ``pixels.clean: off``); OCR text is
    recorded in the audit only as a keyed hash."""
    pix = settings.get("pixels") or {}
    if pix.get("clean", "off") in ("off", False):
        return None
    from .pixels import PixelCleaner
    return PixelCleaner(pix, text_hash=lambda t: pseudo._digest("pixel-text", t).hex()[:16])


def _subject(subj: Mapping[str, Any], input_dir: Path, release_root: Path, restricted: Path,
             scrubber: Scrubber, cleaner: "PixelCleaner | None" = None,
             work: "WorkingCopy | None" = None) -> tuple[int, list[tuple[str, str]]]:
    """One subject: files into a staging folder, published in one rename; audit written.

    With a pixel ``cleaner``, each series is screened and cleaned of burned-in text once its
    files are staged (see :mod:`deidflow.pixels.subject`), before the subject is published;
    files not cleaned stay as the fast path wrote them."""
    subject = subj["subject"]
    files = [f for f in subj["files"] if f.get("format", "dicom") == "dicom"]  # the rest: other stages
    if not files:
        if work is not None:
            work.publish()  # no working copy either
        return 0, []
    final = release_root / subject
    stage = staging_dir_for(final, restricted)
    entries: list[dict] = []
    bad: list[tuple[str, str]] = []
    capture = cleaner.capture if cleaner is not None else frozenset()
    pixels = None
    if cleaner is not None:
        from .pixels.qc import SubjectPixelsQC
        from .pixels.subject import SubjectPixels
        pixels = SubjectPixels(cleaner, subject, SubjectPixelsQC(subject),
                               prefix=release_root.relative_to(release_root.parents[1]).as_posix(),
                               output_error=lambda e: OutputError(f"cannot write the release: {e.strerror}"))
    sources: list[tuple[Path, Mapping[str, Any], dict]] = []  # (what was read, manifest entry, audit entry)
    try:
        # decompressed .dcm.gz inputs stay until the working copy is written
        with ExitStack() as opened:
            for f in files:
                if why := changed_input(input_dir, f):
                    bad.append((f["relpath"], why))
                    continue
                try:
                    src = input_dir / f["relpath"]
                    if f.get("compression"):  # .dcm.gz: read from a decompressed restricted copy
                        src = opened.enter_context(decompressed(src, job_tmp(restricted)))  # emptied by the next run
                    res = deidentify_path(src, stage / f["out_relpath"], scrubber, capture)
                    if why := changed_input(input_dir, f):  # rewritten while it was read
                        (stage / f["out_relpath"]).unlink(missing_ok=True)
                        bad.append((f["relpath"], why))
                        continue
                except DicomError as exc:
                    bad.append((f["relpath"], str(exc)))
                    continue
                except OSError as exc:
                    if (full := output_error_of(exc)) is not None:  # the release cannot be written: fail the job
                        raise OutputError(f"cannot write the release of {subject}: {full.strerror}") from None
                    bad.append((f["relpath"], f"file not readable: {exc.strerror or exc}"))
                    continue
                except Exception as exc:  # noqa: BLE001 - a defect on one hostile file: withhold it, not its batch
                    (stage / f["out_relpath"]).unlink(missing_ok=True)
                    bad.append((f["relpath"], f"dicom: could not be de-identified ({type(exc).__name__}; "
                                              "an internal error on this file: please report it)"))
                    continue
                entry = {"file": f"{subject}/{f['out_relpath']}", "source": f["src_id"], "actions": res.actions}
                entries.append(entry)
                sources.append((src, f, entry))
                if pixels is not None:
                    pixels.add(f["relpath"], entry["file"], stage / f["out_relpath"], res.captured, entry)
            if pixels is not None:
                bad += pixels.finish(restricted)
            if work is not None:  # the converter's working copy, after the pixel step decided each file
                for src, f, entry in sources:
                    staged = stage / f["out_relpath"]
                    if entry.get("withheld") or not staged.is_file():
                        continue
                    if why := changed_input(input_dir, f):  # read once more, for the converter
                        staged.unlink()
                        entry["withheld"] = True
                        bad.append((f["relpath"], why))
                        continue
                    work.add(src, f["out_relpath"], staged, _pixels_changed(entry))
                work.publish()
        publish_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # nothing partial stays behind
        if work is not None:
            work.discard()
        raise
    if pixels is not None:
        pixels.qc.publish(release_root.parents[1] / QC_SUBDIR, restricted)
    audit_lines = [json.dumps(e, sort_keys=True) for e in entries if not e.get("withheld")]
    audit = make_restricted_dir(restricted / "audit") / f"{subject}.jsonl"
    atomic_write_text(audit, "".join(line + "\n" for line in audit_lines), RESTRICTED_FILE_MODE)
    return len(audit_lines), bad


def _pixels_changed(entry: Mapping[str, Any]) -> bool:
    """Whether the pixel step changed (or dropped) the released file of an audit ``entry``."""
    return entry.get("pixels", {}).get("action", "skipped") not in ("skipped", "screened", "kept", "no_text")
