"""The ``other`` job: every non-DICOM file of one job unit (a subject or a batch of small subjects).

For each subject and each release folder (``sourcedata/nifti``, ``sourcedata/minc``, …) the files
are scrubbed into a staging folder inside the restricted folder and published as
``<release>/<release_dir>/<subject>`` in one rename.  A file its format module refuses
(:class:`~deidflow.formats.base.FormatError`) is quarantined together with its companions and
sidecar; nothing of it is released.  Outputs (restricted): ``audit/other-<subject>.jsonl``
(actions per field, never values), the original identifying values for the leak scan
(``work/<unit>/identifiers/other/<subject>.json``), the unit's quarantine list (JSON lines) and
the done marker.  A unit without non-DICOM files writes its (empty) outputs and returns at once.
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import PublicError, output_error_of
from ..fsutil import (RESTRICTED_FILE_MODE, atomic_write_text, changed_input, make_restricted_dir, publish_dir,
                      staging_dir_for)
from . import COMPANION_FORMATS, VOLUME_FORMATS, FormatError, ScrubContext, get

STAGE = "other"


class OutputError(PublicError):
    """The release cannot be written: the job fails (nothing is quarantined)."""


def release_unit(manifest: Path, release: Path, restricted: Path, done: Path, quarantine: Path,
                 settings: Mapping[str, Any], formats_config: Mapping[str, Any] | None = None) -> dict:
    """Scrub and publish the non-DICOM files of the unit described by ``manifest``."""
    m = json.loads(Path(manifest).read_text())
    input_dir = Path(m["input_dir"])
    release, restricted = Path(release), Path(restricted)
    todo = [s for s in m["subjects"] if any(_is_other(f) for f in s["files"])]
    pseudo = None
    if todo:
        from ..release import pseudonymizer_from_settings
        pseudo = pseudonymizer_from_settings(settings)
    bad: list[tuple[str, str]] = []
    summary = []
    for subj in todo:
        n, subject_bad = _subject(subj, input_dir, release, restricted, m["unit"], pseudo, settings,
                                  formats_config or {})
        bad += subject_bad
        summary.append({"subject": subj["subject"], "files": n, "quarantined": len(subject_bad)})
    for p in (done, quarantine):
        make_restricted_dir(Path(p).parent)
    atomic_write_text(quarantine, "".join(json.dumps({"file": p, "reason": r}) + "\n" for p, r in sorted(bad)),
                      RESTRICTED_FILE_MODE)
    atomic_write_text(done, json.dumps({"unit": m["unit"], "subjects": summary}, indent=1) + "\n",
                      RESTRICTED_FILE_MODE)
    return {"subjects": len(summary), "files": sum(s["files"] for s in summary), "quarantined": len(bad)}


def _is_other(f: Mapping[str, Any]) -> bool:
    return f.get("format") not in (None, "dicom")


def _subject(subj, input_dir: Path, release: Path, restricted: Path, unit: str, pseudo, settings,
             formats_config) -> tuple[int, list[tuple[str, str]]]:
    subject = subj["subject"]
    files = [f for f in subj["files"] if _is_other(f)]
    known = sorted({v for f in files for v in (f.get("known") or []) if v})
    ctx = ScrubContext(subject=subject, pseudo=pseudo, date_offset=subj.get("date_offset"), settings=settings,
                       formats=formats_config, known=known)
    followers: dict[str, list[dict]] = defaultdict(list)  # primary relpath -> companions and sidecars
    for f in files:
        if f.get("primary"):
            followers[f["primary"]].append(f)
    by_dir: dict[str, list[dict]] = defaultdict(list)
    for f in files:
        if not f.get("primary"):
            by_dir[f["release_dir"]].append(f)
    bad: list[tuple[str, str]] = []
    audit: list[str] = []
    found: dict[str, str] = {}
    released = 0
    for rdir in sorted(by_dir):
        final = release / rdir / subject
        # a staging folder of its own (the dicom job stages the same subject at the same time)
        stage = staging_dir_for(final, restricted / "tmp" / f"{STAGE}-{rdir.replace('/', '-')}")
        try:
            for f in by_dir[rdir]:
                companions = [g for g in followers.get(f["relpath"], []) if g["format"] in COMPANION_FORMATS]
                why = next(filter(None, (changed_input(input_dir, g) for g in companions)), "")
                if why:  # (the image itself is checked by _one)
                    bad.append((f["relpath"], why))
                ok = not why and _one(f, input_dir, stage, ctx, bad, audit, found, rdir, subject)
                for g in followers.get(f["relpath"], []):
                    if g["format"] in COMPANION_FORMATS:
                        if ok:
                            released += 1
                        else:
                            bad.append((g["relpath"], "companion of a quarantined file"))
                    elif not ok:
                        bad.append((g["relpath"], "sidecar of a quarantined image"))
                    else:
                        released += _one(g, input_dir, stage, ctx, bad, audit, found, rdir, subject)
                released += ok
            if any(stage.iterdir()):
                publish_dir(stage, final)
            else:
                shutil.rmtree(stage)
                if final.exists():  # nothing of this subject is released here any more
                    shutil.rmtree(final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    audit_file = make_restricted_dir(restricted / "audit") / f"{STAGE}-{subject}.jsonl"
    atomic_write_text(audit_file, "".join(line + "\n" for line in audit), RESTRICTED_FILE_MODE)
    _write_identifiers(restricted, unit, subject, found, known)
    return released, bad


def _one(f, input_dir: Path, stage: Path, ctx: ScrubContext, bad, audit, found, rdir: str, subject: str) -> bool:
    """Scrub one file (and its companions) into ``stage``; False when it was quarantined."""
    fmt = f["format"]
    if why := changed_input(input_dir, f):
        bad.append((f["relpath"], why))
        return False
    try:
        res = get(fmt).scrub(input_dir / f["relpath"], stage / f["out_relpath"], ctx)
    except FormatError as exc:
        bad.append((f["relpath"], f"{fmt}: {exc}"))
        return False
    except KeyError:
        bad.append((f["relpath"], f"{fmt}: no de-identification module for this format"))
        return False
    except OSError as exc:
        if (full := output_error_of(exc)) is not None:
            raise OutputError(f"cannot write the release of {subject}: {full.strerror}") from None
        bad.append((f["relpath"], f"file not readable: {exc.strerror}"))
        return False
    except Exception as exc:  # a reader's unexpected error on hostile input: quarantine, never release
        bad.append((f["relpath"], f"{fmt}: unreadable ({type(exc).__name__})"))
        return False
    for k, v in res.identifiers.items():  # (searched in the subject's other files even if this one is withheld)
        found[k if found.get(k, v) == v else f"{k} ({f['src_id']})"] = v
    why = changed_input(input_dir, f)  # rewritten while it was read (as the dicom job checks)
    if not why and fmt in VOLUME_FORMATS and (text := _pixel_text(stage / f["out_relpath"])):
        why = f"{fmt}: {text}"
    if why:
        for p in res.outputs:
            Path(p).unlink(missing_ok=True)
        bad.append((f["relpath"], why))
        return False
    audit.append(json.dumps({"file": f"{rdir}/{subject}/{f['out_relpath']}", "source": f["src_id"],
                             "format": fmt, "outputs": [p.name for p in res.outputs],
                             "actions": res.actions}, sort_keys=True))
    return True


def _pixel_text(staged: Path) -> str | None:
    """Why a staged volume cannot be released as it is: burned-in text in its voxels, or voxels
    that cannot be read to look (:mod:`deidflow.pixels.volumes`); None when it is clean."""
    from ..pixels.screen import ScreenError
    from ..pixels.volumes import VolumeUnreadable, text_in_volume
    try:
        where = text_in_volume(staged)
    except (VolumeUnreadable, ScreenError) as exc:
        return f"{exc}: cannot be screened for burned-in text"
    except MemoryError:
        return "too large to screen for burned-in text (out of memory)"
    except Exception as exc:  # noqa: BLE001 - hostile input: withhold the file, never fail the unit
        return f"cannot be screened for burned-in text ({type(exc).__name__})"
    return f"burned-in text in the image ({where}); text in these formats' voxels is not removed" if where else None


def _write_identifiers(restricted: Path, unit: str, subject: str, found: Mapping[str, str],
                       known: Iterable[str] = ()) -> None:
    """The original values found, and the subject's identity from the inventory (a header's, or
    its folder's name), for the leak scan (restricted; see deidflow.qc.identifiers)."""
    from ..qc import identifiers
    entries = identifiers.from_fields(found) + [[kind, "subject identity", v] for k in known
                                                for kind, v in identifiers.guess(k)]
    identifiers.write(restricted, unit, STAGE, subject, entries)
