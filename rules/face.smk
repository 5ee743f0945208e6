# Faces (docs/face.md): deface or skull-strip every head image of a unit that can show a face —
# the BIDS release with the de-identified DICOM series it came from (after the unit's convert
# job), every released DICOM series no converted image covers (after the unit's dicom job), and
# the NIfTI / Analyze / MGH volumes released by the other stage (after the unit's other job). A
# missing optional backend already failed at config validation.
FACE_JSON = json.dumps(config["face"], sort_keys=True)
# The methods some image can get; none at all (face.method and every face.by_suffix none): no face
# job is scheduled, and the report says the face stage did not run.
FACE_METHODS = {config["face"]["method"], *config["face"]["by_suffix"].values()} - {"none"}
FACE_TORCH = any(config["face"][f"{m}_backend"] in ("deepbet", "quickshear") for m in FACE_METHODS)


rule face:
    """Deface / skull-strip the head MRI of one job unit (NIfTI, Analyze, MGH and DICOM) in its staging
    tree, in place and kill-safe; QC pictures in derivatives/deidflow/qc/<subject>/face there."""
    input:
        unpack(unit_markers_of("convert", "other", "dicom")),
        manifest=restricted("manifests/{unit}.json"),
        staged=unit_stamps_of("convert", "other"),
    output:
        done=restricted("done/face/{unit}.json"),
        staged_face=temp(stamp("face")),
        quarantine=restricted("work/{unit}/face-quarantine.jsonl"),
        uids=restricted("work/face/{unit}/uids.csv"),
    params:
        python=PYTHON,
        settings=SETTINGS_JSON,
        face=FACE_JSON,
        convert_done=input_or_empty("convert"),
        other_done=input_or_empty("other"),
        dicom_root=DICOM_ROOT,
        release_root=staged(),
        restricted=restricted_of,
    log:
        restricted("logs/face/{unit}.log"),
    group:
        "unit"
    # ants registers on one thread (deterministic); only torch backends use a second core
    threads: 2 if FACE_TORCH else 1
    resources:
        mem_mb=attempt_scaled(config["resources"]["face_mem_mb"]),
        runtime=attempt_scaled(config["resources"]["face_runtime_min"]),
    conda:
        "../envs/deepbet.yaml" if FACE_TORCH else "../envs/ants.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs face --manifest {input.manifest:q}"
        " --convert-done={params.convert_done:q} --other-done={params.other_done:q}"
        " --dicom-root {params.dicom_root:q} --release-root {params.release_root:q}"
        " --restricted {params.restricted:q} --done {output.done:q} --quarantine {output.quarantine:q}"
        " --settings {params.settings:q} --face {params.face:q} --threads {threads}"
        " --log {log:q} 2>> {log:q} && touch {output.staged_face:q}"


# Units with BIDS images (when the BIDS release is on), released DICOM or non-DICOM files.
FACE_UNITS = units_of("convert", "other", *(["dicom"] if config["outputs"]["dicom"] else [])) if FACE_METHODS else []
register_unit_stage("face", FACE_UNITS)
# merged by rule mapping: files withheld, and the new SOP Instance UIDs of rewritten DICOM files
FACE_QUARANTINE = per_unit(restricted("work/{unit}/face-quarantine.jsonl"), FACE_UNITS)
FACE_UIDS = per_unit(restricted("work/face/{unit}/uids.csv"), FACE_UNITS)
