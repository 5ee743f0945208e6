# Every non-DICOM file (NIfTI-1/2, Analyze 7.5, MINC1/2, PAR/REC, MGH/MGZ, Siemens twix, BIDS JSON
# sidecars): header scrubbed, image bytes untouched, staged under sourcedata/<format>/ (published after the leak scan)
# with pseudonymous names (deidflow.formats, docs/formats.md). A unit without such files only
# writes its done marker.
FORMATS_JSON = json.dumps(config.get("formats", {}), sort_keys=True)


rule other:
    """Scrub the non-DICOM files of one job unit (a subject or a batch) into its staging tree."""
    input:
        manifest=restricted("manifests/{unit}.json"),
    output:
        done=restricted("done/other/{unit}.json"),
        quarantine=restricted("work/{unit}/other-quarantine.jsonl"),
        staged=temp(stamp("other")),
    params:
        python=PYTHON,
        settings=SETTINGS_JSON,
        formats=FORMATS_JSON,
        release=staged(),
        restricted=restricted_of,
    log:
        restricted("logs/other/{unit}.log"),
    group:
        "unit"
    threads: 1
    resources:
        mem_mb=attempt_scaled(config["resources"]["other_mem_mb"]),
        runtime=attempt_scaled(config["resources"]["other_runtime_min"]),
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs other --manifest {input.manifest:q}"
        " --release {params.release:q} --restricted {params.restricted:q} --done {output.done:q}"
        " --quarantine {output.quarantine:q} --settings {params.settings:q} --formats {params.formats:q}"
        " --log {log:q} 2>> {log:q} && touch {output.staged:q}"


register_unit_stage("other", OTHER_UNITS)
