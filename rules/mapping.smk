localrules:
    mapping,
    strict_check,


rule mapping:
    """Pseudonym, UID and date mappings and the quarantine list, across subjects (restricted)."""
    input:
        inventory=restricted("inventory.parquet"),
        uids=per_unit(restricted("work/{unit}/uids.csv")),
        quarantine=per_unit(restricted("work/{unit}/quarantine.jsonl")),
    output:
        patients=restricted("mapping/patients.csv"),
        uids=restricted("mapping/uids.csv"),
        dates=restricted("mapping/dates.csv"),
        quarantine=restricted("quarantine.tsv"),
        uids_list=temp(restricted("work/mapping-uids.list")),
        quarantine_list=temp(restricted("work/mapping-quarantine.list")),
    params:
        python=PYTHON,
    log:
        restricted("logs/mapping.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        "../envs/core.yaml"
    shell:
        "printf '%s\\n' {input.uids:q} > {output.uids_list:q}; "
        "printf '%s\\n' {input.quarantine:q} > {output.quarantine_list:q}; "
        "{params.python:q} -m deidflow.jobs mapping --inventory {input.inventory:q}"
        " --uids-list {output.uids_list:q} --quarantine-list {output.quarantine_list:q}"
        " --patients {output.patients:q} --uids {output.uids:q} --dates {output.dates:q}"
        " --quarantine {output.quarantine:q} --log {log:q} 2>> {log:q}"


rule strict_check:
    """With strict: true, any quarantined input fails the run (the list is in quarantine.tsv)."""
    input:
        restricted("quarantine.tsv"),
    output:
        restricted("strict.ok"),
    params:
        python=PYTHON,
    log:
        restricted("logs/strict_check.log"),
    threads: 1
    resources:
        mem_mb=200,
        runtime=5,
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs strict --quarantine {input:q} --output {output:q}"
        " --log {log:q} 2>> {log:q}"
