"""The QC report: self-contained, opens in headless Chromium without console messages; its sign-off
panel, face decisions (the demo head's rendering after defacing found pixel for pixel in a
full-page screenshot, never the face before, even when ``face.qc_before_in_release`` puts it in the
release), the redaction of the demo's burned-in screen capture, the kept/changed/removed attributes
with private creators, the grouped leak table of a leaking run and the JSL burned-in set; the pixel
stage's "after" pictures are not taken for before-images; release modes whatever the umask;
quarantine by keyed source ID, none of the demo's original identifiers; audit.parquet;
`snakemake --report` works.  Full-page screenshots of every report opened are kept in the restricted
folder of the test run (``<restricted>/qc/screenshots``; also copied to $DEIDFLOW_SCREENSHOT when it
names a folder, for CI artifacts).

Chromium is Debian's `chromium` package: installed here with apt-get when missing and root;
without it the test fails in CI and skips elsewhere, saying why."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deidflow.demo import make_demo_input, planted_identifiers
from deidflow.qc import audit, report

from .conftest import ROOT, TEST_KEY, debian_program, identifier_in

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
QC = Path("derivatives") / "deidflow" / "qc"
STATUS_CLEAN_RGB = (0x17, 0x70, 0x3A)  # colour of a "clean" leak-scan status (.ok in qc_report.html)


@pytest.fixture(scope="session")
def chromium() -> str:
    return debian_program("chromium", "chromium", "report browser test")


def browser(exe: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
                           "--enable-logging=stderr", "--v=0", *extra, url],
                          capture_output=True, text=True, timeout=120)


def find_picture(shot: np.ndarray, pic: np.ndarray) -> tuple[int, int, float]:
    """(x, y, rms difference) of the place in the grey screenshot where the grey picture fits best
    (sum of squared differences for every offset, by FFT)."""
    from scipy.signal import fftconvolve
    h, w = pic.shape
    corr = fftconvolve(shot, pic[::-1, ::-1], mode="valid")
    energy = fftconvolve(shot ** 2, np.ones((h, w)), mode="valid")
    y, x = np.unravel_index(np.argmin(energy - 2 * corr), corr.shape)
    return int(x), int(y), float(np.sqrt(np.mean((shot[y:y + h, x:x + w] - pic) ** 2)))


def status_text_rows(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each horizontal band of text in the "clean" status colour."""
    mask = np.abs(rgb - np.array(STATUS_CLEAN_RGB)).sum(axis=-1) < 60
    ys = np.flatnonzero(mask.any(axis=1))
    if not ys.size:
        return []
    bands = np.split(ys, np.flatnonzero(np.diff(ys) > 1) + 1)
    out = []
    for b in bands:
        xs = np.flatnonzero(mask[b[0]:b[-1] + 1].any(axis=0))
        out.append((int(b[0]), int(b[-1]), int(xs.min()), int(xs.max())))
    return out


MAX_SHOT_HEIGHT = 16000


def screenshot(exe: str, tmp: Path, page: Path, restricted: Path, name: str) -> Path:
    """A full-page screenshot of ``page`` (its height measured in a copy that writes it into the
    DOM), kept in ``<restricted>/qc/screenshots/<name>.png`` and copied to $DEIDFLOW_SCREENSHOT
    when that names a folder."""
    probe = tmp / f"{name}-probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", '<script>window.addEventListener("load", function () { document.body.setAttribute('
        '"data-height", document.documentElement.scrollHeight); });</script></body>'), encoding="utf-8")
    dom = browser(exe, tmp, probe.as_uri(), "--dump-dom", "--window-size=1280,1000", "--hide-scrollbars")
    m = re.search(r'data-height="(\d+)"', dom.stdout)
    height = min(MAX_SHOT_HEIGHT, int(m.group(1)) if m else 4000)
    folder = restricted / "qc" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / f"{name}.png"
    r = browser(exe, tmp, page.as_uri(), f"--screenshot={shot}", f"--window-size=1280,{height}", "--hide-scrollbars")
    assert r.returncode == 0 and shot.stat().st_size > 10000, r.stderr[-2000:]
    keep = os.environ.get("DEIDFLOW_SCREENSHOT")
    if keep and Path(keep).is_dir():
        shutil.copy(shot, Path(keep) / shot.name)
    return shot


