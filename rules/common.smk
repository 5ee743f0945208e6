# Parse-time set-up and input functions. The inventory (restricted, holds PHI) is refreshed here,
# in the main process only, so subjects are known before any job is scheduled; wildcards carry
# pseudonyms only.
import os

from deidflow.pipeline import prepare, run_record
from deidflow.settings import _check_semantics, profile_settings

_check_semantics(config)
PREPARED = prepare(config, main_process=workflow.is_main_process)
OUT = str(PREPARED.paths.output)
RESTRICTED = str(PREPARED.paths.restricted)
SUBJECTS = PREPARED.subjects if config["outputs"]["dicom"] else []
SETTINGS = {**profile_settings(config), "key_fingerprint": PREPARED.fingerprint}


wildcard_constraints:
    subject=r"sub-[A-Za-z0-9]+",


def restricted(path):
    """A path inside the restricted folder."""
    return os.path.join(RESTRICTED, path)


def release(path):
    """A path inside the release folder."""
    return os.path.join(OUT, path)


def per_subject(pattern):
    """``pattern`` expanded over the subjects that have something to release."""
    return expand(pattern, subject=SUBJECTS)


def final_outputs():
    """Targets of rule all."""
    targets = [
        restricted("mapping/patients.csv"),
        restricted("mapping/uids.csv"),
        restricted("mapping/dates.csv"),
        restricted("quarantine.tsv"),
        restricted("run.json"),
    ]
    targets += per_subject(release("sourcedata/dicom/{subject}"))
    if config["strict"]:
        targets.append(restricted("strict.ok"))
    return targets
