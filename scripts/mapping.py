"""Snakemake adapter for rule mapping: restricted mappings and the quarantine list."""
from deidflow.joblog import job_logging
from deidflow.mapping import write_mappings

with job_logging(snakemake.log[0], "mapping job") as log:
    counts = write_mappings(
        inventory=snakemake.input.inventory,
        uid_files=snakemake.input.uids,
        quarantine_files=snakemake.input.quarantine,
        patients=snakemake.output.patients,
        uids=snakemake.output.uids,
        dates=snakemake.output.dates,
        quarantine=snakemake.output.quarantine,
    )
    log.info("patients %(patients)d, uids %(uids)d, quarantined %(quarantined)d", counts)
