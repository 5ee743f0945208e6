"""Restricted outputs that span subjects: pseudonym, UID and date mappings and the quarantine list."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Mapping

from .fsutil import (RESTRICTED_FILE_MODE, atomic_write_text, csv_text, display_path, make_restricted_dir,
                     write_if_changed)

QUARANTINE_HEADER = "file\treason\n"
PATIENTS = "mapping/patients.csv"
DATES = "mapping/dates.csv"
INVENTORY_QUARANTINE = "work/inventory-quarantine.jsonl"


def tsv_field(text: str) -> str:
    """One TSV field on one line: backslash, tab, newline and carriage return escaped."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def write_inventory_mappings(rows: Iterable[Mapping], restricted: Path) -> dict:
    """At parse time, from the inventory rows in memory: ``mapping/patients.csv``
    (``id_old,id_new``, the MIDI-B validator's form), ``mapping/dates.csv`` (subject → day offset)
    and ``work/inventory-quarantine.jsonl`` (files the inventory already refused).  Files are
    rewritten only when their content changes, so Snakemake sees no new input on a re-run."""
    rows = list(rows)
    ok = [r for r in rows if r.get("status") == "ok" and r.get("subject")]
    pat = sorted({(r["patient_id"] or "", r["subject"]) for r in ok})
    offsets = sorted({(r["subject"], r["date_offset"]) for r in ok})
    bad = sorted((display_path(r["relpath"]), r["reason"]) for r in rows if r.get("status") == "quarantine")
    restricted = Path(restricted)
    for sub in ("mapping", "work"):
        make_restricted_dir(restricted / sub)
    rows_out = _with_withdrawn(restricted / PATIENTS, pat)
    write_if_changed(restricted / PATIENTS, csv_text([("id_old", "id_new", "withdrawn"), *rows_out]).encode(),
                     RESTRICTED_FILE_MODE)
    offsets = _with_earlier(restricted / DATES, offsets)  # a withdrawn subject's offset stays
    write_if_changed(restricted / DATES, csv_text([("subject", "offset_days"), *offsets]).encode(),
                     RESTRICTED_FILE_MODE)
    write_if_changed(restricted / INVENTORY_QUARANTINE,
                     "".join(json.dumps({"file": f, "reason": r}) + "\n" for f, r in bad).encode(),
                     RESTRICTED_FILE_MODE)
    return {"patients": len(pat), "quarantined": len(bad)}


def _with_withdrawn(path: Path, current: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Append-only patients.csv: the current rows, and every earlier row that is no longer in the
    input, kept with the date it was first found withdrawn (``withdrawn`` column)."""
    import datetime as dt
    old: dict[tuple[str, str], str] = {}
    if Path(path).exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                old[(row["id_old"], row["id_new"])] = row.get("withdrawn") or ""
    now = set(current)
    today = dt.date.today().isoformat()
    gone = [(a, b, old[(a, b)] or today) for a, b in sorted(old) if (a, b) not in now]
    return sorted([(a, b, "") for a, b in current] + gone)


def _with_earlier(path: Path, current: Iterable[tuple]) -> list[tuple]:
    """Append-only two-column mapping (``dates.csv``, ``uids.csv``): the current rows, and every
    row of the file as it is whose first column no current row has (a subject withdrawn from the
    input, the UIDs of its files). Before, a withdrawal dropped them: the day offset and the UID
    map of data already shared were gone from the restricted folder."""
    current = list(current)
    keys = {row[0] for row in current}
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            earlier = [tuple(row) for row in reader if len(row) == 2 and row[0] not in keys]
    except FileNotFoundError:
        earlier = []
    width = {type(v) for row in current for v in row[1:]}
    if int in width:  # offsets are numbers: keep their type for sorting and writing
        earlier = [(a, int(b)) for a, b in earlier]
    return sorted(current + earlier)


def merge_job_outputs(uid_files: Iterable[Path], quarantine_files: Iterable[Path], uids: Path,
                      quarantine: Path) -> dict:
    """The mapping job: merge the jobs' UID maps into ``mapping/uids.csv`` and their quarantine
    lines (JSON lines ``{"file", "reason"}``) into ``quarantine.tsv`` (file, reason); sorted, so
    equal inputs give equal bytes.  Returns counts.

    A later stage that replaces a released UID again (the face stage's defaced images) lists
    ``released,new``: such rows are chained (:func:`chain_uids`), so every original UID maps to
    the UID that is in the release and no intermediate UID is listed.  Rows of originals no
    longer in the input (a withdrawn subject's) stay (append-only; kept in ``uids.history.csv``
    beside it, since Snakemake deletes a job's output before the job runs)."""
    uid_rows: set[tuple[str, str]] = set()
    for f in uid_files:
        with open(f, newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            uid_rows.update((a, b) for a, b in reader)
    uid_rows = chain_uids(uid_rows)
    bad: list[tuple[str, str]] = []
    for f in quarantine_files:
        for line in Path(f).read_text().splitlines():
            if line:
                item = json.loads(line)
                bad.append((display_path(item["file"]), item["reason"]))
    bad.sort()
    for p in (uids, quarantine):
        make_restricted_dir(Path(p).parent)
    # Snakemake deletes uids.csv before this job runs: the earlier rows come from a copy of it
    history = Path(uids).with_suffix(".history.csv")
    text = csv_text([("id_old", "id_new"), *_with_earlier(history, uid_rows)])
    atomic_write_text(history, text, RESTRICTED_FILE_MODE)
    atomic_write_text(uids, text, RESTRICTED_FILE_MODE)
    atomic_write_text(quarantine, QUARANTINE_HEADER + "".join(f"{tsv_field(a)}\t{tsv_field(b)}\n" for a, b in bad),
                      RESTRICTED_FILE_MODE)
    return {"uids": len(uid_rows), "quarantined": len(bad)}


def chain_uids(rows: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """``old,new`` rows with chains resolved: where one row's new UID is another row's old UID
    (original → scrubbed, scrubbed → defaced), the original maps to the end of the chain and the
    intermediate row goes.  Keyed UIDs never collide with originals, so a UID that is some row's
    new value is an intermediate, not an original."""
    rows = set(rows)
    step = {a: b for a, b in rows if a != b}
    targets = set(step.values())
    out = set()
    for a, b in rows:
        if a in targets and a != b:
            continue                            # an intermediate UID: never in the release
        seen = {a}
        while b in step and b not in seen:
            seen.add(b)
            b = step[b]
        out.add((a, b))
    return out


def read_quarantine(path: Path) -> list[tuple[str, str]]:
    lines = Path(path).read_text().splitlines()[1:]
    return [tuple(line.split("\t", 1)) for line in lines if line]