class Dom:
    """The elements of a page Chromium dumped (after its scripts ran): tag, attributes, text."""

    def __init__(self, text: str):
        from html.parser import HTMLParser
        self.elements: list[tuple[str, dict, list[str]]] = []
        stack: list[list[str]] = []
        elements = self.elements

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                text: list[str] = []
                elements.append((tag, dict(attrs), text))
                if tag not in ("img", "br", "input", "meta", "link", "hr"):
                    stack.append(text)

            def handle_endtag(self, tag):
                if stack:
                    stack.pop()

            def handle_data(self, data):
                for t in stack:
                    t.append(data)

        P().feed(text)

    def find(self, tag: str, **attrs) -> list[tuple[dict, str]]:
        return [(a, "".join(t)) for g, a, t in self.elements
                if g == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def signoff(self) -> dict[str, str]:
        return {a["data-check"]: a["data-state"] for a, _ in self.find("tr") if "data-check" in a}


def open_report(exe: str, tmp: Path, page: Path, restricted: Path, name: str) -> Dom:
    """Open ``page`` in Chromium: no console message, a full-page screenshot kept; its DOM."""
    dom = browser(exe, tmp, page.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    screenshot(exe, tmp, page, restricted, name)
    return Dom(dom.stdout)


def run_deidflow(inp: Path, out: Path, *extra: str, config: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "deidflow.cli", "run", str(inp), str(out), "--cores", "2", *extra]
    if config:
        import yaml
        cfg = out.parent / f"{out.name}-config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        args += ["--config", str(cfg)]
    return subprocess.run(args, env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("qcreport")
    inp = base / "input"
    make_demo_input(inp)
    planted = planted_identifiers(inp)
    folder = sorted(p for p in inp.iterdir() if p.is_dir())[0]
    (folder / f"broken_{folder.name}.dcm").write_bytes(b"")  # quarantined: zero-byte file
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    # The front view of the original face goes to the release QC folder too (not the default), so
    # that the report is seen to leave it out.
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(base / "release"), "--cores", "2",
                        "--set", "face.qc_before_in_release=true"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode in (0, 3), r.stderr[-3000:]  # 3: the zero-byte file is withheld (release gate)
    out, restricted = base / "release", base / "release_restricted"
    subjects = sorted(p.name for p in (out / "sourcedata" / "dicom").iterdir())
    # the face stage's renderings of the demo's head MRI: PNGs and index.json under qc/<subject>/face/
    (index,) = sorted((out / QC).glob("sub-*/face/index.json"))
    faces = {it["kind"]: index.parent / it["file"] for it in json.loads(index.read_text())}
    assert {"face_front_after", "face_front_before"} <= set(faces), faces
    return {"base": base, "input": inp, "release": out, "restricted": restricted, "html": out / QC / "report.html",
            "subjects": subjects, "stdout": r.stdout, "broken": folder.name, "planted": planted,
            "face_subject": index.parent.parent.name, "faces": faces}


def test_run_prints_stage_summaries_and_report_path(demo):
    assert f"QC report: {demo['html']}" in demo["stdout"]
    for stage in ("dicom", "verify", "verify_dataset"):
        assert f"deidflow: {stage}:" in demo["stdout"]


def test_report_is_self_contained(demo):
    text = demo["html"].read_text()
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text), "external reference"
    assert "http://" not in text and "https://" not in text
    assert text.count("data:image/png;base64,") >= 1 and "<svg" in text


def test_no_original_identifier_in_report(demo):
    """grep of every public QC product for every identifier planted in the demo finds nothing."""
    ids = demo["planted"] | {f"broken_{demo['broken']}.dcm", demo["broken"]}
    assert len(ids) > 100
    for f in sorted((demo["release"] / QC).glob("*.*")):
        blob = f.read_bytes()
        for v in ids:
            assert not identifier_in(v, blob), f"{v!r} in {f.name}"


def test_report_lists_quarantine_by_keyed_id(demo):
    text = demo["html"].read_text()
    assert "zero-byte file" in text and demo["broken"] not in text
    q = report._quarantine(demo["restricted"], report._inventory_rows(demo["restricted"]))
    assert len(q) == 1 and q[0]["src_id"] in text


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def test_before_renderings_only_in_restricted_copy(demo):
    public = demo["html"].read_text()
    full = (demo["restricted"] / "qc" / "report-full.html").read_text()
    before, after = _data_uri(demo["faces"]["face_front_before"]), _data_uri(demo["faces"]["face_front_after"])
    assert after in public and before not in public and before in full
    assert "face_front_after" in public and "face_front_before" not in public
    assert "face_front_before" in full and "Run time" in full and "Run time" not in public
    assert (demo["restricted"] / "qc" / "report-full.html").stat().st_mode & 0o777 == 0o600
    assert "rendering(s) of data before de-identification" in public  # the warning about them


def test_report_opens_in_chromium(demo, chromium, tmp_path):
    url = demo["html"].as_uri()
    dom = browser(chromium, tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    rows = re.findall(r'<tr data-status="(\w+)"', dom.stdout)
    assert rows == ["clean"] * len(demo["subjects"])
    assert f"{len(demo['subjects'])} shown" in dom.stdout  # the filter script ran
    # the face section shows the face stage's rendering of the defaced head, not a stand-in, scaled
    # by a whole number to at least 512 pixels wide
    subject, after = demo["face_subject"], demo["faces"]["face_front_after"]
    m = re.search(rf'<img alt="{subject} face_front_after" data-before="no" class="big zoom" '
                  rf'width="(\d+)" height="(\d+)" src="{re.escape(_data_uri(after))}"', dom.stdout)
    assert m, "face picture missing"
    from PIL import Image
    face = np.asarray(Image.open(after).convert("L")).astype(np.float64)
    k = int(m.group(1)) // face.shape[1]
    assert int(m.group(1)) >= 512 and int(m.group(1)) == k * face.shape[1] and int(m.group(2)) == k * face.shape[0]
    shot = screenshot(chromium, tmp_path, demo["html"], demo["restricted"], "demo-public")
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert face.std() > 20  # a picture, not a blank square
    big = np.kron(face, np.ones((k, k)))
    x, y, rms = find_picture(rgb.mean(axis=2)[::k, ::k], big[::k, ::k])
    assert rms < 3.0, f"the face rendering is not visible in the screenshot (best fit at {x},{y}: rms {rms:.1f})"
    before = np.asarray(Image.open(demo["faces"]["face_front_before"]).convert("L")).astype(np.float64)
    assert find_picture(rgb.mean(axis=2)[::k, ::k], np.kron(before, np.ones((k, k)))[::k, ::k])[2] > 10


def test_audit_parquet(demo):
    import pyarrow.parquet as pq
    path = demo["restricted"] / "audit.parquet"
    assert path.stat().st_mode & 0o777 == 0o600
    t = pq.read_table(path)
    assert t.column_names == ["subject", "stage", "file", "source", "attribute", "action"]
    assert t.num_rows > 100 and set(t.column("subject").to_pylist()) == set(demo["subjects"])
    assert {"PatientName", "PatientID"} <= set(t.column("attribute").to_pylist())


def test_audit_summary_agrees_with_parquet(demo):
    """The report's per-subject action counts (one pass over the JSON lines) equal the rows of
    audit.parquet counted with item indices stripped."""
    import pyarrow.parquet as pq
    from collections import defaultdict
    counts, files = audit.summary(demo["restricted"])
    t = pq.read_table(demo["restricted"] / "audit.parquet").to_pydict()
    expected: dict = defaultdict(Counter)
    distinct = defaultdict(set)
    for s, f, a, c in zip(t["subject"], t["file"], t["attribute"], t["action"]):
        expected[s][(audit.attribute_name(a), c)] += 1
        distinct[s].add(f)
    assert counts == expected
    assert set(files) == set(expected) and all(files[s] >= len(distinct[s]) for s in files)


def test_audit_summary_and_table_of_crafted_lines(tmp_path):
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sub-a.jsonl").write_text(
        '{"file": "x/1.dcm", "source": "s1", "actions": {"Seq[0].PatientID": "X", "Seq[1].PatientID": "X", "A": "K"}}\n'
        '\n{not json\n{"file": "x/2.dcm", "source": "s2", "actions": {}}\n'
        '{"file": "x/3.nii", "stage": "other", "actions": {"descrip": "Z"}}\n', encoding="utf-8")
    counts, files = audit.summary(tmp_path)
    assert counts == {"sub-a": Counter({("Seq.PatientID", "X"): 2, ("A", "K"): 1, ("descrip", "Z"): 1})}
    assert files == {"sub-a": 3}
    n = audit.consolidate(tmp_path, tmp_path / "audit.parquet")
    import pyarrow.parquet as pq
    rows = pq.read_table(tmp_path / "audit.parquet").to_pylist()
    assert n == 4 and [(r["stage"], r["file"], r["attribute"], r["action"]) for r in rows] == [
        ("dicom", "x/1.dcm", "A", "K"), ("dicom", "x/1.dcm", "Seq[0].PatientID", "X"),
        ("dicom", "x/1.dcm", "Seq[1].PatientID", "X"), ("other", "x/3.nii", "descrip", "Z")]


def test_expected_exit_counts_dataset_level_hits():
    """The report is written before the run ends: a hit in a dataset-level file means exit 3
    (the files are withheld, or published under verify.on_leak publish), like a subject's."""
    facts = {"gate": {"withheld": [], "published_with_leaks": []}, "per": {}, "subjects": [], "quarantine": []}
    assert report.expected_exit(facts)[0] == 0
    hit = {"file": "participants.tsv", "location": "line 2", "owner": "sub-a", "field": "PatientName"}
    assert report.expected_exit({**facts, "dataset_verify": {"files": 6, "hits": [hit]}})[0] == 3


def test_bids_validator_sees_the_release_publish_dataset_will_leave(tmp_path, monkeypatch):
    """The report is rendered during the run: the validator must not see the run's
    RELEASE_INCOMPLETE marker, a withdrawn subject's folder or a foreign file (publish_dataset
    takes them out), and must see the staged dataset-level files."""
    from deidflow.qc import evidence
    release, staged, restricted, bin_ = (tmp_path / n for n in ("rel", "staged", "rel_restricted", "bin"))
    for d in (release / "sub-a" / "anat", release / "sub-gone" / "anat", staged, restricted, bin_):
        d.mkdir(parents=True)
    (release / "RELEASE_INCOMPLETE").write_text("incomplete\n")
    (release / "notes.txt").write_text("foreign\n")
    (staged / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.1"}\n')
    fake = bin_ / "bids-validator"  # fails on anything publish_dataset will not leave
    fake.write_text('#!/bin/sh\nfor n in RELEASE_INCOMPLETE sub-gone notes.txt; do [ -e "$1/$n" ] && exit 1; done\n'
                    '[ -e "$1/sub-a" ] && [ -e "$1/dataset_description.json" ]\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    assert evidence.bids_validator(release, staged, restricted, ["sub-a"]) == {"ok": True, "summary": "no error"}


def test_report_counts_the_release_publish_dataset_will_leave(tmp_path):
    """Files publish_dataset sets aside as foreign (anywhere, not only at the root) and the run's
    marker are not counted; the staged dataset-level files are."""
    from deidflow.publish import foreign_entries
    release, staged = tmp_path / "rel", tmp_path / "staged"
    files = ["sub-a/anat/sub-a_T1w.nii.gz", "derivatives/other/x.tsv", "derivatives/deidflow/notes.tsv",
             "derivatives/deidflow/qc/report.html", "derivatives/deidflow/qc/old.tsv", "sourcedata/dicom/list.tsv",
             "RELEASE_INCOMPLETE", "notes.tsv", "foreign/y.tsv"]
    for rel in files:
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        (release / rel).write_text("x\n")
    staged.mkdir()
    (staged / "participants.tsv").write_text("participant_id\nsub-a\n")
    assert len(foreign_entries(release)) == 6
    total, per = report._release_formats(release, staged, ["sub-a"])
    assert dict(total) == {"NIfTI": 1, "TSV": 1} and dict(per) == {"sub-a": {"NIfTI": 1}}


def test_snakemake_report_zip(demo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                        "--directory", str(demo["restricted"]), "--configfile",
                        str(demo["restricted"] / "run-config.yaml"), "--report", str(tmp_path / "report.zip")],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(n.endswith("report.html") for n in names) and any(n.endswith("subjects.tsv") for n in names)


# ------------------------------------------------------------------------------------------------
# What a privacy officer checks: the demo, the JSL burned-in set, a leaking run
# ------------------------------------------------------------------------------------------------
def _public_pictures(dom: Dom) -> list[dict]:
    return [a for a, _ in dom.find("img") if a.get("src", "").startswith("data:image/png")]


def test_demo_reports_in_chromium(demo, chromium, tmp_path):
    """Sign-off states, face and redaction pictures in the public copy and no before-image there
    (both in the restricted copy), attributes named with their private creators."""
    public = open_report(chromium, tmp_path, demo["html"], demo["restricted"], "demo-public")
    full = open_report(chromium, tmp_path, demo["restricted"] / "qc" / "report-full.html", demo["restricted"],
                       "demo-restricted")
    states = public.signoff()
    assert set(states) == {"Every input file released or quarantined", "Leak scan: metadata", "Leak scan: pixel data",
                           "Faces", "Burned-in text", "DICOM conformance", "BIDS validator", "Release complete"}
    assert states["Every input file released or quarantined"] == "WARN"  # the zero-byte file, quarantined
    assert states["Leak scan: metadata"] == "PASS" and states["Faces"] == "PASS"
    assert states["Burned-in text"] == "PASS"  # the demo's screen capture was screened and cleaned
    assert states["Release complete"] in ("PASS", "WARN")
    assert full.signoff() == states
    pics = _public_pictures(public)
    kinds = {a["alt"].split()[-1] for a in pics}
    assert {"face_front_after", "face_slices", "pixels_before_after"} <= kinds, kinds
    assert all(a["data-before"] == "no" for a in pics) and "face_front_before" not in kinds
    before = {a["alt"].split()[-1] for a in _public_pictures(full) if a["data-before"] == "yes"}
    assert before == {"face_front_before", "pixels_before_after"}, before
    # the face decision of every image, with its reason
    faces = [t for a, t in public.find("table", id="face-table")]
    assert "defaced" in faces[0] and "no 3D coverage of a face" in faces[0]
    # kept/changed/removed: private tags named by creator (ACME PACS stamp, Siemens CSA header)
    rows = [t for a, t in public.find("tr") if "data-action" in a]
    assert any("(0029,1010)" in t and "SIEMENS CSA HEADER" in t and "CSA Image Header Info" in t for t in rows)
    assert any("(0009,1010)" in t and "ACME PACS 1.0" in t for t in rows)
    assert any(t.startswith("Manufacturer") and "kept" in t for t in rows)
    survives = [t for a, t in public.find("ul", **{"class": "survives"})]
    assert survives
    assert "Manufacturer" in survives[0]
    # run record: the command line only in the restricted copy (the public page must not depend on
    # how the command was typed: --cores, --restricted …)
    record = [t for a, t in public.find("section", id="run-record")][0]
    assert "--cores" not in record and "in the restricted copy" in record
    assert str(demo["input"]) not in record
    assert str(demo["input"]) in [t for a, t in full.find("section", id="run-record")][0]


def test_demo_burned_in_text_redacted(demo):
    """The demo's screen capture (BurnedInAnnotation absent, text drawn in code) is released with
    the lines of text blanked, the rest of the picture unchanged, and the audit says so."""
    import pydicom
    from deidflow.demo import BURNED_IN_TEXT_BOX
    (orig,) = sorted(demo["input"].glob("*/*/*_Report_capture/*.dcm"))
    a = pydicom.dcmread(orig).pixel_array
    assert "BurnedInAnnotation" not in pydicom.dcmread(orig, stop_before_pixels=True)
    x0, y0, x1, y1 = BURNED_IN_TEXT_BOX
    assert (a[y0:y1, x0:x1] == 255).sum() > 500  # the text is there before
    released = [p for p in (demo["release"] / "sourcedata" / "dicom").rglob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).get("ConversionType") == "WSD"]
    assert len(released) == 1
    b = pydicom.dcmread(released[0]).pixel_array
    assert (b[y0:y1, x0:x1] == 255).sum() == 0, "burned-in text left in the released pixels"
    assert np.array_equal(a[y1 + 10:], b[y1 + 10:])  # the image below the text is untouched
    audit_lines = [json.loads(ln) for f in (demo["restricted"] / "audit").glob("*.jsonl")
                   for ln in f.read_text().splitlines() if ln]
    (rec,) = [ln["pixels"] for ln in audit_lines if "pixels" in ln and ln["pixels"].get("redactions")]
    assert rec["action"] == "redacted"


# One image of each of six JSL patients, one per vendor and kind (GE DX and MR with GEMS_ private
# blocks, Fujifilm CR, Philips CT with ELSCINT1/SECTRA blocks, Siemens MR, VICTRE tomosynthesis),
# each with burned-in text: the report's rendering of a real pixel-cleaning run is tested here;
# the recall on all 28 files is test_pixels_realdata.py's, every file's header test_realdata_dicom.py's.
# (All 28 files took 85 s of CI time for this fixture, OCR of every file.)
JSL_PATIENTS = ("339833062_", "6415974217_", "292821506_", "9189822998_", "8732322741_", "571403367_")


@pytest.fixture(scope="module")
def jsl(tmp_path_factory):
    from .conftest import require_shared
    src = require_shared("jsl_pseudo_phi")
    base = tmp_path_factory.mktemp("qcjsl")
    inp = base / "input"
    inp.mkdir()
    for patient in JSL_PATIENTS:  # the .json files are the ground truth, not input
        f = sorted(src.glob(f"{patient}*.dcm"))[0]
        shutil.copy(f, inp / f.name)
    r = run_deidflow(inp, base / "release", "--set", "dicom.private=safe", "--set", "outputs.bids=false")
    assert r.returncode in (0, 3), r.stderr[-3000:]
    return {"release": base / "release", "restricted": base / "release_restricted",
            "html": base / "release" / QC / "report.html"}


def test_jsl_reports_in_chromium(jsl, chromium, tmp_path):
    public = open_report(chromium, tmp_path, jsl["html"], jsl["restricted"], "jsl-public")
    full = open_report(chromium, tmp_path, jsl["restricted"] / "qc" / "report-full.html", jsl["restricted"],
                       "jsl-restricted")
    states = public.signoff()
    assert states["Burned-in text"] == "PASS" and states["Faces"] == "PASS"  # selected from the DICOM itself
    pics = _public_pictures(public)
    assert pics and all(a["data-before"] == "no" for a in pics)
    assert {a["alt"].split()[-1] for a in pics} == {"pixels_before_after"}
    assert "rendering(s) of data before de-identification" not in "".join(t for _, t in public.find("p"))
    assert any(a["data-before"] == "yes" for a in _public_pictures(full))
    rows = [t for a, t in public.find("tr") if a.get("data-action") == "K"]
    assert any("GEMS_" in t for t in rows), "kept private attributes are named by their creator"
    pixel_rows = [t for a, t in public.find("table", id="pixel-table")]
    assert pixel_rows and "cleaned" in pixel_rows[0]


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    from deidflow.demo import make_demo_input
    import pydicom
    base = tmp_path_factory.mktemp("qcleak")
    make_demo_input(base / "input")
    # an attacker's private block: its creator is the patient's name (removed with the block; the
    # report names creators read from the originals, so it must withhold this one)
    # and another patient's ID in a kept attribute of every file of the series (a mis-filed study:
    # the engine sweeps a file owner's own values, another patient's are for the leak scan), all
    # subjects in one job unit so its scan knows both; published on purpose to show the report
    other = next(f for f in sorted((base / "input").rglob("*.dcm")) if "MUSTERMANN" not in str(f))
    other_id = str(pydicom.dcmread(other).PatientID)
    (series,) = sorted((base / "input").glob("MUSTERMANN_*/*/001_*"))
    for f in sorted(series.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.private_block(0x0011, "MUSTERMANN ERIKA", create=True).add_new(0x01, "LO", "x")
        ds.SequenceName = f"*tse2d1_{other_id}"
        ds.save_as(f)
    config = {"jobs": {"min_batches": 1}, "verify": {"on_leak": "publish"}}
    r = run_deidflow(base / "input", base / "release", "--set", "face.method=none", "--set", "outputs.bids=false",
                     config=config)
    return {"release": base / "release", "restricted": base / "release_restricted", "rc": r.returncode,
            "html": base / "release" / QC / "report.html", "stderr": r.stderr}


def test_leaking_run_report_in_chromium(leaky, chromium, tmp_path):
    """A run that publishes a leak (verify.on_leak: publish): the sign-off fails the leak scan, the
    hits are grouped by attribute and kind of identifier with their file counts, each group
    expandable per file."""
    assert leaky["html"].exists(), leaky["stderr"][-3000:]
    public = open_report(chromium, tmp_path, leaky["html"], leaky["restricted"], "leak-public")
    open_report(chromium, tmp_path, leaky["restricted"] / "qc" / "report-full.html", leaky["restricted"],
                "leak-restricted")
    states = public.signoff()
    assert states["Leak scan: metadata"] == "FAIL"
    assert [a for a, _ in public.find("section", id="signoff")][0]["data-overall"] == "FAIL"
    groups = [t for a, t in public.find("tr", **{"class": "leak-group"})]
    assert groups and any(g.startswith("DICOM SequenceName") for g in groups), groups
    n_files = sum(1 for _ in (leaky["release"] / "sourcedata" / "dicom").rglob("*.dcm"))
    planted = sum(1 for _ in sorted(leaky["release"].parent.glob("input/MUSTERMANN_*/*/001_*"))[0].glob("*.dcm"))
    id_group = next(g for g in groups if g.startswith("DICOM SequenceName"))
    assert str(planted) in id_group  # every planted file, one group
    assert len(groups) < n_files  # grouped, not one row per file
    assert [a for a, _ in public.find("details", **{"class": "group"})]
    rows = [t for a, t in public.find("tr") if "data-action" in a]
    assert any("(0011,1001)" in t and report.CREATOR_WITHHELD in t for t in rows), "planted creator not withheld"
    assert "MUSTERMANN" not in leaky["html"].read_text().upper()


def test_pixel_after_pictures_are_public_not_before_images(tmp_path):
    """Regression: the pixel stage's public pictures have kind "pixels_before_after"; the report
    took every kind containing "before" for a before-image (hid them, raised a false alarm)."""
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.new("L", (40, 30), 200).save(buf, format="PNG")
    release, restricted = tmp_path / "rel", tmp_path / "rel_restricted"
    pub = release / QC / "sub-a" / "pixels"
    priv = restricted / "qc" / "sub-a" / "pixels"
    pub.mkdir(parents=True)
    priv.mkdir(parents=True)
    (pub / "ses-1_US1_0001_after.png").write_bytes(buf.getvalue())
    (priv / "ses-1_US1_0001_before.png").write_bytes(buf.getvalue())
    cap = "sub-a/ses-1/US1/0001.dcm: 2 box(es) blanked in 1 of 1 frame(s) (redacted)"
    (pub / "index.json").write_text(json.dumps([{"file": "ses-1_US1_0001_after.png", "caption": cap,
                                                 "kind": "pixels_before_after"}]))
    (priv / "index.json").write_text(json.dumps([{"file": "ses-1_US1_0001_before.png", "caption": cap,
                                                  "after": "ses-1_US1_0001_after.png", "kind": "pixels_before_after"}]))
    assert report._before_images_in_release(release) == 0
    public = report._qc_images(release, restricted, "sub-a", restricted_copy=False)
    assert [(im["kind"], im["uri"][:22]) for im in public] == [("pixels_before_after", "data:image/png;base64,")]
    full = report._qc_images(release, restricted, "sub-a", restricted_copy=True)
    assert sorted(im.get("file") for im in full) == ["ses-1_US1_0001_after.png", "ses-1_US1_0001_before.png"]
    assert [im["before"] for im in sorted(full, key=lambda im: im["file"])] == [False, True]


def test_release_counted_and_validated_as_publish_dataset_will_leave_it(tmp_path, monkeypatch):
    """The report is written before publish_dataset: it counts the staged dataset-level files,
    not a withdrawn subject's folder or a foreign file, and the BIDS validator sees the staged
    dataset_description.json through a view of the release."""
    from deidflow.qc import evidence
    release, staged, restricted = tmp_path / "rel", tmp_path / "staged", tmp_path / "rel_restricted"
    for sub in ("sub-a", "sub-gone"):
        (release / sub / "anat").mkdir(parents=True)
        (release / sub / "anat" / f"{sub}_T1w.nii.gz").write_bytes(b"x")
    (release / "stray.txt").write_text("dropped into the release by someone\n")
    (release / "participants.tsv").write_text("participant_id\nsub-a\nsub-gone\n")  # an earlier run's
    staged.mkdir()
    (staged / "participants.tsv").write_text("participant_id\nsub-a\n")
    (staged / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    total, per = report._release_formats(release, staged, ["sub-a"])
    assert per == {"sub-a": Counter({"NIfTI": 1})}
    assert total == Counter({"NIfTI": 1, "TSV": 1, "JSON": 1})  # participants.tsv once, no stray.txt
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "bids-validator"  # exits 0 only when the tree it is given is a BIDS dataset
    fake.write_text("#!/bin/sh\n[ -f \"$1/dataset_description.json\" ] && [ -d \"$1/sub-a\" ] || exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    restricted.mkdir()
    assert evidence.bids_validator(release) is None  # no dataset_description.json in the release yet
    assert evidence.bids_validator(release, staged, restricted) == {"ok": True, "summary": "no error"}
    assert not any(restricted.iterdir())  # the view is gone
    # a leak-scan hit keeps the staged files out and takes the earlier participants.tsv out: not counted
    total, _ = report._release_formats(release, staged, ["sub-a"], withhold_staged=True)
    assert total == Counter({"NIfTI": 1})
    (release / "dataset_description.json").write_text('{"Name": "earlier", "BIDSVersion": "1.9.0"}')
    assert evidence.bids_validator(release, None, restricted, withheld=staged) is None  # nothing left to validate


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_release_modes_whatever_the_umask(demo_export, tmp_path, umask):
    """Release files 0644 and folders 0755, restricted folders 0700 and mappings/audit 0600, with
    the user's umask 000 or 077."""
    out = tmp_path / "release"
    old = os.umask(umask)
    try:
        r = run_deidflow(demo_export, out, "--set", "face.method=none", "--set", "outputs.bids=true")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr[-3000:]
    restricted = tmp_path / "release_restricted"
    files = [p for p in out.rglob("*") if p.is_file()]
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert len(files) > 100 and any(p.name == "dataset_description.json" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, [
        (p.relative_to(out), oct(p.stat().st_mode & 0o777)) for p in files if p.stat().st_mode & 0o777 != 0o644][:5]
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {"0o755"}
    assert restricted.stat().st_mode & 0o777 == 0o700
    for sub in ("mapping", "audit"):
        entries = [restricted / sub, *(restricted / sub).rglob("*")]
        assert {p.stat().st_mode & 0o777 for p in entries if p.is_dir()} == {0o700}
        assert {p.stat().st_mode & 0o777 for p in entries if p.is_file()} == {0o600}
    assert (restricted / "qc" / "report-full.html").stat().st_mode & 0o777 == 0o600


def test_volume_screen_reasons_are_the_reports_own_words():
    """The report's self-check ignores its own words (a patient called "Axis" is not leaked by a
    heading).  The `other` stage's and the volume screen's reasons were not among them: a
    quarantine reason such as "burned-in text in the image (slice 88 across voxel axis 2 of the
    maximum over volumes)" was withheld from the report when a subject's name was one of its
    words."""
    from deidflow.pixels import volumes
    reasons = [f"burned-in text in the image ({volumes.Where(2, 88, 0, 'maximum')}); text in these formats' "
               "voxels is not removed", f"{volumes.Where(1, 3, 7)}", "voxels not readable: cannot be screened",
               "too large to screen for burned-in text (out of memory)"]
    words = {w for r in reasons for w in re.findall(r"[a-z]+", r.lower())}
    assert words <= {w.decode() for w in report._own_words()}, words - {w.decode() for w in report._own_words()}
