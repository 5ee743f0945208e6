"""The end-of-run summary counts what the release holds (deidflow.summary.collect)."""
from __future__ import annotations

from deidflow.publish import MARKER, QC_SUBDIR
from deidflow.settings import Paths
from deidflow.summary import collect


def test_summary_counts_release_files_not_the_marker_or_the_report(tmp_path):
    """A failed run leaves RELEASE_INCOMPLETE at the release root: it is not a dataset-level file
    of the release; QC products are not counted; subjects' files are counted by subject."""
    release, restricted = tmp_path / "rel", tmp_path / "rel_restricted"
    restricted.mkdir()
    for rel in ("sub-a/anat/sub-a_T1w.nii.gz", "sub-a/anat/sub-a_T1w.json", "sub-b/sub-b_sessions.tsv",
                "participants.tsv", "dataset_description.json", MARKER, f"{QC_SUBDIR}/report.html",
                f"sourcedata/dicom/sub-a/ses-1/{MARKER}"):
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        (release / rel).write_text("x\n")
    c = collect(Paths(tmp_path / "in", release, restricted))
    assert c.released_subjects == ["sub-a", "sub-b"] and c.released_files == 4
    assert c.dataset_files == 2
