"""Snakemake adapter for rule run_record: write restricted/run.json."""
from deidflow.fsutil import RESTRICTED_FILE_MODE, atomic_write_text
from deidflow.joblog import job_logging

with job_logging(snakemake.log[0], "run record"):
    atomic_write_text(snakemake.output[0], snakemake.params.record + "\n", RESTRICTED_FILE_MODE)
