# QC report (docs/qc.md): one self-contained HTML file in the release, a restricted copy that also
# shows the "before" renderings, two charts and a per-subject table; verify_dataset (rules/verify.smk)
# checks and stages them, publish_dataset (rules/publish.smk) copies them in, flagged for
# `snakemake --report`. Here: the audit consolidated into restricted/audit.parquet.
QC_REPORT = os.path.join(QC_DIR, "report.html")


localrules:
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


QC_TARGETS.extend([QC_REPORT, restricted("audit.parquet")])
EXTRA_TARGETS.append(restricted("audit.parquet"))
