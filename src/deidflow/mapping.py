"""Restricted outputs that span subjects: pseudonym, UID and date mappings and the quarantine list."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

import pyarrow.parquet as pq

from .fsutil import RESTRICTED_FILE_MODE, atomic_write_text, csv_text, display_path, make_restricted_dir

QUARANTINE_HEADER = "file\treason\n"


def tsv_field(text: str) -> str:
    """One TSV field on one line: backslash, tab, newline and carriage return escaped."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def write_mappings(inventory: Path, uid_files: Iterable[Path], quarantine_files: Iterable[Path],
                   patients: Path, uids: Path, dates: Path, quarantine: Path) -> dict:
    """Write ``patients.csv`` and ``uids.csv`` (``id_old,id_new``, the MIDI-B validator's form),
    ``dates.csv`` (subject → day offset) and ``quarantine.tsv`` (file, reason); sorted, so equal
    inputs give equal bytes.  Returns counts."""
    t = pq.read_table(inventory, columns=["relpath", "status", "reason", "patient_id", "subject",
                                          "date_offset"]).to_pylist()
    ok = [r for r in t if r["status"] == "ok" and r["subject"]]
    pat = sorted({(r["patient_id"], r["subject"]) for r in ok})
    offsets = sorted({(r["subject"], r["date_offset"]) for r in ok})
    uid_rows: set[tuple[str, str]] = set()
    for f in uid_files:
        with open(f, newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            uid_rows.update((a, b) for a, b in reader)
    bad = [(r["relpath"], r["reason"]) for r in t if r["status"] == "quarantine"]
    for f in quarantine_files:  # JSON lines written by the jobs: {"file": ..., "reason": ...}
        for line in Path(f).read_text().splitlines():
            if line:
                item = json.loads(line)
                bad.append((display_path(item["file"]), item["reason"]))
    bad.sort()
    for p in (patients, uids, dates, quarantine):
        make_restricted_dir(Path(p).parent)
    atomic_write_text(patients, csv_text([("id_old", "id_new"), *pat]), RESTRICTED_FILE_MODE)
    atomic_write_text(uids, csv_text([("id_old", "id_new"), *sorted(uid_rows)]), RESTRICTED_FILE_MODE)
    atomic_write_text(dates, csv_text([("subject", "offset_days"), *offsets]), RESTRICTED_FILE_MODE)
    atomic_write_text(quarantine, QUARANTINE_HEADER + "".join(f"{tsv_field(a)}\t{tsv_field(b)}\n" for a, b in bad),
                      RESTRICTED_FILE_MODE)
    return {"patients": len(pat), "uids": len(uid_rows), "quarantined": len(bad)}


def read_quarantine(path: Path) -> list[tuple[str, str]]:
    lines = Path(path).read_text().splitlines()[1:]
    return [tuple(line.split("\t", 1)) for line in lines if line]
