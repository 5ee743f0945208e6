"""One subject's DICOM release: the body of the per-subject ``dicom`` job."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

from .dicom import Scrubber, SubjectContext
from .dicomio import DicomError, deidentify_path
from .fsutil import (RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir, publish_dir,
                     staging_dir_for)
from .profile import build_plan
from .pseudonym import Pseudonymizer, fingerprint, load_key, load_mapping


def pseudonymizer_from_settings(settings: Mapping[str, Any]) -> Pseudonymizer:
    key = load_key(settings.get("key_file") or None)
    expected = settings.get("key_fingerprint")
    if expected and fingerprint(key) != expected:
        raise RuntimeError("the key available to this job is not the key the workflow was started with")
    lo, hi = settings["date_offset_days"]
    mapping = load_mapping(settings["mapping_csv"]) if settings.get("mapping_csv") else {}
    return Pseudonymizer(key, length=settings["pseudonym_length"], offset_range=(lo, hi), mapping=mapping)


def deidentify_subject(manifest: Path, release_dir: Path, restricted: Path, audit: Path,
                       uids: Path, quarantine: Path, settings: Mapping[str, Any]) -> dict:
    """De-identify every DICOM file of one subject into ``release_dir`` (published in one rename).

    Writes the per-file audit (actions per attribute, never values), the subject's UID map and the
    files it had to quarantine.  Returns counts.
    """
    m = json.loads(Path(manifest).read_text())
    subject = m["subject"]
    plan = build_plan(settings["options"], settings["private"], settings["overrides"])
    pseudo = pseudonymizer_from_settings(settings)
    ctx = SubjectContext(pseudo, subject, m["date_offset"])
    scrubber = Scrubber(plan, ctx)
    input_dir = Path(m["input_dir"])
    stage = staging_dir_for(Path(release_dir), Path(restricted))
    audit_lines: list[str] = []
    bad: list[tuple[str, str]] = []
    for f in m["files"]:
        try:
            res = deidentify_path(input_dir / f["relpath"], stage / f["out_relpath"], scrubber)
        except DicomError as exc:
            bad.append((f["relpath"], str(exc)))
            continue
        except OSError as exc:
            bad.append((f["relpath"], f"file not readable: {exc.strerror}"))
            continue
        audit_lines.append(json.dumps({"file": f"{subject}/{f['out_relpath']}", "source": f["src_id"],
                                       "actions": res.actions}, sort_keys=True))
    publish_dir(stage, Path(release_dir))
    for p in (audit, uids, quarantine):
        make_restricted_dir(Path(p).parent)
    atomic_write_text(audit, "".join(line + "\n" for line in audit_lines), RESTRICTED_FILE_MODE)
    atomic_write_text(uids, _csv([("id_old", "id_new"), *sorted(ctx.uid_map.items())]), RESTRICTED_FILE_MODE)
    atomic_write_text(quarantine, "".join(f"{p}\t{r}\n" for p, r in bad), RESTRICTED_FILE_MODE)
    return {"subject": subject, "files": len(audit_lines), "quarantined": len(bad)}


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()
