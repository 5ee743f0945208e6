"""Entry points of the workflow's jobs: ``python -m deidflow.jobs <stage> ...``.

Rules call these through ``shell:`` rather than ``script:``: a ``script:`` job costs about 0.2 s
of Snakemake preamble on top of Python's start, which for per-subject jobs of a few hundred
files was a third of the run.  Arguments carry paths and non-secret settings only (the key comes
from the environment or the key file), so nothing identifying shows in the process list.
Each stage is a thin adapter: parse arguments, route logging to the job's restricted log, call
the library.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PublicError
from .joblog import job_logging


def _dicom(a: argparse.Namespace) -> None:
    from .release import deidentify_unit
    with job_logging(a.log, f"dicom job {Path(a.manifest).stem}") as log:
        counts = deidentify_unit(manifest=a.manifest, release_root=a.release_root, restricted=a.restricted,
                                 done=a.done, uids=a.uids, quarantine=a.quarantine,
                                 settings=json.loads(a.settings), work_root=a.work_root or None)
        log.info("%(subjects)d subjects: released %(files)d files, quarantined %(quarantined)d", counts)


def _mapping(a: argparse.Namespace) -> None:
    from .mapping import merge_job_outputs
    with job_logging(a.log, "mapping job") as log:
        counts = merge_job_outputs(uid_files=_listed(a.uids_list), quarantine_files=_listed(a.quarantine_list),
                                   uids=a.uids, quarantine=a.quarantine)
        log.info("uids %(uids)d, quarantined %(quarantined)d", counts)


def _strict(a: argparse.Namespace) -> None:
    from .fsutil import RESTRICTED_FILE_MODE, atomic_write_text
    from .mapping import read_quarantine
    with job_logging(a.log, "strict check"):
        bad = read_quarantine(a.quarantine)
        if bad:
            raise PublicError(f"strict: {len(bad)} input file(s) quarantined, listed in {a.quarantine}")
        atomic_write_text(a.output, "no quarantined files\n", RESTRICTED_FILE_MODE)


def _convert(a: argparse.Namespace) -> None:
    from .bids.convert import convert_unit
    with job_logging(a.log, f"convert job {Path(a.manifest).stem}") as log:
        counts = convert_unit(manifest=a.manifest, dicom_root=a.dicom_root, work_root=a.work_root,
                              release_root=a.release_root,
                              restricted=a.restricted, done=a.done, settings=json.loads(a.settings),
                              bids=json.loads(a.bids))
        log.info("%(subjects)d subjects: %(images)d BIDS images, %(unsorted)d unsorted, "
                 "%(not_converted)d series not converted", counts)


def _face(a: argparse.Namespace) -> None:
    face_cfg = json.loads(a.face)
    os.environ.setdefault("DEIDFLOW_FACE_THREADS", a.threads)
    os.environ["DEIDFLOW_FACE_GPU"] = "1" if face_cfg.get("device") == "auto" else "0"
    from .face.stage import face_unit
    with job_logging(a.log, f"face job {Path(a.done).stem}") as log:  # '' = the unit has no such stage
        counts = face_unit(convert_done=a.convert_done or None, dicom_root=a.dicom_root, release_root=a.release_root,
                           restricted=a.restricted, done=a.done, quarantine=a.quarantine,
                           settings=json.loads(a.settings), face_cfg=face_cfg,
                           other_done=a.other_done or None, manifest=a.manifest)
        log.info("%(images)d images: %(treated)d defaced or skull-stripped, %(dicom_files)d DICOM files "
                 "rewritten, %(references)d with references updated, %(withheld)d withheld", counts)


def _bids_dataset(a: argparse.Namespace) -> None:
    from .bids.dataset import write_dataset
    with job_logging(a.log, "BIDS dataset files") as log:
        done_files = _published_only(_listed(a.done_list), _listed(a.published_list), Path(a.output).parent)
        counts = write_dataset(done_files=done_files, release_root=a.release_root, marker=a.output,
                               settings=json.loads(a.settings), bids=json.loads(a.bids))
        log.info("%(files)d dataset files, %(changed)d rewritten", counts)


def _published_only(done_files: list[str], published: list[str], restricted_done: Path) -> list[str]:
    """The convert markers without the subjects the publish jobs withheld (participants.tsv lists
    only subjects that are in the release); markers with such subjects are rewritten into
    ``work/bids-dataset/``."""
    from .fsutil import RESTRICTED_FILE_MODE, atomic_write_text
    withheld = set()
    for p in published:
        withheld |= set(json.loads(Path(p).read_text())["withheld"])
    if not withheld:
        return done_files
    out = []
    work = restricted_done.parent / "work" / "bids-dataset"
    for f in done_files:
        marker = json.loads(Path(f).read_text())
        kept = [s for s in marker["subjects"] if s["subject"] not in withheld]
        if len(kept) == len(marker["subjects"]):
            out.append(f)
            continue
        target = work / Path(f).name
        atomic_write_text(target, json.dumps({**marker, "subjects": kept}), RESTRICTED_FILE_MODE)
        out.append(str(target))
    return out


def _publish(a: argparse.Namespace) -> None:
    from .publish import publish_unit
    with job_logging(a.log, f"publish job {Path(a.manifest).stem}") as log:
        c = publish_unit(a.manifest, a.verify, a.staging, a.release, a.restricted, a.done, a.quarantine,
                         on_leak=a.on_leak)
        for line in c["lines"]:
            log.warning(line)
        if c["leaky_published"]:
            log.warning("verify.on_leak is 'publish': %d subject(s) with leak-scan hits PUBLISHED",
                        c["leaky_published"])
        log.info("%(published)d subjects published, %(withheld)d withheld", c)


def _publish_dataset(a: argparse.Namespace) -> None:
    from .publish import publish_dataset
    with job_logging(a.log, "publish_dataset job") as log:
        c = publish_dataset(a.staged, a.release, a.restricted, a.subjects, a.done, verify=a.verify,
                            report_dir=a.report_dir, on_leak=a.on_leak)
        if c["withheld"]:
            log.warning("%(withheld)d dataset-level file(s) withheld: the leak scan found identifying values in "
                        "them (restricted/done/verify_dataset.json)", c)
        log.info("%(files)d dataset-level files and the QC report published, %(withdrawn)d withdrawn subject(s) "
                 "removed", c)


def _other(a: argparse.Namespace) -> None:
    from .formats.stage import release_unit
    with job_logging(a.log, f"other job {Path(a.manifest).stem}") as log:
        counts = release_unit(manifest=a.manifest, release=a.release, restricted=a.restricted, done=a.done,
                              quarantine=a.quarantine, settings=json.loads(a.settings),
                              formats_config=json.loads(a.formats))
        log.info("%(subjects)d subjects with non-DICOM files: released %(files)d files, quarantined %(quarantined)d",
                 counts)


def _verify(a: argparse.Namespace) -> None:
    from .qc.leakscan import verify_unit
    with job_logging(a.log, f"verify job {Path(a.manifest).stem}") as log:
        c = verify_unit(a.manifest, a.release, a.restricted, a.done, strict=a.strict == "true",
                        pixel_data=a.pixel_data == "true")
        for line in c["lines"]:
            log.warning(line)
        log.info("%(subjects)d subjects, %(files)d files: %(hits)d leak-scan hits", c)


def _verify_dataset(a: argparse.Namespace) -> None:
    """The dataset gate: one matcher for every subject's values scans the staged dataset-level
    files, then checks the QC report (rendered with the scan's result) before it is staged."""
    import time
    from .fsutil import RESTRICTED_FILE_MODE
    from .publish import REPORT_FILES, late_leaks, write_withheld
    from .qc.leakscan import dataset_matcher, verify_dataset, write_dataset_record
    from .qc.report import write_report
    with job_logging(a.log, "verify_dataset job") as log:
        t = time.perf_counter()
        matcher = dataset_matcher(a.restricted)
        log.info("one matcher, %d forms of every subject's values, in %.2f s", len(matcher), time.perf_counter() - t)
        units = [Path(p).stem for p in _listed(a.units_list)]
        result = verify_dataset(a.staged, a.restricted, strict=a.on_leak == "fail", pixel_data=a.pixel_data == "true",
                                matcher=matcher, published=Path(a.release), units=units)
        for line in result["lines"]:
            log.warning(line)
        log.info("%d dataset-level files: %d leak-scan hits; %d subject(s) published earlier hold the values of "
                 "subjects added since", result["files"], len(result["lines"]), len(result["late"]))
        # the report's record of the release gate
        write_withheld(a.restricted, _listed(a.units_list), late_leaks(result, a.on_leak))
        t = time.perf_counter()
        page, modalities, actions, table = (Path(a.report_dir) / name for name in REPORT_FILES)
        write_report(a.release, a.restricted, page, f"{modalities},{actions}", table, a.full,
                     staged=a.staged, matcher=matcher, dataset_verify={k: v for k, v in result.items() if k != "lines"},
                     on_leak=a.on_leak, mode=RESTRICTED_FILE_MODE)
        log.info("QC report rendered, checked and staged in %.2f s", time.perf_counter() - t)
        write_dataset_record(a.output, result)


def _audit(a: argparse.Namespace) -> None:
    from .qc.audit import consolidate
    with job_logging(a.log, "audit job") as log:
        log.info("%d audit rows", consolidate(a.restricted, a.output))


def _listed(path: str) -> list[str]:
    """Paths listed one per line in ``path`` (keeps long lists off the command line)."""
    return [line for line in Path(path).read_text().splitlines() if line]


STAGES = {
    "dicom": (_dicom, ("manifest", "release-root", "work-root", "restricted", "done", "uids", "quarantine",
                       "settings"),
              "de-identify the DICOM of one job unit (subject or batch)"),
    "mapping": (_mapping, ("uids-list", "quarantine-list", "uids", "quarantine"),
                "merge the jobs' UID maps and quarantine lists (restricted)"),
    "strict": (_strict, ("quarantine", "output"), "fail when anything was quarantined"),
    "verify": (_verify, ("manifest", "release", "restricted", "done", "strict", "pixel-data"),
               "leak-scan the release files of one job unit"),
    "verify_dataset": (_verify_dataset, ("staged", "release", "restricted", "units-list", "report-dir", "full", "output",
                                         "on-leak", "pixel-data"),
                       "leak-scan the staged dataset-level files and stage the checked QC report"),
    "audit": (_audit, ("restricted", "output"), "restricted/audit/*.jsonl into restricted/audit.parquet"),
    "other": (_other, ("manifest", "release", "restricted", "done", "quarantine", "settings", "formats"),
              "de-identify the non-DICOM files of one job unit (NIfTI, Analyze, MINC, PAR/REC, MGH, twix, JSON)"),
    "convert": (_convert, ("manifest", "dicom-root", "work-root", "release-root", "restricted", "done", "settings",
                           "bids"),
                "BIDS NIfTI of one job unit from its de-identified DICOM (dcm2niix)"),
    "face": (_face, ("manifest", "convert-done", "other-done", "dicom-root", "release-root", "restricted", "done",
                     "quarantine", "settings", "face", "threads"),
             "deface or skull-strip the head MRI of one job unit (NIfTI, Analyze, MGH and DICOM)"),
    "publish": (_publish, ("manifest", "verify", "staging", "release", "restricted", "done", "quarantine", "on-leak"),
                "move the verified subjects of one job unit from its staging tree into the release"),
    "publish_dataset": (_publish_dataset, ("staged", "report-dir", "release", "restricted", "subjects", "verify",
                                           "on-leak", "done"),
                        "remove withdrawn subjects, publish the verified dataset-level files and the QC report"),
    "bids_dataset": (_bids_dataset, ("done-list", "published-list", "release-root", "settings", "bids", "output"),
                     "dataset_description.json, participants.tsv/json, README, CHANGES, .bidsignore"),
}


# pydicom imports `requests` (0.1 s of every job's start) only to offer downloads of its test
# files, and no job goes to the network (the face backends load ANTs' library without the antspyx
# package, which imports it; deepbet does not).
ZYGOTE_ENV = "DEIDFLOW_ZYGOTE"  # deidflow.zygote.ENV, without importing it


def main(argv: list[str] | None = None) -> int:
    """Run one job: in a child of the fork server when ``deidflow run`` started one (see
    :mod:`deidflow.zygote`), else in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(ZYGOTE_ENV) and argv:
        from .zygote import run_remote
        rc = run_remote(argv)
        if rc is not None:
            return rc
    return run(argv)


def run(argv: list[str]) -> int:
    """Parse the stage and its arguments and run it in this process."""
    from .fsutil import restricted_umask, use_job_tmp
    restricted_umask()  # 0600/0700 whatever the user's umask; the release gate sets 0644/0755
    p = argparse.ArgumentParser(prog="python -m deidflow.jobs")
    sub = p.add_subparsers(dest="stage", required=True)
    for name, (func, args, helptext) in STAGES.items():
        sp = sub.add_parser(name, help=helptext)
        for arg in (*args, "log"):
            sp.add_argument(f"--{arg}", required=True)
        sp.set_defaults(func=func)
    args = p.parse_args(argv)
    if getattr(args, "restricted", None):
        use_job_tmp(Path(args.restricted))  # temporary files inside the restricted folder, not /tmp
    if os.environ.get("DEIDFLOW_TEST_PAUSE_AT"):  # test hook only (deidflow.publish.PAUSE_ENV)
        from .publish import test_pause
        test_pause(args.stage)
    sys.modules.setdefault("requests", None)  # type: ignore[assignment]
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
