localrules:
    mapping,
    run_record,
    strict_check,


rule mapping:
    """Pseudonym, UID and date mappings and the quarantine list, across subjects (restricted)."""
    input:
        inventory=restricted("inventory.parquet"),
        uids=per_unit(restricted("work/{unit}/uids.csv")),
        quarantine=per_unit(restricted("work/{unit}/quarantine.tsv")),
    output:
        patients=restricted("mapping/patients.csv"),
        uids=restricted("mapping/uids.csv"),
        dates=restricted("mapping/dates.csv"),
        quarantine=restricted("quarantine.tsv"),
    log:
        restricted("logs/mapping.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        "../envs/core.yaml"
    script:
        "../scripts/mapping.py"


rule run_record:
    """restricted/run.json: versions, settings and key fingerprint (never the key)."""
    output:
        restricted("run.json"),
    params:
        record=run_record(PREPARED.paths, PREPARED.fingerprint, SETTINGS),
    log:
        restricted("logs/run_record.log"),
    threads: 1
    resources:
        mem_mb=200,
        runtime=5,
    conda:
        "../envs/core.yaml"
    script:
        "../scripts/run_record.py"


rule strict_check:
    """With strict: true, any quarantined input fails the run (the list is in quarantine.tsv)."""
    input:
        restricted("quarantine.tsv"),
    output:
        restricted("strict.ok"),
    log:
        restricted("logs/strict_check.log"),
    threads: 1
    resources:
        mem_mb=200,
        runtime=5,
    conda:
        "../envs/core.yaml"
    script:
        "../scripts/strict_check.py"
