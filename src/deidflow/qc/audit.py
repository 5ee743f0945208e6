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


def records(restricted: Path) -> Iterator[dict]:
    """Every (file, attribute, action) of every audit file, in a stable order."""
    for f in sorted((Path(restricted) / "audit").glob("*.jsonl")):
        subject = f.stem
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            for attr, code in sorted((item.get("actions") or {}).items()):
                yield {"subject": subject, "stage": str(item.get("stage", "dicom")), "file": str(item.get("file", "")),
                       "source": str(item.get("source", "")), "attribute": str(attr), "action": str(code)}


def consolidate(restricted: Path, output: Path) -> int:
    """Write ``audit.parquet`` (restricted, mode 0600, atomically); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    cols: dict[str, list[str]] = {c: [] for c in COLUMNS}
    n = 0
    for r in records(restricted):
        for c in COLUMNS:
            cols[c].append(r[c])
        n += 1
    table = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
    output = Path(output)
    make_restricted_dir(output.parent)
    tmp = output.with_name(f".tmp-{output.name}")
    pq.write_table(table, tmp, compression="zstd")
    tmp.chmod(RESTRICTED_FILE_MODE)
    tmp.replace(output)
    return n


def attribute_name(path: str) -> str:
    """An audit attribute path without item indices (``Seq[0].Attr`` -> ``Seq.Attr``)."""
    return _INDEX.sub("", path)


def action_counts(restricted: Path) -> dict[str, Counter]:
    """subject -> Counter of (attribute without item indices, action code)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records(restricted):
        out[r["subject"]][(attribute_name(r["attribute"]), r["action"])] += 1
    return dict(out)


def files_per_subject(restricted: Path) -> dict[str, int]:
    """subject -> number of released files recorded in the audit."""
    out: dict[str, int] = {}
    for f in sorted((Path(restricted) / "audit").glob("*.jsonl")):
        out[f.stem] = sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return out
