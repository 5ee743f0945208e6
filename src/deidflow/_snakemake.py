"""Run Snakemake's command line in this process, with daemon scheduler timers.

Snakemake's scheduler re-arms a non-daemon ``threading.Timer`` of one rate-limit window (1 s by
default) on every scheduling pass, and Python waits for it at exit: every run ended with an idle
second.  Making the timers daemons changes nothing else (they only wake the scheduler).  Running in
the ``deidflow run`` process also saves a second interpreter start."""
from __future__ import annotations

import stat
import sys
import threading


class _DaemonTimer(threading.Timer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


_INVOKED_AS: list[str] | None = None


def command_line() -> list[str]:
    """The command that started this run as the user typed it (``deidflow …``; the workflow
    parses with Snakemake's own ``sys.argv``), for the run record."""
    if _INVOKED_AS is not None:
        return ["deidflow", *_INVOKED_AS[1:]]
    return list(sys.argv)


def _private_metadata() -> None:
    """Snakemake gives every record it writes into ``.snakemake/metadata`` and ``incomplete`` mode
    0660 whatever the umask (``FilePersistence._io_write``'s default); in the restricted folder
    every file is the owner's alone (0600)."""
    try:
        from snakemake.persistence.file import FilePersistence
    except ImportError:  # another Snakemake layout: its records follow the umask
        return
    write = FilePersistence._io_write
    if write.__defaults__ and len(write.__defaults__) == 1:
        write.__defaults__ = (stat.S_IRUSR | stat.S_IWUSR,)


def run_snakemake(args: list[str]) -> int:
    """``snakemake ARGS``; returns its exit status."""
    global _INVOKED_AS
    threading.Timer = _DaemonTimer  # type: ignore[misc]
    _private_metadata()
    from snakemake.cli import main as snakemake_main
    argv, sys.argv = sys.argv, ["snakemake", *args]
    _INVOKED_AS = list(argv)
    try:
        snakemake_main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return 0


if __name__ == "__main__":
    sys.exit(run_snakemake(sys.argv[1:]))
