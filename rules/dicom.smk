rule dicom:
    """De-identify one subject's DICOM with the PS3.15 profile (pixel data copied byte for byte)."""
    input:
        manifest=restricted("manifests/{subject}.json"),
    output:
        release=directory(release("sourcedata/dicom/{subject}")),
        audit=restricted("audit/{subject}.jsonl"),
        uids=restricted("work/{subject}/uids.csv"),
        quarantine=restricted("work/{subject}/quarantine.tsv"),
    params:
        settings=SETTINGS,
    log:
        restricted("logs/dicom/{subject}.log"),
    threads: 1
    resources:
        mem_mb=config["resources"]["dicom_mem_mb"],
        runtime=config["resources"]["dicom_runtime_min"],
    conda:
        "../envs/core.yaml"
    script:
        "../scripts/dicom.py"
