# Parse-time set-up and input functions. The inventory (restricted, holds PHI) is refreshed here,
# in the main process only, so subjects are known before any job is scheduled; wildcards carry
# pseudonyms only.
import json
import os
import sys

from deidflow.pipeline import prepare, write_run_record
from deidflow.settings import _check_semantics, profile_settings

_check_semantics(config)
PREPARED = prepare(config, main_process=workflow.is_main_process)
OUT = str(PREPARED.paths.output)
RESTRICTED = str(PREPARED.paths.restricted)
UNITS = list(PREPARED.units) if config["outputs"]["dicom"] else []
SETTINGS = {**profile_settings(config), "key_fingerprint": PREPARED.fingerprint}
SETTINGS_JSON = json.dumps(SETTINGS, sort_keys=True)
if workflow.is_main_process:
    write_run_record(PREPARED, SETTINGS)  # restricted/run.json: versions, settings, key fingerprint
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


def restricted_of(wildcards, output):
    """The restricted folder, derived from a job's output (<restricted>/done/dicom/<unit>.json)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(output.done)))


def per_unit(pattern):
    """``pattern`` expanded over the job units (subjects or batches of small subjects)."""
    return expand(pattern, unit=UNITS)


def final_outputs():
    """Targets of rule all."""
    targets = [
        restricted("mapping/patients.csv"),
        restricted("mapping/uids.csv"),
        restricted("mapping/dates.csv"),
        restricted("quarantine.tsv"),
    ]
    targets += per_unit(restricted("done/dicom/{unit}.json"))
    if config["strict"]:
        targets.append(restricted("strict.ok"))
    return targets
