"""Dataset-level BIDS files, written from the ``convert`` done markers of every unit.

``dataset_description.json`` (Name, BIDSVersion, DatasetType raw, GeneratedBy: deidflow with its
version and the profile/options used, and dcm2niix), ``participants.tsv`` + ``participants.json``
(the pseudonym; sex and age only with retain_patient_characteristics, ages of 90 and over written
as 90), ``README``, ``CHANGES`` and ``.bidsignore`` (sourcedata is ignored by BIDS anyway; ``ct/``
is listed because CT is not yet part of the specification).  Every file is written atomically and
only rewritten when its content changes; nothing depends on the date, so reruns give the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .. import __version__
from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir, write_if_changed
from ..sidecar import sidecar_text

BIDS_VERSION = "1.10.1"
DEFAULT_NAME = "De-identified imaging dataset (deidflow)"


def collect(done_files: Iterable[Path]) -> tuple[list[dict], str]:
    """The per-subject summaries of every ``convert`` done marker (sorted by subject) and the
    dcm2niix version the markers name."""
    subjects, versions = [], set()
    for path in done_files:
        marker = json.loads(Path(path).read_text())
        subjects += marker["subjects"]
        versions.add(marker.get("dcm2niix", "unknown"))
    return sorted(subjects, key=lambda s: s["subject"]), ", ".join(sorted(versions)) or "unknown"


def dataset_files(subjects: list[dict], settings: Mapping[str, Any], bids: Mapping[str, Any],
                  converter_version: str) -> dict[str, str]:
    """File name (relative to the release root) → text of every dataset-level file."""
    options = list(settings.get("options", []))
    characteristics = "retain_patient_characteristics" in options
    with_bids = [s for s in subjects if s["images"]]
    profile = "PS3.15 Basic Application Level Confidentiality Profile" + (
        " with options " + ", ".join(sorted(options)) if options else " (no options)")
    description = {
        "Name": str(bids.get("name") or DEFAULT_NAME),
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [
            {"Name": "deidflow", "Version": __version__,
             "Description": f"De-identified with {profile}; private attributes: {settings.get('private', 'remove')}; "
                            "BIDS sidecars reduced to an allow-list of acquisition fields; NIfTI converted "
                            "from the de-identified DICOM"},
            {"Name": "dcm2niix", "Version": converter_version,
             "Description": "DICOM to NIfTI conversion with its BIDS sidecar and anonymisation on"},
        ],
    }
    for key, field in (("authors", "Authors"), ("license", "License"), ("acknowledgements", "Acknowledgements"),
                       ("how_to_acknowledge", "HowToAcknowledge"), ("funding", "Funding")):
        value = bids.get(key)
        if value:  # from config (bids.authors …): what the data holder states about the dataset
            description[field] = [str(v) for v in value] if isinstance(value, list) else str(value)
    files = {"dataset_description.json": sidecar_text(description)}
    columns = ["participant_id"] + (["sex", "age"] if characteristics else [])
    rows = ["\t".join(columns)]
    for s in with_bids:
        p = s.get("participant") or {}
        row = [s["subject"]]
        if characteristics:
            row += [p.get("sex") or "n/a", "n/a" if p.get("age") is None else _num(p["age"])]
        rows.append("\t".join(row))
    files["participants.tsv"] = "\n".join(rows) + "\n"
    pjson: dict = {"participant_id": {"Description": "Keyed pseudonym of the participant (deidflow); the mapping "
                                                     "to original identifiers is kept apart by the data holder"}}
    if characteristics:
        pjson["sex"] = {"Description": "Sex as recorded by the scanner (DICOM PatientSex)",
                        "Levels": {"M": "male", "F": "female", "O": "other"}}
        pjson["age"] = {"Description": "Age at the first (youngest) session, in whole years below 90; "
                                       "ages of 90 and over are recorded as 90 (HIPAA Safe Harbor)",
                        "Units": "year"}
    files["participants.json"] = sidecar_text(pjson)
    files["README"] = _readme(description["Name"], profile, len(with_bids), subjects)
    files["CHANGES"] = (f"1.0.0\n  - De-identified release produced by deidflow {__version__} "
                        f"({len(with_bids)} participants).\n")
    files[".bidsignore"] = "# not (yet) part of the BIDS specification: CT (BEP024)\n**/ct\nsourcedata/\n"
    return files


def write_dataset(done_files: Iterable[Path], release_root: Path, marker: Path, settings: Mapping[str, Any],
                  bids: Mapping[str, Any]) -> dict:
    """Write the dataset-level files into the release and a marker into the restricted folder."""
    subjects, converter_version = collect(done_files)
    files = dataset_files(subjects, settings, bids, converter_version)
    changed = [name for name, text in files.items()
               if write_if_changed(Path(release_root) / name, text.encode("utf-8"))]
    make_restricted_dir(Path(marker).parent)
    atomic_write_text(marker, json.dumps({"files": sorted(files), "participants": sum(1 for s in subjects if s["images"])},
                                         indent=1) + "\n", RESTRICTED_FILE_MODE)
    return {"files": len(files), "changed": len(changed)}


def _num(v) -> str:
    return str(int(v)) if float(v) == int(v) else str(v)


def _readme(name: str, profile: str, n: int, subjects: list[dict]) -> str:
    unsorted = sum(len(s["unsorted"]) for s in subjects)
    not_converted = sum(len(s["not_converted"]) for s in subjects)
    return (
        f"# {name}\n\n"
        f"This dataset was de-identified and converted to BIDS by deidflow {__version__}.\n\n"
        f"- De-identification: {profile}. Subject and session labels are keyed pseudonyms; the "
        "mapping to original identifiers is not part of this dataset.\n"
        "- NIfTI images were converted by dcm2niix from the de-identified DICOM; every JSON sidecar keeps only "
        "an allow-list of acquisition fields (names, IDs, absolute dates, institution and device identity, "
        "and free text are removed unless the profile options retain them).\n"
        f"- {n} participants with BIDS images. Series that no rule could place in BIDS ({unsorted} images) are in "
        f"sourcedata/unsorted; series dcm2niix could not convert ({not_converted}) stay as DICOM only.\n"
    )
