"""What the Snakefile does at parse time: check the key, lay out folders, refresh the inventory.

Runs in Snakemake's main process only; cluster and subprocess jobs read the subject list from
the inventory that the main process wrote.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import inventory
from .batching import plan_units
from .fsutil import RESTRICTED_FILE_MODE, clear_job_tmp, make_restricted_dir, write_if_changed
from .mapping import write_inventory_mappings
from .pseudonym import Pseudonymizer, fingerprint, load_key, load_mapping
from .settings import Paths, resolve_paths

FINGERPRINT_FILE = "key_fingerprint"


class ReleaseKeyMismatch(RuntimeError):
    """The release folder was made with another key."""


@dataclass(frozen=True)
class Prepared:
    paths: Paths
    subjects: list[str]
    units: dict[str, list[str]]  # job unit (sub-… or batch-…) -> subjects
    fingerprint: str
    unit_formats: dict[str, frozenset[str]]  # job unit -> formats of its files (stages skip units without work)


def pseudonymizer(key: bytes, config: Mapping[str, Any]) -> Pseudonymizer:
    """The Pseudonymizer the configuration asks for."""
    ps = config["pseudonym"]
    mapping = load_mapping(ps["mapping_csv"]) if ps.get("mapping_csv") else {}
    lo, hi = ps["date_offset_days"]
    return Pseudonymizer(key, length=ps["length"], offset_range=(lo, hi), mapping=mapping)


def prepare(config: Mapping[str, Any], *, main_process: bool = True) -> Prepared:
    """Resolve folders, load the key and (main process) refresh the inventory and manifests."""
    paths = resolve_paths(config)
    if main_process:  # refuse an unusable input or a foreign output before anything is written
        from .publish import check_folders
        check_folders(paths.input, paths.output, paths.restricted, force=bool(config.get("force")))
    key = load_key(config.get("key_file") or None)
    fp = fingerprint(key)
    if not main_process:
        table = inventory.read(paths.restricted, columns=["subject", "status", "format"])
        counts: dict[str, int] = {}
        formats: dict[str, set[str]] = {}
        for subject, status, fmt in zip(*(table[c].to_pylist() for c in ("subject", "status", "format"))):
            if status == "ok" and subject:
                counts[subject] = counts.get(subject, 0) + 1
                formats.setdefault(subject, set()).add(fmt)
        units = _units(counts, config)
        return Prepared(paths, sorted(counts), units, fp, _unit_formats(units, formats))
    make_restricted_dir(paths.restricted)
    make_restricted_dir(paths.restricted / "staging")  # 0700 like the rest (the release gate sets 0644/0755)
    clear_job_tmp(paths.restricted)  # what killed jobs of an earlier run left (no job of this run has started)
    _check_fingerprint(paths, fp)
    inv = inventory.build(paths.input, pseudonymizer(key, config),
                          previous=paths.restricted / "inventory.parquet",
                          unmapped=config["pseudonym"]["unmapped"],
                          subject_pattern=(config.get("formats") or {}).get("subject_pattern") or "")
    units = _units(inventory.files_per_subject(inv), config)
    from .publish import forget_foreign, forget_lost
    lost = forget_lost(paths.output, paths.restricted, units)
    if lost:
        print(f"deidflow: {len(lost)} published part(s) of the release are gone from {paths.output} or were "
              "changed there: publishing them again", file=sys.stderr)
    if forget_foreign(paths.output, paths.restricted, inv.subjects):
        print(f"deidflow: {paths.output} holds files or subject folders no run of this input wrote: "
              "taking them out of the release", file=sys.stderr)
    inventory.write(inv, paths.restricted, units)
    write_inventory_mappings(inv.rows, paths.restricted)
    formats = {s: {r["format"] for r in rows} for s, rows in inv.by_subject().items()}
    return Prepared(paths, inv.subjects, units, fp, _unit_formats(units, formats))


def _unit_formats(units: Mapping[str, list[str]], formats: Mapping[str, set[str]]) -> dict[str, frozenset[str]]:
    return {u: frozenset().union(*(formats.get(s, ()) for s in subjects)) for u, subjects in units.items()}


def _units(counts: Mapping[str, int], config: Mapping[str, Any]) -> dict[str, list[str]]:
    jobs = config["jobs"]
    return plan_units(counts, jobs["files_per_job"], jobs["min_batches"])


def recorded_fingerprint(restricted: Path) -> str | None:
    """The fingerprint of the key a release was made with: its ``key_fingerprint`` file, else the
    run record's (a deleted marker file must not let another key in silently)."""
    marker = Path(restricted) / FINGERPRINT_FILE
    if marker.is_file():
        return marker.read_text().strip()
    try:
        return json.loads((Path(restricted) / "run.json").read_text()).get("key_fingerprint") or None
    except (OSError, ValueError, AttributeError):
        return None


def _check_fingerprint(paths: Paths, fp: str) -> None:
    """Refuse to add to a release made with another key (pseudonyms would not match)."""
    old = recorded_fingerprint(paths.restricted)
    if old is not None and old != fp:
        raise ReleaseKeyMismatch(
            f"{paths.output} was made with the key whose fingerprint is {old}; the key given now "
            f"has fingerprint {fp}. Use the original key, or release into a new output folder.")
    write_if_changed(paths.restricted / FINGERPRINT_FILE, (fp + "\n").encode(), RESTRICTED_FILE_MODE)


def write_run_record(prepared: Prepared, settings: Mapping[str, Any]) -> None:
    """``restricted/run.json``: deidflow version, command line, settings and key fingerprint
    (never the key: it comes from the environment or a key file); rewritten only when it changes."""
    from . import __version__
    from ._snakemake import command_line
    text = json.dumps({"deidflow": __version__, "key_fingerprint": prepared.fingerprint, "command": command_line(),
                       "settings": dict(settings), "output": str(prepared.paths.output)},
                      indent=1, sort_keys=True) + "\n"
    write_if_changed(prepared.paths.restricted / "run.json", text.encode(), RESTRICTED_FILE_MODE)
