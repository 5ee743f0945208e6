localrules:
    mapping,
    strict_check,


rule mapping:
    """UID mapping and quarantine list across subjects (restricted). patients.csv, dates.csv and
    the inventory's own quarantine lines are written at parse time (deidflow.pipeline.prepare).
    The face stage's maps (released UID -> UID of the defaced image) are chained onto the dicom
    stage's, so uids.csv maps each original UID to the one in the release."""
    input:
        uids=per_unit(restricted("work/{unit}/uids.csv"), DICOM_UNITS) + FACE_UIDS,
        quarantine=[restricted("work/inventory-quarantine.jsonl")]
        + per_unit(restricted("work/{unit}/quarantine.jsonl"), DICOM_UNITS)
        + per_unit(restricted("work/{unit}/other-quarantine.jsonl"), OTHER_UNITS)
        + FACE_QUARANTINE
        + per_unit(restricted("work/{unit}/publish-quarantine.jsonl")),
    output:
        uids=restricted("mapping/uids.csv"),
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
        "{params.python:q} -m deidflow.jobs mapping"
        " --uids-list {output.uids_list:q} --quarantine-list {output.quarantine_list:q}"
        " --uids {output.uids:q} --quarantine {output.quarantine:q} --log {log:q} 2>> {log:q}"


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
