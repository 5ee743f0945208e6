# BIDS release (docs/bids.md): dcm2niix on the de-identified DICOM of each job unit, then the
# dataset-level files once every unit is converted. Enabled by outputs.bids.
import deidflow.qc.rules as qc_rules
from deidflow.bids.heuristic import rules_for as _bids_rules

try:
    _bids_rules(config["bids"]["mapping"])  # a bad user rule fails before any job runs
except ValueError as _exc:
    raise ValueError(f"config key {_exc}") from None

BIDS_JSON = json.dumps(
    {
        "mapping": config["bids"]["mapping"],
        "name": config["bids"]["name"],
        **{k: config["bids"].get(k) for k in ("authors", "license", "acknowledgements", "how_to_acknowledge", "funding")},
        "dicom_released": bool(config["outputs"]["dicom"]),
    },
    sort_keys=True,
)


localrules:
    bids_dataset,


rule convert:
    """NIfTI + scrubbed sidecars of one job unit, converted from its de-identified DICOM; each
    subject's staged BIDS folder (and its sourcedata/unsorted folder) appears in one rename."""
    input:
        manifest=restricted("manifests/{unit}.json"),
        dicom=restricted("done/dicom/{unit}.json"),
        dicom_staged=stamp("dicom"),
    output:
        done=restricted("done/convert/{unit}.json"),
        staged=temp(stamp("convert")),
    params:
        python=PYTHON,
        settings=SETTINGS_JSON,
        bids=BIDS_JSON,
        dicom_root=DICOM_ROOT,
        work_root=BIDS_WORK_ROOT,
        release_root=staged(),
        restricted=restricted_of,
    log:
        restricted("logs/convert/{unit}.log"),
    group:
        "unit"
    threads: 1
    resources:
        mem_mb=attempt_scaled(config["resources"]["convert_mem_mb"]),
        runtime=attempt_scaled(config["resources"]["convert_runtime_min"]),
    conda:
        "../envs/dcm2niix.yaml"
    shell:
        "{params.python:q} -m deidflow.jobs convert --manifest {input.manifest:q}"
        " --dicom-root {params.dicom_root:q} --work-root={params.work_root:q} --release-root {params.release_root:q}"
        " --restricted {params.restricted:q} --done {output.done:q} --settings {params.settings:q}"
        " --bids {params.bids:q} --log {log:q} 2>> {log:q} && touch {output.staged:q}"


rule bids_dataset:
    """dataset_description.json, participants.tsv/json, README, CHANGES and .bidsignore of the
    published subjects (withheld ones left out), staged for the dataset leak scan."""
    input:
        done=unit_done("convert"),
        published=unit_done("publish"),
    output:
        done=restricted("done/bids_dataset.json"),
        done_list=temp(restricted("work/bids-done.list")),
        published_list=temp(restricted("work/bids-published.list")),
    params:
        python=PYTHON,
        settings=SETTINGS_JSON,
        bids=BIDS_JSON,
        release_root=qc_rules.constant(DATASET_STAGED),
    log:
        restricted("logs/bids_dataset.log"),
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "printf '%s\\n' {input.done:q} > {output.done_list:q}; "
        "printf '%s\\n' {input.published:q} > {output.published_list:q}; "
        "{params.python:q} -m deidflow.jobs bids_dataset --done-list {output.done_list:q}"
        " --published-list {output.published_list:q}"
        " --release-root {params.release_root:q} --settings {params.settings:q} --bids {params.bids:q}"
        " --output {output.done:q} --log {log:q} 2>> {log:q}"


if config["outputs"].get("bids", True):
    register_unit_stage("convert", DICOM_UNITS)
    EXTRA_TARGETS.append(restricted("done/bids_dataset.json"))
    DATASET_TARGETS.append(restricted("done/bids_dataset.json"))
