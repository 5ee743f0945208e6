"""Jobs: which subjects one Snakemake job handles.

A subject is never split.  A subject with at least ``files_per_job`` files is a job of its own
(its wildcard is its pseudonym); smaller subjects are packed into batches so that the ~0.3 s a
job costs to start (Python plus pydicom imports) does not dominate datasets of small subjects.
A small subject's batch is chosen by a hash of its pseudonym modulo a power of two, so adding
subjects later changes only the batches they fall into (their other members are re-written with
identical bytes) until the dataset doubles and the number of batches changes.
``files_per_job: 0`` gives one job per subject.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Mapping


def plan_units(files_per_subject: Mapping[str, int], files_per_job: int,
               min_batches: int = 1) -> dict[str, list[str]]:
    """Unit label (``sub-…`` or ``batch-<B>n<i>``) → its subjects, sorted.

    Small subjects go into at least ``min_batches`` batches (rounded up to a power of two) so
    that a dataset of many small subjects still runs in parallel."""
    if files_per_job <= 0:
        return {s: [s] for s in sorted(files_per_subject)}
    units: dict[str, list[str]] = {}
    small = {s: n for s, n in files_per_subject.items() if n < files_per_job}
    for s in sorted(set(files_per_subject) - set(small)):
        units[s] = [s]
    if small:
        need = max(-(-sum(small.values()) // files_per_job), min_batches, 1)
        buckets = 1 << max(0, (need - 1).bit_length())
        packed: dict[str, list[str]] = defaultdict(list)
        for s in sorted(small):
            i = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") % buckets
            packed[f"batch-{buckets}n{i}"].append(s)
        units.update(packed)
    return dict(sorted(units.items()))
