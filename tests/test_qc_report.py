"""The QC report: self-contained, opens in headless Chromium without console messages, shows the
subject table and the face stage's rendering of the demo's head MRI after defacing (found pixel for
pixel in a screenshot), never the rendering of the face before (even when
``face.qc_before_in_release`` puts it in the release), lists the quarantine by keyed source ID, holds
none of the demo's original identifiers; audit.parquet; `snakemake --report` works.

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

from .conftest import ROOT, TEST_KEY, identifier_in

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
QC = Path("derivatives") / "deidflow" / "qc"
STATUS_CLEAN_RGB = (0x17, 0x70, 0x3A)  # colour of a "clean" leak-scan status (.ok in qc_report.html)


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"report browser test cannot run: {reason}")
    pytest.skip(f"report browser test cannot run: {reason}")


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable("Debian's chromium is not installed and this is not a root Debian machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            _unavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return shutil.which("chromium") or _unavailable("chromium not on PATH after installing it")


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
    assert r.returncode == 0, r.stderr[-3000:]
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
    # the gallery shows the face stage's rendering of the defaced head, not a stand-in
    subject, after = demo["face_subject"], demo["faces"]["face_front_after"]
    assert f'alt="{subject} face_front_after" src="{_data_uri(after)}"' in dom.stdout
    shot = tmp_path / "report.png"
    r = browser(chromium, tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2300", "--hide-scrollbars")
    assert r.returncode == 0 and shot.stat().st_size > 10000, r.stderr[-2000:]
    keep = os.environ.get("DEIDFLOW_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    from PIL import Image
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    face = np.asarray(Image.open(after).convert("L")).astype(np.float64)
    assert face.std() > 20  # a picture, not a blank square
    x, y, rms = find_picture(rgb.mean(axis=2), face)
    assert rms < 2.0, f"the face rendering is not visible in the screenshot (best fit at {x},{y}: rms {rms:.1f})"
    before = np.asarray(Image.open(demo["faces"]["face_front_before"]).convert("L")).astype(np.float64)
    assert find_picture(rgb.mean(axis=2), before)[2] > 10  # the original face is nowhere on the page
    # the subject table above it: one row per subject, its leak-scan status drawn in one column
    bands = status_text_rows(rgb[:y])
    assert len(bands) == len(demo["subjects"]), bands
    assert len({(left, right) for _, _, left, right in bands}) == 1, bands


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


def test_snakemake_report_zip(demo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                        "--directory", str(demo["restricted"]), "--configfile",
                        str(demo["restricted"] / "run-config.yaml"), "--report", str(tmp_path / "report.zip")],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(n.endswith("report.html") for n in names) and any(n.endswith("subjects.tsv") for n in names)
