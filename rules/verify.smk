# Leak scan (docs/qc.md): each job unit's staged files are searched for the original identifying
# values of its subjects once every other per-unit stage is done; the unit's publish job (rules/
# publish.smk) acts on the result (verify.on_leak). Then the staged dataset-level files and the QC
# report, with one matcher (verify_dataset), before publish_dataset moves them in.
# verify is not a registered unit stage (it would wait for itself): its markers are extra targets.
import deidflow.qc.rules as qc_rules

ON_LEAK = on_leak_of(config)  # withhold | fail | publish (strict: true means fail)
VERIFY_STRICT = "true" if ON_LEAK == "fail" else "false"
VERIFY_PIXEL_DATA = "true" if config.get("verify", {}).get("pixel_data", False) else "false"
VERIFY_DATASET = restricted("done/verify_dataset.json")
QC_TARGETS = []


localrules:
    verify_dataset,


rule verify:
    """Leak scan of one job unit: every staged file of its subjects (names, bytes, gunzipped
    content, DICOM elements at any depth, NIfTI extensions, JSON) against their original values."""
    input:
        stages=stages_done_of_unit,
        staged=lambda wildcards: unit_stamps_of(*UNIT_STAGES)(wildcards),
        manifest=restricted("manifests/{unit}.json"),
    output:
        done=restricted("done/verify/{unit}.json"),
    params:
        python=PYTHON,
        release=staged(),
        restricted=restricted_of,
        strict=VERIFY_STRICT,
        pixel_data=VERIFY_PIXEL_DATA,
    log:
        restricted("logs/verify/{unit}.log"),
    group:
        "unit"
    threads: 1
    resources:
        mem_mb=attempt_scaled(config["resources"]["verify_mem_mb"]),
        runtime=attempt_scaled(config["resources"]["verify_runtime_min"]),
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs verify --manifest {input.manifest:q} --release {params.release:q}"
        " --restricted {params.restricted:q} --done {output.done:q} --strict {params.strict}"
        " --pixel-data {params.pixel_data} --log {log:q} 2>> {log:q}"


rule verify_dataset:
    """The dataset gate: once every unit is published, ONE matcher for every subject's values
    scans the staged dataset-level files, then checks the QC report (which shows the result)
    before staging it for publish_dataset; the restricted copy of the report goes beside."""
    input:
        units=unit_done("verify"),
        published=unit_done("publish"),
        aggregates=qc_rules.targets_except(DATASET_TARGETS, []),
        quarantine=restricted("quarantine.tsv"),  # the report reads the audit's JSON lines, not audit.parquet
    output:
        done=VERIFY_DATASET,
        report=expand(os.path.join(REPORT_STAGED, "{name}"), name=REPORT_FILES),
        full=restricted("qc/report-full.html"),
        units_list=temp(restricted("work/verify-dataset-units.list")),
    params:
        python=PYTHON,
        staged=qc_rules.constant(DATASET_STAGED),
        report_dir=qc_rules.constant(REPORT_STAGED),
        release=release_root_of,
        restricted=qc_rules.constant(RESTRICTED),
        on_leak=ON_LEAK,
        pixel_data=VERIFY_PIXEL_DATA,
    log:
        restricted("logs/verify_dataset.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/core.yaml"
    shell:
        "printf '%s\\n' {input.published:q} > {output.units_list:q}; "
        "mkdir -p {params.staged:q} && {params.python:q} -m deidflow.jobs verify_dataset --staged {params.staged:q}"
        " --release {params.release:q} --restricted {params.restricted:q} --units-list {output.units_list:q}"
        " --report-dir {params.report_dir:q} --full {output.full:q} --output {output.done:q}"
        " --on-leak {params.on_leak} --pixel-data {params.pixel_data} --log {log:q} 2>> {log:q}"


QC_TARGETS.extend([*unit_done("verify"), VERIFY_DATASET])
EXTRA_TARGETS.extend(QC_TARGETS)
