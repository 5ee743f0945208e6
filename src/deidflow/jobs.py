"""Entry points of the workflow's jobs: ``python -m deidflow.jobs <stage> ...``.

Rules call these through ``shell:`` rather than ``script:``: a ``script:`` job costs about 0.2 s
of Snakemake preamble on top of Python's start, which for per-subject jobs of a few hundred
files was a third of the run.  Arguments carry paths and non-secret settings only (the key comes
from the environment or the key file), so nothing identifying shows in the process list.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .joblog import job_logging


def _dicom(a: argparse.Namespace) -> None:
    from .release import deidentify_unit
    with job_logging(a.log, f"dicom job {Path(a.manifest).stem}") as log:
        counts = deidentify_unit(manifest=a.manifest, release_root=a.release_root, restricted=a.restricted,
                                 done=a.done, uids=a.uids, quarantine=a.quarantine,
                                 settings=json.loads(a.settings))
        log.info("%(subjects)d subjects: released %(files)d files, quarantined %(quarantined)d", counts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deidflow.jobs")
    sub = p.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("dicom", help="de-identify the DICOM of one job unit (subject or batch)")
    for name in ("manifest", "release-root", "restricted", "done", "uids", "quarantine", "settings", "log"):
        d.add_argument(f"--{name}", required=True)
    d.set_defaults(func=_dicom)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
