"""The QC report of a dataset of many subjects (issue 21): still one usable page — the subject
table paged, detail sections only for subjects with a finding — that names every withheld subject
with its reason; its self-check still finds an identifier of a subject in the middle of the
dataset."""
from __future__ import annotations

import csv
import json
import re
import uuid

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from deidflow.errors import PublicError
from deidflow.qc import leakscan, report

from .test_qc_report import run_deidflow

N = report.DETAIL_LIMIT + 60  # more subjects than get a detail section each
LEAKY = (3, N // 2, N - 5)  # subjects whose file carries another patient's ID in a kept attribute
QC = "derivatives/deidflow/qc"


def _uid(*parts) -> str:
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "/".join(map(str, parts))).int)


def _write_subject(root, i: int) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid("scale", i, "sop")
    ds.PatientName = f"KOWALSKA^JADWIGA{i:04d}"
    ds.PatientID = f"MRN{i:07d}"
    ds.PatientBirthDate = f"19{40 + i % 50:02d}0{1 + i % 9}1{i % 9}"
    ds.StudyDate = "20200101"
    ds.Modality = "MR"
    ds.StudyInstanceUID = _uid("scale", i, "study")
    ds.SeriesInstanceUID = _uid("scale", i, "series")
    ds.SeriesNumber = ds.InstanceNumber = 1
    if i in LEAKY:  # a mis-filed study: the neighbour's ID in a kept attribute
        ds.SequenceName = f"*t_MRN{i + 1:07d}"
    out = root / f"P{i:04d}" / "1.dcm"
    out.parent.mkdir(parents=True)
    ds.save_as(out, enforce_file_format=True)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    base = tmp_path_factory.mktemp("qcmany")
    for i in range(N):
        _write_subject(base / "input", i)
    # one job unit: each leaky subject's scan knows its neighbour's values
    r = run_deidflow(base / "input", base / "release", "--set", "face.method=none", "--set", "outputs.bids=false",
                     "--set", "pixels.clean=off", config={"jobs": {"min_batches": 1}})
    restricted = base / "release_restricted"
    return {"rc": r.returncode, "stderr": r.stderr, "release": base / "release", "restricted": restricted,
            "html": (base / "release" / QC / "report.html").read_text(encoding="utf-8"),
            "withheld": json.loads((restricted / "withheld.json").read_text())["withheld"]}


def test_many_subjects_report_is_paged_and_names_every_withheld_subject(many):
    assert many["rc"] == 3, many["stderr"][-3000:]  # release incomplete: subjects withheld
    withheld = many["withheld"]
    assert len(withheld) == len(LEAKY), withheld
    html = many["html"]
    # the subject table is paged in the page, every subject is in it (and in subjects.tsv)
    table = re.search(r'<table id="subjects"[^>]*data-page="(\d+)".*?</table>', html, re.S)
    assert table and int(table.group(1)) < N
    rows = re.findall(r"<tr data-status=", table.group(0))
    with open(many["release"] / QC / "subjects.tsv", newline="") as fh:
        tsv = list(csv.DictReader(fh, delimiter="\t"))
    assert len(tsv) == len(rows) == N
    # detail sections only for subjects with a finding, and a note that says so
    details = re.findall(r'<details class="subject" id="(sub-[^"]+)"', html)
    assert len(details) < N and "only those with a finding" in html
    # every withheld subject is named, with the reason (where the leak scan found the value)
    for subject, hits in withheld.items():
        assert hits
        reason = re.search(rf"subject {re.escape(subject)} withheld: the leak scan found identifying values at "
                           r"([^<]+)", html)
        assert reason and "SequenceName" in reason.group(1), subject
        assert subject in re.search(r"Withheld by the release gate[^<]*", html).group(0)
        assert not (many["release"] / "sourcedata" / "dicom" / subject).exists()


def test_self_check_of_many_subjects_finds_the_middle_subjects_identifier(many):
    """The report's self-check (one matcher over every subject's values) stops a page that holds
    an original value of subject N/2, in any of its forms; the written page holds none."""
    restricted = many["restricted"]
    matcher = leakscan.dataset_matcher(restricted)
    assert leakscan.text_hits([matcher], {"page": many["html"]}, ignore=report._own_words()) == {"page": 0}
    half = N // 2 + 1  # not one of the withheld subjects' neighbours' own files
    for planted in (f"Jadwiga{half:04d} Kowalska", f"MRN {half:07d}"[:7] + "-" + f"{half:07d}"[3:],
                    f"MRN{half:07d}"):
        page = many["html"].replace("</body>", f"<p>{planted}</p></body>")
        assert leakscan.text_hits([matcher], {"page": page})["page"] >= 1, planted
        facts = {"quarantine": [], "attributes": {"rows": []}}
        with pytest.raises(PublicError, match="QC report not written"):
            report._check_public(restricted, facts, {"report.html": page}, matcher)
