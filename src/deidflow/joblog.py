"""Logging for workflow jobs: details go to the job's log in the restricted folder; what escapes
to Snakemake (and so to the terminal and .snakemake/) is a generic one-line message."""
from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path

from .errors import public_reason
from .fsutil import RESTRICTED_FILE_MODE, make_restricted_dir


@contextlib.contextmanager
def job_logging(log_path: str | Path, what: str):
    """Route logging to ``log_path``; turn any exception into ``SystemExit`` naming only ``what``."""
    log_path = Path(log_path)
    make_restricted_dir(log_path.parent)
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log_path.chmod(RESTRICTED_FILE_MODE)
    try:
        yield logging.getLogger("deidflow")
    except Exception as exc:
        logging.getLogger("deidflow").error("job failed:\n%s", traceback.format_exc())
        handler.flush()
        public = public_reason(exc)  # other messages may hold identifying values
        reason = f": {public}" if public else ""
        print(f"deidflow: {what} failed{reason}; details in {log_path}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        root.removeHandler(handler)
        handler.close()
