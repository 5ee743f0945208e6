# The de-identified DICOM goes to the unit's staging tree (published after the leak scan); with
# outputs.dicom false to a work area inside the restricted folder (still converted to BIDS), never
# to the release.
DICOM_ROOT = staged("sourcedata/dicom") if config["outputs"]["dicom"] else restricted("work/dicom")
# With outputs.bids the dicom job also writes the restricted conversion working copy (vendor private
# elements dcm2niix needs, deidflow.bids.workcopy); the convert job reads it, never the release.
BIDS_WORK_ROOT = restricted("work/bids-dicom") if config["outputs"].get("bids", True) else ""


rule dicom:
    """De-identify the DICOM of one job unit: a subject, or a batch of small subjects
    (see deidflow.batching), into its staging tree. Pixel data are copied byte for byte unless the
    pixel step cleans burned-in text; each subject's staged folder appears in one rename."""
    input:
        manifest=restricted("manifests/{unit}.json"),
    output:
        done=restricted("done/dicom/{unit}.json"),
        uids=restricted("work/{unit}/uids.csv"),
        quarantine=restricted("work/{unit}/quarantine.jsonl"),
        staged=temp(stamp("dicom")),
    params:
        python=PYTHON,
        settings=SETTINGS_JSON,
        release_root=DICOM_ROOT,
        work_root=BIDS_WORK_ROOT,
        restricted=restricted_of,
    log:
        restricted("logs/dicom/{unit}.log"),
    group:
        "unit"
    threads: 1
    resources:
        mem_mb=attempt_scaled(config["resources"]["dicom_mem_mb"]),
        runtime=attempt_scaled(config["resources"]["dicom_runtime_min"]),
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs dicom --manifest {input.manifest:q}"
        " --release-root {params.release_root:q} --work-root={params.work_root:q} --restricted {params.restricted:q}"
        " --done {output.done:q} --uids {output.uids:q} --quarantine {output.quarantine:q}"
        " --settings {params.settings:q} --log {log:q} 2>> {log:q} && touch {output.staged:q}"


register_unit_stage("dicom", DICOM_UNITS)
