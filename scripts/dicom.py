"""Snakemake adapter for rule dicom: one subject's DICOM through deidflow.release."""
from pathlib import Path

from deidflow.joblog import job_logging
from deidflow.release import deidentify_subject

with job_logging(snakemake.log[0], f"dicom job for {snakemake.wildcards.subject}") as log:
    counts = deidentify_subject(
        manifest=snakemake.input.manifest,
        release_dir=snakemake.output.release,
        restricted=Path(snakemake.output.audit).parents[1],  # <restricted>/audit/<subject>.jsonl
        audit=snakemake.output.audit,
        uids=snakemake.output.uids,
        quarantine=snakemake.output.quarantine,
        settings=snakemake.params.settings,
    )
    log.info("released %(files)d files, quarantined %(quarantined)d", counts)
