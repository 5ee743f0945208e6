"""Plain-text tables for the benchmarks' output."""
from __future__ import annotations


def table(title: str, rows: list[tuple]) -> None:
    """Print ``rows`` (the first is the header) as aligned columns under ``title``."""
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
