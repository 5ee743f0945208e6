# Parse-time set-up and input functions. The inventory (restricted, holds PHI) is refreshed here,
# in the main process only, so subjects are known before any job is scheduled; wildcards carry
# pseudonyms only.
import json
import os
import sys

from deidflow.fsutil import QC_SUBDIR, restricted_umask
from deidflow.pipeline import prepare, write_run_record
from deidflow.publish import REPORT_FILES, REPORT_STAGING, finalize_run, mark_incomplete, on_leak_of, write_subjects
from deidflow.settings import _check_semantics, profile_settings

_check_semantics(config)
restricted_umask()  # .snakemake/, logs, job outputs 0600/0700 whatever the umask (the release gate sets 0644/0755)
PREPARED = prepare(config, main_process=workflow.is_main_process)
OUT = str(PREPARED.paths.output)
RESTRICTED = str(PREPARED.paths.restricted)
# Every job unit, and the units each kind of stage has work in (a stage gets no job for a unit
# without files of its kind). The dicom stage also runs for a BIDS-only release: its output is the
# converter's input.
UNITS = list(PREPARED.units)
DICOM_UNITS = [u for u in UNITS if "dicom" in PREPARED.unit_formats[u]]
if not (config["outputs"]["dicom"] or config["outputs"].get("bids", True)):
    DICOM_UNITS = []
OTHER_UNITS = [u for u in UNITS if PREPARED.unit_formats[u] - {"dicom"}]
SETTINGS = {**profile_settings(config), "key_fingerprint": PREPARED.fingerprint}
SETTINGS_JSON = json.dumps(SETTINGS, sort_keys=True)
if workflow.is_main_process:
    write_run_record(PREPARED, SETTINGS)  # restricted/run.json: versions, settings, key fingerprint
    write_subjects(RESTRICTED, PREPARED.subjects)  # restricted/work/subjects.txt: withdrawals
# Jobs run the interpreter that runs Snakemake, or the env's own python under --sdm conda.
PYTHON = "python" if "conda" in str(workflow.deployment_settings.deployment_method).lower() else sys.executable


wildcard_constraints:
    unit=r"(sub|batch)-[A-Za-z0-9]+",


def restricted(path):
    """A path inside the restricted folder."""
    return os.path.join(RESTRICTED, path)


def release(path):
    """A path inside the release folder."""
    return os.path.join(OUT, path)


def staged(path=""):
    """Params function: ``path`` inside the job unit's staging tree <restricted>/staging/<unit>/,
    which has the release layout (deidflow.publish). Every per-unit stage writes there; only the
    publish rule moves folders into the release."""

    def param(wildcards):
        return os.path.join(RESTRICTED, "staging", wildcards.unit, path)

    return param


def stamp(stage):
    """The temporary flag a per-unit stage leaves beside its staged files: consumed by the unit's
    publish job, then deleted by Snakemake. A later re-run of any stage of the unit finds it
    missing and re-runs the unit's chain from its first stage, since publishing emptied the
    staging tree."""
    return restricted(f"work/{{unit}}/staged-{stage}")


def unit_stamps_of(*stages):
    """Input function: the staging flags of those of ``stages`` that run for the unit."""

    def inputs(wildcards):
        return [restricted(f"work/{wildcards.unit}/staged-{s}") for s in stages if wildcards.unit in UNIT_STAGES.get(s, ())]

    return inputs


def restricted_of(wildcards, output):
    """The restricted folder, derived from a job's output (<restricted>/done/dicom/<unit>.json)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(output.done)))


def release_root_of(wildcards):
    """The release folder as a params function (as a plain string it prefixes the sibling
    <output>_restricted paths, which Snakemake's linter reads as a hard-coded path prefix)."""
    return OUT


def attempt_scaled(amount):
    """A resource that grows with each try of a job (Snakemake's ``attempt``: 1, 2, …), so a job
    killed for exceeding its memory or time limit gets more on the retry (``--restart-times``)."""

    def resource(wildcards, attempt):
        return amount * attempt

    return resource


def per_unit(pattern, units=None):
    """``pattern`` expanded over job units (subjects or batches of small subjects): ``units``,
    default every unit."""
    return expand(pattern, unit=UNITS if units is None else units)


# Stages register themselves when their rules file is included: UNIT_STAGES maps each per-unit
# stage to the units it runs for; its done markers restricted/done/<stage>/<unit>.json must exist
# before a unit is verified. EXTRA_TARGETS are aggregate targets (dataset files, report) of rule all.
UNIT_STAGES = {}  # stage -> set of the units it runs for
EXTRA_TARGETS = []
# dataset-level files (participants.tsv …) are written here, leak-scanned, then published
DATASET_STAGED = restricted("staging/dataset")
DATASET_TARGETS = []  # done markers of the jobs that write into DATASET_STAGED
# the QC report's public files: checked and staged by verify_dataset, copied in by publish_dataset
QC_DIR = release(QC_SUBDIR)
REPORT_STAGED = restricted(REPORT_STAGING)


def register_unit_stage(stage, units=None):
    """Declare a per-unit stage that runs for ``units`` (default: every unit)."""
    UNIT_STAGES[stage] = set(UNITS if units is None else units)


def units_of(*stages):
    """The units at least one of the registered ``stages`` runs for, in UNITS order (for a stage
    that consumes them)."""
    members = set().union(*(UNIT_STAGES.get(s, ()) for s in stages))
    return [u for u in UNITS if u in members]


def unit_done(stage):
    """The done markers of ``stage`` for every unit it runs for (every unit, for a stage that is
    not registered, such as verify)."""
    return per_unit(restricted(f"done/{stage}/{{unit}}.json"), units_of(stage) if stage in UNIT_STAGES else UNITS)


def unit_markers_of(*stages):
    """Input function (use with ``unpack``): {stage: the unit's done marker} for those of ``stages``
    that are registered and run for the unit."""

    def inputs(wildcards):
        return {
            s: restricted(f"done/{s}/{wildcards.unit}.json")
            for s in stages
            if wildcards.unit in UNIT_STAGES.get(s, ())
        }

    return inputs


def stages_done_of_unit(wildcards):
    """Input function: the done markers of every registered stage that runs for this unit."""
    return list(unit_markers_of(*UNIT_STAGES)(wildcards).values())


def input_or_empty(name):
    """Params function: the job's input ``name``, or '' when it has none (see unit_markers_of)."""

    def param(wildcards, input):
        return input.get(name, "")

    return param


def final_outputs():
    """Targets of rule all."""
    targets = [restricted("mapping/uids.csv"), restricted("quarantine.tsv")]
    for stage in UNIT_STAGES:
        targets += unit_done(stage)
    targets += unit_done("publish")
    targets += EXTRA_TARGETS
    if config["strict"]:
        targets.append(restricted("strict.ok"))
    return targets
