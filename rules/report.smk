# QC report (docs/qc.md): one self-contained HTML file in the release, a restricted copy that also
# shows the "before" renderings, two charts and a per-subject table (flagged for
# `snakemake --report`), and the audit consolidated into restricted/audit.parquet.
QC_DIR = release("derivatives/deidflow/qc")
QC_REPORT = os.path.join(QC_DIR, "report.html")


localrules:
    qc_report,
    audit,


rule audit:
    """restricted/audit/*.jsonl (one per subject, every stage) into restricted/audit.parquet."""
    input:
        stages=qc_rules.stage_markers(UNIT_STAGES, unit_done),
    output:
        restricted("audit.parquet"),
    params:
        python=PYTHON,
        restricted=qc_rules.constant(RESTRICTED),
    log:
        restricted("logs/audit.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs audit --restricted {params.restricted:q} --output {output:q}"
        " --log {log:q} 2>> {log:q}"


rule qc_report:
    """The HTML QC report: dataset summary, quarantine (keyed IDs and reasons), settings, versions,
    key fingerprint, per-subject actions, QC renderings and leak-scan results."""
    input:
        verify=unit_done("verify"),
        verify_dataset=VERIFY_DATASET,
        published=PUBLISH_DATASET,
        audit=restricted("audit.parquet"),
        quarantine=restricted("quarantine.tsv"),
    output:
        html=report(QC_REPORT, caption="../report/qc_report.rst", category="QC", labels={"item": "QC report"}),
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
        full=restricted("qc/report-full.html"),
    params:
        python=PYTHON,
        release=qc_rules.constant(OUT),
        restricted=qc_rules.constant(RESTRICTED),
    log:
        restricted("logs/qc_report.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/core.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs qc_report --release {params.release:q}"
        " --restricted {params.restricted:q} --output {output.html:q} --charts {output.modalities:q},{output.actions:q}"
        " --table {output.table:q} --full {output.full:q} --log {log:q} 2>> {log:q}"


QC_TARGETS.extend([QC_REPORT, restricted("audit.parquet")])
EXTRA_TARGETS.extend([QC_REPORT, restricted("audit.parquet")])
