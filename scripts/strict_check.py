"""Snakemake adapter for rule strict_check: fail when anything was quarantined."""
from deidflow.fsutil import RESTRICTED_FILE_MODE, atomic_write_text
from deidflow.joblog import job_logging
from deidflow.mapping import read_quarantine

with job_logging(snakemake.log[0], "strict check"):
    bad = read_quarantine(snakemake.input[0])
    if bad:
        raise RuntimeError(f"strict: {len(bad)} input file(s) quarantined, see {snakemake.input[0]}")
    atomic_write_text(snakemake.output[0], "no quarantined files\n", RESTRICTED_FILE_MODE)
