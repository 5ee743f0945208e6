"""Run Snakemake's command line with daemon timers (``python -m deidflow._snakemake ARGS``).

Snakemake's scheduler re-arms a non-daemon ``threading.Timer`` of one rate-limit window (1 s by
default) on every scheduling pass, and Python waits for it at exit: every run ended with an idle
second.  Making the timers daemons changes nothing else (they only wake the scheduler)."""
from __future__ import annotations

import sys
import threading


class _DaemonTimer(threading.Timer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


def main() -> None:
    threading.Timer = _DaemonTimer  # type: ignore[misc]
    from snakemake.cli import main as snakemake_main
    sys.argv[0] = "snakemake"
    snakemake_main()


if __name__ == "__main__":
    main()
