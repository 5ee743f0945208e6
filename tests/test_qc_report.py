"""The QC report: self-contained, opens in headless Chromium without console messages, shows the
subject table and a face rendering (a fake face PNG planted the way the face stage leaves its
renderings, since this test must not depend on that stage), lists the quarantine by keyed source
ID, holds none of the demo's original identifiers; audit.parquet; `snakemake --report` works.

Chromium is Debian's `chromium` package: installed here with apt-get when missing and root;
without it the test fails in CI and skips elsewhere, saying why."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from deidflow.demo import make_demo_input, planted_identifiers
from deidflow.qc import report

from .conftest import ROOT, TEST_KEY, identifier_in

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
QC = Path("derivatives") / "deidflow" / "qc"
FACE_RGB = (214, 40, 200)  # the fake face's background: easy to find in the screenshot


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


def png(width: int, height: int, pixel) -> bytes:
    """A small RGB PNG (no imaging library needed): ``pixel(x, y) -> (r, g, b)``."""
    raw = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def fake_face(x: int, y: int):
    """A cartoon head (skin ellipse, eyes, mouth) on a magenta background, 120 x 140."""
    cx, cy = 60, 70
    if ((x - cx) / 45) ** 2 + ((y - cy) / 58) ** 2 > 1:
        return FACE_RGB
    if ((x - 42) ** 2 + (y - 55) ** 2 < 36) or ((x - 78) ** 2 + (y - 55) ** 2 < 36):
        return (30, 30, 30)
    if 95 <= y <= 100 and 40 <= x <= 80:
        return (150, 40, 40)
    return (230, 190, 160)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("qcreport")
    inp = base / "input"
    make_demo_input(inp)
    planted = planted_identifiers(inp)
    folder = sorted(p for p in inp.iterdir() if p.is_dir())[0]
    (folder / f"broken_{folder.name}.dcm").write_bytes(b"")  # quarantined: zero-byte file
    env = dict(os.environ, DEIDFLOW_KEY=TEST_KEY)
    r = subprocess.run([sys.executable, "-m", "deidflow.cli", "run", str(inp), str(base / "release"), "--cores", "2"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out, restricted = base / "release", base / "release_restricted"
    subjects = sorted(p.name for p in (out / "sourcedata" / "dicom").iterdir())
    # renderings as a face stage leaves them: PNGs and index.json under qc/<subject>/<stage>/
    stage = out / QC / subjects[0] / "face"
    stage.mkdir(parents=True)
    (stage / "front_after.png").write_bytes(png(120, 140, fake_face))
    (stage / "front_before.png").write_bytes(png(120, 140, lambda x, y: (10, 200, 10)))
    (stage / "index.json").write_text(json.dumps([
        {"file": "front_after.png", "caption": "face after defacing (fake test image)", "kind": "face_front_after"},
        {"file": "front_before.png", "caption": "face before defacing", "kind": "face_front_before"}]))
    html = out / QC / "report.html"
    report.write_report(out, restricted, html, f"{out / QC / 'files_per_modality.svg'},{out / QC / 'actions_per_attribute.svg'}",
                        out / QC / "subjects.tsv", restricted / "qc" / "report-full.html")
    return {"base": base, "input": inp, "release": out, "restricted": restricted, "html": html,
            "subjects": subjects, "stdout": r.stdout, "broken": folder.name, "planted": planted}


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


def test_before_renderings_only_in_restricted_copy(demo):
    public = demo["html"].read_text()
    full = (demo["restricted"] / "qc" / "report-full.html").read_text()
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
    shot = tmp_path / "report.png"
    r = browser(chromium, tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2300", "--hide-scrollbars")
    assert r.returncode == 0 and shot.stat().st_size > 10000, r.stderr[-2000:]
    keep = os.environ.get("DEIDFLOW_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert any(c == FACE_RGB and n > 2000 for n, c in colors), "the face rendering is not visible"


def test_audit_parquet(demo):
    import pyarrow.parquet as pq
    path = demo["restricted"] / "audit.parquet"
    assert path.stat().st_mode & 0o777 == 0o600
    t = pq.read_table(path)
    assert t.column_names == ["subject", "stage", "file", "source", "attribute", "action"]
    assert t.num_rows > 100 and set(t.column("subject").to_pylist()) == set(demo["subjects"])
    assert {"PatientName", "PatientID"} <= set(t.column("attribute").to_pylist())


def test_snakemake_report_zip(demo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                        "--directory", str(demo["restricted"]), "--configfile",
                        str(demo["restricted"] / "run-config.yaml"), "--report", str(tmp_path / "report.zip")],
                       env=dict(os.environ, DEIDFLOW_KEY=TEST_KEY), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(n.endswith("report.html") for n in names) and any(n.endswith("subjects.tsv") for n in names)
