"""What ``deidflow run`` shows while Snakemake works: one line per stage, Snakemake's own log in
the restricted folder.

Snakemake runs in the ``deidflow`` process (see :mod:`deidflow._snakemake`); its log records carry
structured events (run statistics, job scheduled, job finished, job failed), which
:class:`StageProgress` turns into per-stage counts: job units and input files done, elapsed time
and an estimate of the time left.  On a terminal the line of the running stages is redrawn in
place; otherwise each stage prints one line when it ends.  Everything Snakemake and its local
jobs print goes to ``<restricted>/logs/snakemake-<time>.log`` (:func:`quiet_terminal`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

# What each rule does, in words (rules not listed are shown by name).
STAGE_NAMES = {
    "dicom": "DICOM de-identification", "other": "other formats", "convert": "BIDS conversion",
    "bids_dataset": "BIDS dataset files", "face": "defacing", "mapping": "mappings",
    "verify": "leak scan", "verify_dataset": "leak scan (dataset files) and QC report", "audit": "audit table",
    "publish_dataset": "publish (dataset files, QC report)", "strict_check": "strict check",
}
_UNIT_OF = re.compile(r"/done/(\w+)/((?:sub|batch)-[A-Za-z0-9]+)\.json$")


def unit_files(restricted: Path) -> dict[str, tuple[int, int]]:
    """{job unit: (DICOM files, other files)} from the unit manifests the inventory wrote."""
    out = {}
    for m in sorted((Path(restricted) / "manifests").glob("*.json")):
        try:
            doc = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        files = [f for s in doc.get("subjects", ()) for f in s.get("files", ())]
        n_dicom = sum(f.get("format", "dicom") == "dicom" for f in files)
        out[doc.get("unit", m.stem)] = (n_dicom, len(files) - n_dicom)
    return out


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _Stage:
    def __init__(self, rule: str, total: int):
        self.rule, self.total = rule, total
        self.done = self.failed = self.seen = 0
        self.files_done = self.files_total = 0
        self.started: float | None = None
        self.ended: float | None = None

    def line(self, now: float) -> str:
        name = STAGE_NAMES.get(self.rule, self.rule)
        text = f"{name}: {self.done}/{self.total} {'job' if self.total == 1 else 'jobs'}"
        if self.files_total:  # the total is known once every job of the stage was scheduled
            total = f"/{self.files_total}" if self.seen >= self.total else ""
            text += f", {self.files_done}{total} files"
        if self.failed:
            text += f", {self.failed} FAILED"
        if self.started is not None:
            end = self.ended or now
            text += f", {_clock(end - self.started)}"
            if self.ended is None and 0 < self.done < self.total:
                rate = (now - self.started) / self.done
                text += f", about {_clock(rate * (self.total - self.done))} left"
        return text


class StageProgress(logging.Handler):
    """A logging handler on Snakemake's logger that keeps per-stage counts and draws them."""

    def __init__(self, stream: IO[str], restricted: Path, *, tty: bool):
        super().__init__(level=logging.DEBUG)
        self.stream, self.restricted, self.tty = stream, Path(restricted), tty
        self.stages: dict[str, _Stage] = {}
        self.jobs: dict[int, tuple[str, int]] = {}  # jobid -> (rule, input files)
        self.failed_rules: list[str] = []
        self.nothing_to_do = False  # Snakemake found every target up to date
        self._files: dict[str, tuple[int, int]] | None = None
        self._lock = threading.Lock()
        self._drawn = False

    # -- events -----------------------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        event = str(getattr(record, "event", "") or "")
        try:
            with self._lock:
                if event == "run_info":
                    self._run_info(getattr(record, "stats", {}) or {})
                elif event == "job_info":
                    self._job_info(record)
                elif event == "job_finished":
                    self._job_end(getattr(record, "job_id", None), failed=False)
                elif event == "job_error":
                    self._job_end(getattr(record, "jobid", None), failed=True)
                elif not event and str(record.msg).startswith("Nothing to be done"):
                    self.nothing_to_do = True
        except Exception:  # the display must never break the run
            pass

    def _run_info(self, stats: dict) -> None:
        for rule, count in stats.items():
            if rule not in ("total", "all") and isinstance(count, int):
                self.stages.setdefault(rule, _Stage(rule, 0)).total = count

    def _job_info(self, record: logging.LogRecord) -> None:
        rule = getattr(record, "rule_name", "")
        if rule == "all" or not rule:
            return
        stage = self.stages.setdefault(rule, _Stage(rule, 0))
        stage.total = max(stage.total, 1)
        if stage.started is None:
            stage.started = time.monotonic()
        files = self._files_of(rule, getattr(record, "output", None) or [])
        jobid = getattr(record, "jobid", -1)
        if jobid not in self.jobs:
            stage.seen += 1
            stage.files_total += files
        self.jobs[jobid] = (rule, files)
        self._draw()

    def _files_of(self, rule: str, outputs) -> int:
        """Input files of a per-unit job (its unit's files of the kind the stage reads)."""
        m = next((m for o in ([outputs] if isinstance(outputs, str) else outputs)
                  if (m := _UNIT_OF.search(str(o)))), None)
        if not m or rule not in ("dicom", "other", "convert", "face", "verify"):
            return 0
        if self._files is None:
            self._files = unit_files(self.restricted)
        n_dicom, n_other = self._files.get(m.group(2), (0, 0))
        return {"dicom": n_dicom, "other": n_other}.get(rule, n_dicom + n_other)

    def _job_end(self, jobid, *, failed: bool) -> None:
        if jobid not in self.jobs:
            return
        rule, files = self.jobs.pop(jobid)
        stage = self.stages[rule]
        if failed:
            stage.failed += 1
            self.failed_rules.append(rule)
        else:
            stage.done += 1
            stage.files_done += files
        if stage.done + stage.failed >= stage.total:
            stage.ended = time.monotonic()
            self._draw(final=stage)
        else:
            self._draw()

    # -- drawing ----------------------------------------------------------------------------
    def _draw(self, final: _Stage | None = None) -> None:
        now = time.monotonic()
        if not self.tty:
            if final is not None:
                self.stream.write(f"deidflow: {final.rule}: {final.line(now)}\n")
                self.stream.flush()
            return
        width = max(40, _columns() - 1)
        if final is not None:
            self.stream.write("\r\x1b[K" + f"deidflow: {final.rule}: {final.line(now)}"[:width] + "\n")
        running = [s for s in self.stages.values() if s.started is not None and s.ended is None]
        text = " | ".join(s.line(now) for s in running)
        self.stream.write("\r\x1b[K" + (f"  … {text}"[:width] if text else ""))
        self.stream.flush()
        self._drawn = bool(text)

    def close_display(self) -> None:
        """Clear the in-place line (before the summary is printed)."""
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._drawn = False


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 100


@contextlib.contextmanager
def quiet_terminal(restricted: Path, *, verbose: bool) -> Iterator[tuple[IO[str], Path | None]]:
    """Send everything written to file descriptors 1 and 2 (Snakemake's log, local jobs' output)
    to ``<restricted>/logs/snakemake-<time>.log`` while the block runs; yields a stream on the
    real terminal for the progress display, and the log's path.  ``verbose``: nothing is
    redirected (Snakemake's log shows on the terminal as it always did)."""
    if verbose:
        yield sys.stdout, None
        return
    logs = Path(restricted) / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    log = logs / time.strftime("snakemake-%Y%m%dT%H%M%S.log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    term = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield term, log
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for f in (fd, saved_out, saved_err):
            os.close(f)
        term.flush()


def attach(handler: StageProgress) -> logging.Logger:
    """Put ``handler`` on Snakemake's logger family (its records propagate to ``snakemake``)."""
    logger = logging.getLogger("snakemake")
    logger.addHandler(handler)
    return logger
