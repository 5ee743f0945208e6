"""The release gate: what reaches the release, when, and what the release's state is.

Every per-unit stage writes into the unit's staging tree ``<restricted>/staging/<unit>/`` (the
release layout: ``sourcedata/dicom/sub-X/``, ``sub-X/``, ``sourcedata/<fmt>/sub-X/``,
``derivatives/deidflow/qc/sub-X/``); the leak scan reads it there.  :func:`publish_unit` then moves
each subject's folders into the release, one rename per folder, only for subjects the leak scan
passed (``verify.on_leak``); dataset-level files follow in :func:`publish_dataset`, which also takes
withdrawn subjects out.  A marker file ``RELEASE_INCOMPLETE`` lies at the release root while a run
is under way or after one stopped early; :func:`release_status` says whether the release is
complete and what was withheld.  :func:`check_folders` refuses folders a run must not use before
anything is written.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import EXIT_INCOMPLETE, EXIT_OK, PublicError, UsageError
from .fsutil import (QC_SUBDIR, RESTRICTED_FILE_MODE, append_line, atomic_write_bytes, atomic_write_text, layout_parents,
                     make_release_dir, make_restricted_dir, publish_dir, release_modes, remove_tree, restricted_modes)

MARKER = "RELEASE_INCOMPLETE"
MARKER_TEXT = ("This release is incomplete (a deidflow run is under way, or stopped before it finished): "
               "do not share it; run the same deidflow command again until it ends without this file.\n")
STATUS = "release-status.json"      # restricted: the last finished run's outcome
WITHHELD = "withheld.json"          # restricted: subjects withheld by the leak scan, with hit paths
WITHDRAWN = "withdrawn.tsv"         # restricted audit: subjects taken out of the release (date, keyed ID)
SUBJECTS = "work/subjects.txt"      # restricted: the subjects of the current input, one a line
REPORT_STAGING = "staging/qc"       # restricted: the QC report's public files, checked (verify_dataset)
REPORT_FILES = ("report.html", "files_per_modality.svg", "actions_per_attribute.svg", "subjects.tsv")
STAGING = "staging"
DATASET_STAGING = "staging/dataset"
ON_LEAK = ("withhold", "fail", "publish")
# Test hook (tests/test_release_gate.py): DEIDFLOW_TEST_PAUSE_AT="<point>:<folder>" makes the jobs
# that reach <point> (a stage's name, or "publish-mid" after a unit's first folder moved) create
# <folder>/<point> and wait until a test deletes it (at most 10 minutes), so a test can kill the run
# at a known place, or change something and let it go on. Unset in real runs.
PAUSE_ENV = "DEIDFLOW_TEST_PAUSE_AT"


def test_pause(point: str) -> None:
    """Announce ``point`` and wait when the test hook names it (see PAUSE_ENV)."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, folder = spec.partition(":")
    if name == point and folder:
        flag = Path(folder, point)
        flag.touch()
        deadline = time.monotonic() + 600
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def staging_root(restricted: Path, unit: str) -> Path:
    """The staging tree of a job unit (the release layout, inside the restricted folder)."""
    return Path(restricted) / STAGING / unit


def subject_folders(root: Path, subject: str) -> list[str]:
    """The folders of ``subject`` under ``root`` in the release layout, relative to ``root``:
    ``sub-X``, ``sourcedata/<fmt>/sub-X``, ``derivatives/<name>/sub-X``, ``derivatives/<name>/<sub>/sub-X``."""
    root = Path(root)
    return sorted((p / subject).relative_to(root).as_posix() for p in layout_parents(root) if (p / subject).is_dir())


def release_subjects(release: Path) -> set[str]:
    """Every subject that has a folder in the release."""
    return {c.name for p in layout_parents(release) for c in os.scandir(p)
            if c.name.startswith("sub-") and c.is_dir(follow_symlinks=False)}


def mark_incomplete(release: Path, restricted: Path) -> None:
    """Put the RELEASE_INCOMPLETE marker at the release root (the start of a run)."""
    release, restricted = Path(release), Path(restricted)
    make_release_dir(release)
    if not (release / MARKER).exists():
        make_restricted_dir(restricted)
        atomic_write_text(release / MARKER, MARKER_TEXT, 0o644, scratch_dir(release, restricted))


# ------------------------------------------------------------------------------------------------
# One job unit
# ------------------------------------------------------------------------------------------------
def _area(rel: str) -> str:
    """The release area of a staged file (``sourcedata/dicom``, ``bids``, ``derivatives``): a file's
    own name can hold the leaked value (a BIDS entity made from it), so it is never shown."""
    parts = rel.split("/")
    if parts[0] == "sourcedata" and len(parts) > 1:
        return f"sourcedata/{parts[1]}"
    return "derivatives" if parts[0] == "derivatives" else "bids"


