"""BIDS release: dcm2niix conversion of the de-identified DICOM (never the originals), a documented
series → BIDS heuristic with a user mapping that overrides it, collision-free names, scrubbed
sidecars (:mod:`deidflow.sidecar`) and the dataset-level files.

Modules: :mod:`.series` (attributes of a scrubbed series), :mod:`.heuristic` (rules),
:mod:`.naming` (entities, run-/acq-, file names), :mod:`.dcm2niix` (the converter),
:mod:`.convert` (the per-unit ``convert`` job), :mod:`.dataset` (dataset_description.json,
participants.tsv/json, README, CHANGES, .bidsignore).  See docs/bids.md.
"""
