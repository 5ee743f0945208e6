# The release gate (docs/design-notes.md, deidflow.publish): a unit's subjects enter the release
# only here, one rename per subject folder, after every stage of the unit and its leak scan are
# done; then the dataset-level files and the QC report, and withdrawn subjects leave the release. The
# RELEASE_INCOMPLETE marker lies at the release root from the first job of a run until the run
# succeeds (onstart / onsuccess in the Snakefile).
PUBLISH_DATASET = restricted("done/publish_dataset.json")


localrules:
    publish_dataset,


rule publish:
    """Move the verified subjects of one job unit from its staging tree into the release
    (verify.on_leak: withhold a subject with leak-scan hits, fail, or publish with a warning)."""
    input:
        verify=restricted("done/verify/{unit}.json"),
        staged=lambda wildcards: unit_stamps_of(*UNIT_STAGES)(wildcards),
        manifest=restricted("manifests/{unit}.json"),
    output:
        done=restricted("done/publish/{unit}.json"),
        quarantine=restricted("work/{unit}/publish-quarantine.jsonl"),
    params:
        python=PYTHON,
        staging=staged(),
        release=release_root_of,
        restricted=restricted_of,
        on_leak=ON_LEAK,
    log:
        restricted("logs/publish/{unit}.log"),
    group:
        "unit"
    threads: 1
    resources:
        mem_mb=attempt_scaled(config["resources"]["publish_mem_mb"]),
        runtime=attempt_scaled(config["resources"]["publish_runtime_min"]),
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs publish --manifest {input.manifest:q} --verify {input.verify:q}"
        " --staging {params.staging:q} --release {params.release:q} --restricted {params.restricted:q}"
        " --done {output.done:q} --quarantine {output.quarantine:q} --on-leak {params.on_leak}"
        " --log {log:q} 2>> {log:q}"


rule publish_dataset:
    """Take withdrawn subjects out of the release (restricted/withdrawn.tsv), move the verified
    dataset-level files in (a leak-scan hit keeps them staged, unless verify.on_leak is publish),
    then copy in the QC report verify_dataset checked."""
    input:
        units=unit_done("publish"),
        verify=VERIFY_DATASET,
        report=expand(os.path.join(REPORT_STAGED, "{name}"), name=REPORT_FILES),
        subjects=restricted("work/subjects.txt"),
    output:
        done=PUBLISH_DATASET,
        html=report(os.path.join(QC_DIR, "report.html"), caption="../report/qc_report.rst", category="QC",
                    labels={"item": "QC report"}),
        modalities=report(
            os.path.join(QC_DIR, "files_per_modality.svg"),
            caption="../report/files_per_modality.rst",
            category="QC",
            labels={"item": "files per modality"},
        ),
        actions=report(
            os.path.join(QC_DIR, "actions_per_attribute.svg"),
            caption="../report/actions_per_attribute.rst",
            category="QC",
            labels={"item": "actions per attribute"},
        ),
        table=report(
            os.path.join(QC_DIR, "subjects.tsv"),
            caption="../report/subjects.rst",
            category="QC",
            labels={"item": "subjects"},
        ),
    params:
        python=PYTHON,
        staged=qc_rules.constant(DATASET_STAGED),
        report_dir=qc_rules.constant(REPORT_STAGED),
        release=release_root_of,
        restricted=qc_rules.constant(RESTRICTED),
        on_leak=ON_LEAK,
    log:
        restricted("logs/publish_dataset.log"),
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs publish_dataset --staged {params.staged:q}"
        " --report-dir {params.report_dir:q} --release {params.release:q} --restricted {params.restricted:q}"
        " --subjects {input.subjects:q} --verify {input.verify:q} --on-leak {params.on_leak} --done {output.done:q}"
        " --log {log:q} 2>> {log:q}"


EXTRA_TARGETS.extend([PUBLISH_DATASET, os.path.join(QC_DIR, "report.html")])
