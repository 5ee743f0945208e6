"""The audit trail as one table: ``restricted/audit/*.jsonl`` into ``restricted/audit.parquet``.

Each stage appends JSON lines per released file to ``restricted/audit/<subject>.jsonl``:
``{"file": <release path>, "source": <src_id>, "actions": {<attribute path>: <action code>}}``
(``stage`` optional).  The table has one row per file and attribute: subject, stage, file, source,
attribute, action.  No value is in it, only what was done.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

from ..fsutil import RESTRICTED_FILE_MODE, make_restricted_dir

COLUMNS = ("subject", "stage", "file", "source", "attribute", "action")
_INDEX = re.compile(r"\[\d+\]")


def _entries(restricted: Path, subjects: Collection[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(subject, entry) for every readable line of every audit file (of ``subjects`` only, when
    given), in a stable order."""
    for f in sorted((Path(restricted) / "audit").glob("*.jsonl")):
        if subjects is not None and f.stem not in subjects:
            continue
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                yield f.stem, item


def consolidate(restricted: Path, output: Path) -> int:
    """Write ``audit.parquet`` (restricted, mode 0600, atomically); returns the number of rows.
    Columns are filled per file entry (a release of 6,000 files has about a million rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    cols: dict[str, list[str]] = {c: [] for c in COLUMNS}
    subjects, stages, files, sources, attributes, actions = (cols[c] for c in COLUMNS)
    for subject, item in _entries(restricted):
        pairs = sorted((item.get("actions") or {}).items())
        if not pairs:
            continue
        k = len(pairs)
        subjects.extend([subject] * k)
        stages.extend([str(item.get("stage", "dicom"))] * k)
        files.extend([str(item.get("file", ""))] * k)
        sources.extend([str(item.get("source", ""))] * k)
        attributes.extend(str(a) for a, _ in pairs)
        actions.extend(str(c) for _, c in pairs)
    table = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
    output = Path(output)
    make_restricted_dir(output.parent)
    tmp = output.with_name(f".tmp-{output.name}")
    pq.write_table(table, tmp, compression="zstd")
    tmp.chmod(RESTRICTED_FILE_MODE)
    tmp.replace(output)
    return len(subjects)


def attribute_name(path: str) -> str:
    """An audit attribute path without item indices (``Seq[0].Attr`` -> ``Seq.Attr``)."""
    return _INDEX.sub("", path)


def summary(restricted: Path) -> tuple[dict[str, Counter], dict[str, int]]:
    """In one pass: subject -> Counter of (attribute without item indices, action code), and
    subject -> number of released files recorded in the audit."""
    facts = scan(restricted)
    return facts.counts, facts.files


@dataclass
class AuditFacts:
    """What the report needs from the audit, gathered in one pass over the JSON lines."""

    counts: dict[str, Counter] = field(default_factory=dict)  # subject -> (attribute, code) -> occurrences
    files: dict[str, int] = field(default_factory=dict)  # subject -> audited files
    attribute_files: Counter = field(default_factory=Counter)  # (attribute, code) -> files
    pixels: list[tuple[str, str, dict]] = field(default_factory=list)  # (subject, file, pixel record)
    series: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # series folder -> (file, source, files)
    sources: set[str] = field(default_factory=set)  # source IDs of the released files


def scan(restricted: Path, subjects: Collection[str] | None = None) -> AuditFacts:
    """Per-subject action counts, files per (attribute, action) over the dataset, the pixel
    step's records and one file (with its source ID) per series folder, in one pass; only the
    audit of ``subjects`` when given (a withdrawn subject's audit stays in the restricted folder)."""
    raw: dict[str, Counter] = defaultdict(Counter)
    files: dict[str, int] = defaultdict(int)
    per_file: Counter = Counter()
    out = AuditFacts()
    for subject, item in _entries(restricted, subjects):
        files[subject] += 1
        actions = item.get("actions") or {}
        raw[subject].update(actions.items())  # codes are strings; Counter.update runs in C
        indexed = {a: attribute_name(str(a)) for a in actions if "[" in a}
        if indexed:  # Seq[0].X and Seq[1].X of one file count once for Seq.X
            per_file.update({(indexed.get(a, a), str(c)) for a, c in actions.items()})
        else:
            per_file.update(actions.items())
        name = str(item.get("file", ""))
        out.sources.add(str(item.get("source", "")))
        if isinstance(item.get("pixels"), dict):
            out.pixels.append((subject, name, item["pixels"]))
        folder = name.rpartition("/")[0]
        first = out.series.get(folder)
        out.series[folder] = (first[0], first[1], first[2] + 1) if first else (name, str(item.get("source", "")), 1)
    for subject, pairs in raw.items():  # strip item indices once per distinct path, not per row
        out.counts[subject] = Counter()
        for (attr, code), n in pairs.items():
            out.counts[subject][(attribute_name(str(attr)), str(code))] += n
    out.files = dict(files)
    out.attribute_files = Counter({(str(a), str(c)): n for (a, c), n in per_file.items()})
    return out
