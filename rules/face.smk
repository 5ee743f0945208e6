# Faces (docs/face.md): deface or skull-strip every head MRI image of a unit's BIDS release and
# write the same voxels back into the de-identified DICOM series it came from. Runs after the
# unit's convert job; a missing optional backend already failed at config validation.
FACE_JSON = json.dumps(config["face"], sort_keys=True)
FACE_TORCH = any(
    config["face"][f"{m}_backend"] in ("deepbet", "quickshear")
    for m in {config["face"]["method"], *config["face"]["by_suffix"].values()} - {"none"}
)


rule face:
    """Deface / skull-strip the head MRI of one job unit (NIfTI and DICOM, in place, kill-safe);
    QC pictures in derivatives/deidflow/qc/<subject>/face."""
    input:
        convert=restricted("done/convert/{unit}.json"),
    output:
        done=restricted("done/face/{unit}.json"),
        quarantine=restricted("work/{unit}/face-quarantine.jsonl"),
    params:
        python=PYTHON,
        settings=SETTINGS_JSON,
        face=FACE_JSON,
        dicom_root=DICOM_ROOT,
        release_root=release_root_of,
        restricted=restricted_of,
    log:
        restricted("logs/face/{unit}.log"),
    group:
        "unit"
    threads: 2
    resources:
        mem_mb=config["resources"].get("face_mem_mb", 3000),
        runtime=config["resources"].get("face_runtime_min", 60),
    conda:
        "../envs/deepbet.yaml" if FACE_TORCH else "../envs/ants.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs face --convert-done {input.convert:q}"
        " --dicom-root {params.dicom_root:q} --release-root {params.release_root:q}"
        " --restricted {params.restricted:q} --done {output.done:q} --quarantine {output.quarantine:q}"
        " --settings {params.settings:q} --face {params.face:q} --threads {threads}"
        " --log {log:q} 2>> {log:q}"


FACE_QUARANTINE = []  # files withheld because no converted image covers them (merged by rule mapping)
if config["outputs"].get("bids", True):
    register_unit_stage("face", DICOM_UNITS)
    FACE_QUARANTINE = per_unit(restricted("work/{unit}/face-quarantine.jsonl"), DICOM_UNITS)