def _hit_paths(hits: Iterable[Mapping]) -> list[dict]:
    """Where each hit is (release area, attribute/field path, kind of value, source field): never
    the value, nor the file name."""
    seen = {(_area(h["file"]), h["location"], h["kind"], h["field"]) for h in hits}
    return [{"area": a, "location": loc, "kind": k, "field": fld} for a, loc, k, fld in sorted(seen)]


def publish_unit(manifest: Path, verify_done: Path, staging: Path, release: Path, restricted: Path,
                 done: Path, quarantine: Path, on_leak: str = "withhold") -> dict:
    """Publish the subjects of one job unit whose staged files passed the leak scan.

    A plan (``work/publish/<unit>.json``: the folders to move and the inode of each) is written
    first, so a killed job resumes where it stopped: a folder whose planned inode is already in
    the release is done, one still staged is moved, a previous version that an atomic exchange
    left in the staging tree is deleted.  Withheld subjects (``on_leak: withhold``) are taken out
    of the release and listed in ``quarantine`` (JSON lines, hit paths, never values)."""
    if on_leak not in ON_LEAK:
        raise PublicError(f"verify.on_leak must be one of {', '.join(ON_LEAK)}, not {on_leak!r}")
    started = time.perf_counter()
    m = json.loads(Path(manifest).read_text())
    unit = m["unit"]
    staging, release, restricted = Path(staging), Path(release), Path(restricted)
    st = os.stat(verify_done)
    token = f"{st.st_ino}:{st.st_mtime_ns}"
    plan_file = restricted / "work" / "publish" / f"{unit}.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    if not plan or plan.get("token") != token:
        plan = _plan(m, json.loads(Path(verify_done).read_text()), staging, token, on_leak)
        make_restricted_dir(plan_file.parent)
        atomic_write_text(plan_file, json.dumps(plan, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
        plan_file.with_suffix(".progress").unlink(missing_ok=True)
    make_release_dir(release)
    trash = scratch_dir(release, restricted)
    copying = trash.parent != restricted / "tmp"
    progress = plan_file.with_suffix(".progress")  # folders published by copy (other file system)
    copied = set(progress.read_text().split("\n")) if progress.exists() else set()
    for subject, folders in sorted(plan["publish"].items()):
        for rel, ino in sorted(folders.items()):
            src, dst = staging / rel, release / rel
            if rel in copied or (dst.is_dir() and dst.stat().st_ino == ino):
                if src.exists():
                    shutil.rmtree(src)          # the previous version, exchanged out before a kill
            elif src.is_dir() and src.stat().st_ino == ino:
                if copying:                     # restricted folder on another file system
                    incoming = Path(tempfile.mkdtemp(dir=make_restricted_dir(trash), prefix=".incoming-")) / "x"
                    try:
                        _copy_tree(src, incoming)
                        release_modes(incoming)
                        make_release_dir(release, Path(rel).parent)
                        publish_dir(incoming, dst)
                        append_line(progress, rel)
                    finally:
                        shutil.rmtree(incoming.parent, ignore_errors=True)
                    shutil.rmtree(src)
                else:
                    release_modes(src)          # staged files are restricted until this gate
                    make_release_dir(release, Path(rel).parent)
                    publish_dir(src, dst)
                test_pause("publish-mid")
            else:
                raise PublicError(f"publish {unit}: the staged folder {rel} is gone; run again with "
                                  f"'-- --forcerun dicom other' to rebuild the unit")
        for rel in subject_folders(release, subject):
            if rel not in folders:              # no longer produced (e.g. no BIDS image any more)
                remove_tree(release / rel, trash)
    for subject in sorted(plan["withheld"]):
        for rel in subject_folders(release, subject):
            remove_tree(release / rel, trash)   # an earlier version must not stay either
        for rel in subject_folders(staging, subject):
            remove_tree(staging / rel, restricted / "tmp" / "publish")  # a later run stages it afresh
    _prune_empty(staging)
    listing = {rel: folder_listing(release / rel, hashes=True) for folders in plan["publish"].values() for rel in folders}
    atomic_write_text(plan_file.with_suffix(".files"), json.dumps(listing, sort_keys=True) + "\n",
                      RESTRICTED_FILE_MODE)
    # quarantine.tsv lists input files: every input file of a withheld subject, with the subject's
    # keyed ID and the attribute/field paths of its hits (never a value)
    files_of = {subj["subject"]: [f["relpath"] for f in subj["files"]] for subj in m["subjects"]}
    lines = []
    for subject, hits in sorted(plan["withheld"].items()):
        where = sorted({f"{h['area']}: {h['location']}" for h in hits})
        reason = (f"subject {subject} withheld: the leak scan found identifying values at "
                  f"{', '.join(where[:6])}{' …' if len(where) > 6 else ''} (every hit in {WITHHELD})")
        lines += [json.dumps({"file": rel, "reason": reason}) for rel in sorted(files_of.get(subject, []))]
    make_restricted_dir(Path(quarantine).parent)
    atomic_write_text(quarantine, "".join(line + "\n" for line in lines), RESTRICTED_FILE_MODE)
    record = {"unit": unit, "on_leak": on_leak, "published": sorted(plan["publish"]),
              "withheld": plan["withheld"], "published_with_leaks": plan["published_with_leaks"],
              "seconds": round(time.perf_counter() - started, 4)}
    make_restricted_dir(Path(done).parent)
    atomic_write_text(done, json.dumps(record, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    return {"published": len(plan["publish"]), "withheld": len(plan["withheld"]),
            "leaky_published": len(plan["published_with_leaks"]),
            "lines": [f"{s}: withheld, leak scan hit in {h['area']} at {h['location']} ({h['kind']} of {h['field']})"
                      for s, hits in sorted(plan["withheld"].items()) for h in hits]}


def forget_lost(release: Path, restricted: Path, units: Iterable[str]) -> list[str]:
    """Remove the publish markers of what is no longer in the release (a deleted release, a
    deleted subject folder or dataset-level file), so this run publishes it again instead of
    saying "Nothing to be done" over a release that lacks it: a unit's chain runs again from its
    first stage (publishing emptied its staging tree), the dataset-level files and the QC report
    are copied again from their staging areas.  Returns the markers removed (restricted paths)."""
    release, restricted = Path(release), Path(restricted)
    done = restricted / "done"
    lost = []
    for unit in units:
        marker = done / "publish" / f"{unit}.json"
        if not marker.is_file():
            continue
        plan_file = restricted / "work" / "publish" / f"{unit}.json"
        try:
            folders = [rel for f in json.loads(plan_file.read_text())["publish"].values() for rel in f]
        except (OSError, ValueError, KeyError, AttributeError):
            folders = None                      # no readable plan: publish again rather than trust it
        if folders is None or not all((release / rel).is_dir() and not (release / rel).is_symlink()
                                      for rel in folders) or not _as_published(release, restricted, plan_file):
            marker.unlink()
            lost.append(marker.relative_to(restricted).as_posix())
    marker = done / "publish_dataset.json"
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            files = {**{rel: restricted / DATASET_STAGING / rel for rel in record["files"]},
                     **{f"{QC_SUBDIR}/{name}": restricted / REPORT_STAGING / name
                        for name in record.get("report", REPORT_FILES)}}
        except (OSError, ValueError, KeyError, TypeError):
            files = None
        # each must still be the staged copy it was published from: an edited participants.tsv or
        # README stayed in the release ("Nothing to be done") though verify found the name added
        if files is None or not all(_same_file(release / rel, staged) for rel, staged in files.items()):
            marker.unlink()
            lost.append(marker.relative_to(restricted).as_posix())
    return lost


def folder_listing(folder: Path, hashes: bool = False) -> dict[str, list]:
    """Every entry under ``folder`` (links not followed) -> ``[kind, size, mtime_ns, ctime_ns]``
    (kind ``f`` file, ``d`` folder, ``l`` link, ``o`` anything else; sizes and times of files only),
    with ``hashes`` also each file's SHA-256: what :func:`publish_unit` published, to tell later
    whether the folder is still that."""
    out: dict[str, list] = {}
    todo = [(os.fspath(folder), "")]
    while todo:
        path, prefix = todo.pop()
        with os.scandir(path) as it:
            for e in it:
                rel = prefix + e.name
                if e.is_symlink():
                    out[rel] = ["l"]
                elif e.is_dir(follow_symlinks=False):
                    out[rel] = ["d"]
                    todo.append((e.path, rel + "/"))
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out[rel] = ["f", st.st_size, st.st_mtime_ns, st.st_ctime_ns, *([_sha256(e.path)] if hashes else [])]
                else:
                    out[rel] = ["o"]
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _as_published(release: Path, restricted: Path, plan_file: Path) -> bool:
    """Whether a unit's published folders hold exactly what its publish job left there (its
    ``.files`` record).  Entries added since (a file or a link dropped into a subject's folder) are
    moved into ``<restricted>/foreign/`` first, as :func:`set_aside_foreign` does at the top of the
    layout; a file changed, replaced or removed, or no record at all, means False: the unit is
    published again.  Before, a file added inside a published subject folder was found by
    ``deidflow verify``, but a rerun said "Nothing to be done" and "release complete".
    A file whose status-change time alone differs (a release copied with ``cp -a`` or ``rsync -a``
    with its restricted folder, restored from a backup) is compared by its SHA-256 and, when equal,
    recorded with its new time; a ``touch -r`` edit keeps size and mtime but not the hash."""
    record_file = plan_file.with_suffix(".files")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return False
    same, renewed = True, False
    for rel, published in sorted(record.items()):
        now = folder_listing(release / rel)
        extra = sorted(set(now) - set(published))
        for name in extra:
            if not any(name.startswith(e + "/") for e in extra):  # a folder's contents go with it
                _set_aside(release, restricted, f"{rel}/{name}")
        for name, entry in published.items():
            cur = now.get(name)
            if cur == entry[:4]:
                continue
            if (same and cur is not None and entry[0] == "f" and len(entry) == 5 and cur[:3] == entry[:3]
                    and _sha256(os.path.join(release, rel, name)) == entry[4]):
                entry[3] = cur[3]       # the same bytes, copied: remember the new ctime
                renewed = True
                continue
            same = False
    if same and renewed:
        atomic_write_text(record_file, json.dumps(record, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    return same


def _same_file(path: Path, copy: Path) -> bool:
    """Whether ``path`` is a plain file with the bytes of ``copy``."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size != copy.stat().st_size:
            return False
        return path.read_bytes() == copy.read_bytes()
    except OSError:
        return False


def forget_foreign(release: Path, restricted: Path, subjects: Iterable[str]) -> bool:
    """Remove the dataset publish marker when the release holds what no run of this input wrote
    (:func:`foreign_entries`, or a ``sub-X`` folder of no current subject: another release's
    subject, a withdrawn one copied back), so that :func:`publish_dataset` runs again and takes it
    out; else a run said "Nothing to be done" and "release complete" over files no leak scan read."""
    marker = Path(restricted) / "done" / "publish_dataset.json"
    if not marker.is_file() or not Path(release).is_dir():
        return False
    if not foreign_entries(release, restricted) and not release_subjects(release) - set(subjects):
        return False
    marker.unlink()
    return True


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder (files and modes); the first error is raised as it is (a full disk reads
    ``No space left on device``)."""
    for dirpath, _dirs, files in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy2(Path(dirpath) / name, target / name)


def scratch_dir(release: Path, restricted: Path) -> Path:
    """Where published folders are renamed away (and copied in from): ``<restricted>/tmp/publish``
    on the release's file system (the default sibling layout), else a hidden sibling of the release
    (``.<name>.deidflow-tmp``), since a rename cannot cross file systems."""
    release, restricted = Path(release), Path(restricted)
    if os.stat(restricted).st_dev == os.stat(release).st_dev:
        return restricted / "tmp" / "publish"
    return release.parent / f".{release.name}.deidflow-tmp"


def _plan(m: Mapping, verify: Mapping, staging: Path, token: str, on_leak: str) -> dict:
    publish: dict[str, dict[str, int]] = {}
    withheld: dict[str, list[dict]] = {}
    leaky: dict[str, list[dict]] = {}
    for subj in m["subjects"]:
        s = subj["subject"]
        result = verify["subjects"].get(s)
        if result is None:
            raise PublicError(f"publish {m['unit']}: {s} has no leak-scan result")
        hits = _hit_paths(result["hits"])
        if hits and on_leak == "fail":
            raise PublicError(f"leak scan: {s} holds identifying values (verify.on_leak: fail)")
        if hits and on_leak == "withhold":
            withheld[s] = hits
            continue
        if hits:
            leaky[s] = hits
        publish[s] = {rel: (staging / rel).stat().st_ino for rel in subject_folders(staging, s)}
    return {"token": token, "unit": m["unit"], "publish": publish, "withheld": withheld,
            "published_with_leaks": leaky}


def _prune_empty(root: Path) -> None:
    """Remove the empty folders a publish left in a staging tree."""
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        if dirpath != str(root):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------
# Dataset level
# ------------------------------------------------------------------------------------------------
def publish_dataset(staged: Path, release: Path, restricted: Path, subjects_file: Path, done: Path, *,
                    verify: Path, report_dir: Path, on_leak: str = "withhold") -> dict:
    """Take withdrawn subjects out of the release (recorded in ``withdrawn.tsv``), then copy the
    staged dataset-level files (``dataset_description.json``, ``participants.tsv`` …) into it,
    unless their leak scan (``verify``, the ``verify_dataset`` record) found an identifying value
    and ``on_leak`` is not ``publish``: then they are withheld.  Last, the QC report the
    ``verify_dataset`` job checked and staged in ``report_dir`` is copied in.  Both stay staged, so
    a file deleted from the release comes back on the next run (:func:`forget_lost`)."""
    started = time.perf_counter()
    staged, release, restricted = Path(staged), Path(release), Path(restricted)
    verify_record = json.loads(Path(verify).read_text())
    leaky = dataset_files_withheld(verify_record, on_leak)
    late, late_kept = late_leaks(verify_record, on_leak)
    report_files = [Path(report_dir) / name for name in REPORT_FILES]  # these names only: nothing unchecked
    if not all(p.is_file() for p in report_files):
        raise PublicError("the QC report is not in the staging area: run again with --forcerun verify_dataset")
    current = set(Path(subjects_file).read_text().split())
    gone = sorted(release_subjects(release) - current)
    today = _dt.date.today().isoformat()
    make_release_dir(release)
    trash = scratch_dir(release, restricted)
    audit = restricted / WITHDRAWN
    for subject in gone + sorted(set(late) - set(gone)):  # withdrawn, or leaking a later subject's values
        folders = subject_folders(release, subject)
        line = f"{today}\t{subject}\t{' '.join(folders)}\n"
        if not audit.exists():
            atomic_write_text(audit, "date\tsubject\tfolders_removed\n", RESTRICTED_FILE_MODE)
        if line not in audit.read_text():   # recorded before the folders go (a killed job repeats it)
            append_line(audit, line)
        for rel in folders:
            remove_tree(release / rel, trash)
    foreign = set_aside_foreign(release, restricted)
    files = sorted(p for p in staged.rglob("*") if p.is_file()) if staged.is_dir() else []
    moved, withheld = [], []
    for p in files:
        rel = p.relative_to(staged).as_posix()
        if leaky:  # an earlier run's copy describes an earlier release (withdrawn subjects): out too
            withheld.append(rel)
            (release / rel).unlink(missing_ok=True)
        else:
            make_release_dir(release, Path(rel).parent)
            atomic_write_bytes(release / rel, p.read_bytes(), 0o644, trash)
            moved.append(rel)
        os.chmod(p, RESTRICTED_FILE_MODE)  # the staged copies are restricted files now
    make_release_dir(release, QC_SUBDIR)  # Snakemake made it (an output folder) with the run's umask
    for p in report_files:
        atomic_write_bytes(release / QC_SUBDIR / p.name, p.read_bytes(), 0o644, trash)
    record = {"withdrawn": gone, "files": moved, "withheld": withheld, "report": [p.name for p in report_files],
              "foreign_set_aside": foreign, "late_withheld": late, "late_published_with_leaks": late_kept,
              "seconds": round(time.perf_counter() - started, 4)}
    make_restricted_dir(Path(done).parent)
    atomic_write_text(done, json.dumps(record, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    return {"withdrawn": len(gone), "files": len(moved), "withheld": len(withheld), "late": len(late)}


def dataset_files_withheld(verify_record: Mapping[str, Any], on_leak: str) -> bool:
    """Whether :func:`publish_dataset` keeps the staged dataset-level files out of the release (and
    takes an earlier run's copies out): their scan (the ``verify_dataset`` record) found an
    identifying value and ``on_leak`` is not ``publish``."""
    return bool(verify_record.get("hits")) and on_leak != "publish"


def late_leaks(verify_record: Mapping[str, Any], on_leak: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """The subjects an earlier run published in whose files the ``verify_dataset`` job found a
    later-added subject's ID or name (``late``, :func:`deidflow.qc.leakscan.late_subject_scan`),
    as (taken out of the release, left in it under ``on_leak: publish``), each with its hit paths."""
    late = {s: _hit_paths(h) for s, h in sorted((verify_record.get("late") or {}).items())}
    return ({}, late) if on_leak == "publish" else (late, {})


# What deidflow itself puts at the release root; anything else there is foreign (see set_aside_foreign).
OWN_ROOT_ENTRIES = frozenset({"sourcedata", "derivatives", "dataset_description.json", "participants.tsv",
                              "participants.json", "README", "CHANGES", ".bidsignore", MARKER})
FOREIGN = "foreign"


BIDS_DATASET_DONE = "done/bids_dataset.json"  # restricted: the bids_dataset job's record (its "files")


def own_root_entries(restricted: Path | None = None) -> frozenset[str]:
    """The root entries deidflow writes: ``sourcedata``, ``derivatives``, the marker, and the
    dataset-level files the ``bids_dataset`` job of ``restricted`` lists (none without BIDS output:
    a README there is someone else's); every name of :data:`OWN_ROOT_ENTRIES` when not known."""
    if restricted is None:
        return OWN_ROOT_ENTRIES
    try:
        listed = json.loads((Path(restricted) / BIDS_DATASET_DONE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    return frozenset({"sourcedata", "derivatives", MARKER, *(n for n in listed if n in OWN_ROOT_ENTRIES)})


def foreign_entries(release: Path, restricted: Path | None = None) -> list[Path]:
    """The entries of the release that no deidflow stage wrote: at the root anything but
    :func:`own_root_entries` and ``sub-X/``; in ``derivatives/`` anything but ``deidflow/``, there
    anything but ``qc/``, there anything but the report's files and ``sub-X/``; in each
    ``sourcedata/<area>/`` anything but ``sub-X/``.  A symbolic link is always foreign (no stage
    writes one; a copy that follows links would take what it points to)."""
    release = Path(release)
    found: list[Path] = []
    if not release.is_dir():
        return found
    own_root = own_root_entries(restricted)
    for entry in release.iterdir():
        if entry.is_symlink() or not (entry.name in own_root or (entry.name.startswith("sub-") and _real_dir(entry))):
            found.append(entry)
    derivatives = release / "derivatives"
    if _real_dir(derivatives):
        found += [e for e in derivatives.iterdir() if e.name != "deidflow" or not _real_dir(e)]
    own = derivatives / "deidflow"
    if _real_dir(own):  # deidflow writes its QC folder there: the report's files and sub-X/ folders
        found += [e for e in own.iterdir() if e.name != "qc" or not _real_dir(e)]
    qc = own / "qc"
    if _real_dir(qc):
        found += [e for e in qc.iterdir() if e.is_symlink() or not (
            e.name in REPORT_FILES or (e.name.startswith("sub-") and _real_dir(e)))]
    sourcedata = release / "sourcedata"
    if _real_dir(sourcedata):
        for area in sourcedata.iterdir():
            if not _real_dir(area):
                found.append(area)
                continue
            found += [e for e in area.iterdir() if not (e.name.startswith("sub-") and _real_dir(e))]
    return found


def _real_dir(p: Path) -> bool:
    """A folder, not a link to one."""
    return p.is_dir() and not p.is_symlink()


def set_aside_foreign(release: Path, restricted: Path) -> list[str]:
    """Move every entry of the release that no deidflow stage wrote (:func:`foreign_entries`: files
    of a folder used with ``--force``, files someone dropped into an earlier release) into
    ``<restricted>/foreign/``: nothing the leak scan has not passed stays in the release. Returns
    their keyed count only (names may identify a person, so they are listed in the restricted
    folder, never printed)."""
    release, restricted = Path(release), Path(restricted)
    found = foreign_entries(release, restricted)
    if not found:
        return []
    moved = []
    for entry in sorted(found):
        rel = entry.relative_to(release).as_posix()
        _set_aside(release, restricted, rel)
        moved.append(rel)
    return moved


def _set_aside(release: Path, restricted: Path, rel: str) -> None:
    """Move the release entry ``rel`` (a link as the link) into ``<restricted>/foreign/rel`` and
    record it in ``foreign/moved.tsv`` (append-only, restricted)."""
    dest = make_restricted_dir(Path(restricted) / FOREIGN)
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        target = target.with_name(f"{target.name}.{int(time.time())}")
    note = ""
    try:
        shutil.move(str(Path(release) / rel), str(target))
    except shutil.SpecialFileError:  # a FIFO or socket that a rename could not take across file systems
        os.unlink(Path(release) / rel)
        note = "\t(special file, removed)"
    if os.path.lexists(target):
        restricted_modes(target)  # restricted now, whatever its modes in the release
    append_line(dest / "moved.tsv", f"{_dt.datetime.now().isoformat(timespec='seconds')}\t{rel}{note}")


def current_subjects(restricted: Path) -> set[str] | None:
    """The current input's subjects (:data:`SUBJECTS`), None before a run wrote them."""
    try:
        return set((Path(restricted) / SUBJECTS).read_text().split())
    except OSError:
        return None


def write_subjects(restricted: Path, subjects: Iterable[str]) -> None:
    """The current input's subjects (rewritten only when the set changes)."""
    from .fsutil import write_if_changed
    write_if_changed(Path(restricted) / SUBJECTS, "".join(f"{s}\n" for s in sorted(subjects)).encode(),
                     RESTRICTED_FILE_MODE)


# ------------------------------------------------------------------------------------------------
# The release's state
# ------------------------------------------------------------------------------------------------
def write_withheld(restricted: Path, unit_records: Iterable[Path],
                   late: tuple[Mapping[str, list[dict]], Mapping[str, list[dict]]] | None = None) -> dict:
    """``withheld.json`` (restricted): the subjects the publish jobs withheld and those published
    with leaks (``verify.on_leak: publish``), each with the area and attribute path of its hits;
    with those the dataset gate found leaking a later-added subject's values (``late``, as
    :func:`late_leaks` gives them; read from the ``publish_dataset`` record when not given)."""
    withheld: dict[str, list[dict]] = {}
    leaky: dict[str, list[dict]] = {}
    for p in unit_records:
        rec = json.loads(Path(p).read_text())
        withheld.update(rec["withheld"])
        leaky.update(rec["published_with_leaks"])
    if late is None:
        record = Path(restricted) / "done" / "publish_dataset.json"
        rec = json.loads(record.read_text()) if record.is_file() else {}
        late = (rec.get("late_withheld") or {}, rec.get("late_published_with_leaks") or {})
    withheld.update(late[0])
    leaky.update(late[1])
    doc = {"withheld": withheld, "published_with_leaks": leaky}
    atomic_write_text(Path(restricted) / WITHHELD, json.dumps(doc, indent=1, sort_keys=True) + "\n",
                      RESTRICTED_FILE_MODE)
    return doc


def finalize(release: Path, restricted: Path, units: Iterable[str]) -> dict:
    """At the end of a successful run: record what was withheld (``withheld.json``, the run's
    ``release-status.json``) and take the RELEASE_INCOMPLETE marker away."""
    release, restricted = Path(release), Path(restricted)
    doc = write_withheld(restricted, [restricted / "done" / "publish" / f"{u}.json" for u in units])
    quarantine = restricted / "quarantine.tsv"
    n_bad = max(0, len(quarantine.read_text().splitlines()) - 1) if quarantine.exists() else 0
    dataset = restricted / "done" / "publish_dataset.json"
    n_dataset = len(json.loads(dataset.read_text()).get("withheld", ())) if dataset.exists() else 0
    status = {"complete": True, "withheld_subjects": sorted(doc["withheld"]),
              "published_with_leaks": sorted(doc["published_with_leaks"]), "quarantined_files": n_bad,
              "dataset_files_withheld": n_dataset}
    atomic_write_text(restricted / STATUS, json.dumps(status, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
    (release / MARKER).unlink(missing_ok=True)
    return status


def finalize_run(release: Path, restricted: Path, units: Iterable[str]) -> list[str]:
    """The Snakefile's ``onsuccess``: :func:`finalize`, then the lines the terminal must show
    (withheld subjects with their hit paths, a published leak)."""
    finalize(release, restricted, units)
    return release_status(release, restricted)["lines"]


def release_status(release: Path, restricted: Path) -> dict:
    """Whether the release is complete, what was withheld, and the exit status that says so
    (``EXIT_INCOMPLETE`` when a run is unfinished or anything was withheld or quarantined, or
    leaks were published by ``verify.on_leak: publish``), with one line per fact for the terminal."""
    release, restricted = Path(release), Path(restricted)
    rec = {}
    if (restricted / STATUS).exists():
        rec = json.loads((restricted / STATUS).read_text())
    complete = bool(rec) and not (release / MARKER).exists()
    withheld = rec.get("withheld_subjects", [])
    leaky = rec.get("published_with_leaks", [])
    n_bad = rec.get("quarantined_files", 0)
    n_dataset = rec.get("dataset_files_withheld", 0)
    lines = []
    if not complete:
        lines.append(f"deidflow: RELEASE INCOMPLETE: {release / MARKER} is there: a run is under way or stopped "
                     "early; do not share the release, run the same command again")
    details = {}
    if withheld and (restricted / WITHHELD).exists():
        details = json.loads((restricted / WITHHELD).read_text()).get("withheld", {})
    for s in withheld:
        paths = sorted({f"{h['area']}: {h['location']}" for h in details.get(s, [])})
        lines.append(f"deidflow: {s} withheld from the release: leak scan found identifying values at "
                     f"{'; '.join(paths[:5])}{' …' if len(paths) > 5 else ''} (all in {restricted / 'quarantine.tsv'})")
    if n_dataset:
        lines.append(f"deidflow: {n_dataset} dataset-level file(s) (dataset_description.json, participants.tsv …) "
                     "withheld from the release: the leak scan found identifying values in them "
                     f"(hits in {restricted / 'done' / 'verify_dataset.json'})")
    if release.is_dir() and restricted.is_dir() and scratch_dir(release, restricted).parent == release.parent:
        lines.append(f"deidflow: warning: {restricted} is on another file system than the release: subject folders "
                     "are published by a copy next to the release and a rename (slower); keep both on one file system")
    if leaky:
        lines.append(f"deidflow: WARNING: verify.on_leak is 'publish': {', '.join(leaky)} published WITH "
                     "identifying values found by the leak scan; the release is not de-identified")
    incomplete = not complete or withheld or leaky or n_bad or n_dataset
    return {"complete": complete, "withheld": withheld, "published_with_leaks": leaky, "quarantined_files": n_bad,
            "exit": EXIT_INCOMPLETE if incomplete else EXIT_OK, "lines": lines}


# ------------------------------------------------------------------------------------------------
# Before a run writes anything
# ------------------------------------------------------------------------------------------------
def check_folders(input_dir: Path, output: Path, restricted: Path, *, force: bool = False) -> None:
    """Refuse (UsageError) an input folder that is missing, empty or holds nothing deidflow
    recognises, an output inside the input, and a non-empty output folder no deidflow run wrote
    (no run record in its restricted folder) unless ``force``."""
    from .sniff import sniff
    inp, out, restricted = Path(input_dir), Path(output), Path(restricted)
    if not inp.is_dir():
        raise UsageError(f"input folder {inp} does not exist")
    for a, b, what in ((out, inp, "output folder"), (restricted, inp, "restricted folder")):
        if a == b or b in a.parents:
            raise UsageError(f"{what} {a} is inside the input folder {b}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file, not a folder")
    check_restricted_owner(out, restricted)
    _check_restricted_foreign(restricted)
    if (out.is_dir() and any(out.iterdir()) and not (restricted / "run.json").exists() and not force):
        raise UsageError(f"output folder {out} is not empty and no deidflow run wrote it (no run record in "
                         f"{restricted}); choose an empty or new folder, or pass --force to use it anyway "
                         "(its files are then moved into the restricted folder, never released)")
    seen = False
    for dirpath, dirs, files in os.walk(inp):
        dirs.sort()
        for name in sorted(files):
            seen = True
            try:
                if sniff(Path(dirpath) / name) not in ("unknown", "empty"):
                    return
            except OSError:
                continue
    raise UsageError(f"input folder {inp} is empty" if not seen else
                     f"input folder {inp} holds no file deidflow recognises (DICOM, NIfTI, Analyze, MINC, "
                     "PAR/REC, MGH, twix, BIDS JSON)")


# Files in a restricted folder that only deidflow writes (the command line writes the last two
# before Snakemake starts); a non-empty folder with none of them is someone else's.
RESTRICTED_MARKS = ("run.json", "key_fingerprint", "run-config.yaml", ".deidflow.lock")


def _check_restricted_foreign(restricted: Path) -> None:
    """Refuse a restricted folder that exists, holds something and was never deidflow's (`--restricted
    /work`, a home folder): a run forces it to mode 0700, locking its owners' other users out, and
    writes its files among theirs."""
    try:
        entries = {e.name for e in os.scandir(restricted)}
    except (FileNotFoundError, NotADirectoryError):
        return
    if entries and not entries.intersection(RESTRICTED_MARKS):
        raise UsageError(f"restricted folder {restricted} is not empty and no deidflow run wrote it; choose a "
                         "new or empty folder (deidflow makes it mode 0700 and keeps the mappings there)")


def check_restricted_owner(out: Path, restricted: Path) -> None:
    """Refuse a restricted folder whose run record names another release that still exists: its
    mappings, withdrawals and staging describe that release, and a run for ``out`` would mark every
    subject of it withdrawn and drop their date offsets. A release moved together with its
    restricted folder (the recorded one is gone) is accepted."""
    try:
        owner = json.loads((restricted / "run.json").read_text()).get("output")
    except (OSError, ValueError, AttributeError):
        return
    if not owner or Path(owner) == out or not Path(owner).is_dir():
        return
    try:
        if out.exists() and os.path.samefile(owner, out):
            return
    except OSError:
        pass
    raise UsageError(f"restricted folder {restricted} belongs to the release {owner}, not to {out}: every "
                     "release needs its own restricted folder; pass that release as the output, or choose "
                     "another restricted folder")


def on_leak_of(config: Mapping[str, Any]) -> str:
    """``verify.on_leak`` (default withhold); ``strict: true`` makes a leak fail the run."""
    v = (config.get("verify") or {}).get("on_leak", "withhold")
    return "fail" if config.get("strict") else v
