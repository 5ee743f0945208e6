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
from pathlib import Path
from typing import Iterator

from ..fsutil import RESTRICTED_FILE_MODE, make_restricted_dir

COLUMNS = ("subject", "stage", "file", "source", "attribute", "action")
_INDEX = re.compile(r"\[\d+\]")


def _entries(restricted: Path) -> Iterator[tuple[str, dict]]:
    """(subject, entry) for every readable line of every audit file, in a stable order."""
    for f in sorted((Path(restricted) / "audit").glob("*.jsonl")):
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
    raw: dict[str, Counter] = defaultdict(Counter)
    files: dict[str, int] = defaultdict(int)
    for subject, item in _entries(restricted):
        files[subject] += 1
        raw[subject].update((item.get("actions") or {}).items())  # codes are strings; Counter.update runs in C
    counts: dict[str, Counter] = {}
    for subject, pairs in raw.items():  # strip item indices once per distinct path, not per row
        counts[subject] = Counter()
        for (attr, code), n in pairs.items():
            counts[subject][(attribute_name(str(attr)), str(code))] += n
    return counts, dict(files)

