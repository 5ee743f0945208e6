"""Content sniffing and the inventory: grouping, release layout, quarantine reasons, caching."""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from deidflow import inventory, sniff
from deidflow.demo import make_demo_input
from deidflow.pseudonym import Pseudonymizer

KEY = b"k" * 32


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "input"
    patients = make_demo_input(d)
    return d, patients


def test_sniff_formats(tmp_path):
    assert sniff.sniff(get_testdata_file("CT_small.dcm")) == "dicom"
    assert sniff.sniff(get_testdata_file("ExplVR_LitEndNoMeta.dcm")) == "dicom"  # no preamble
    nii = bytearray(352)
    nii[:4] = struct.pack("<i", 348)
    nii[344:348] = b"n+1\0"
    assert sniff.sniff_bytes(bytes(nii)) == "nifti1"
    nii[344:348] = b"\0\0\0\0"
    assert sniff.sniff_bytes(bytes(nii)) == "analyze"
    assert sniff.sniff_bytes(b"CDF\x01" + bytes(100)) == "minc1"
    assert sniff.sniff_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100)) == "minc2"
    assert sniff.sniff_bytes(b"II*\x00" + bytes(100)) == "tiff"
    assert sniff.sniff_bytes(b"") == "empty"
    assert sniff.sniff_bytes(os.urandom(64) and b"\x13\x37" * 256) == "unknown"
    f = tmp_path / "x.dcm"  # extension does not matter
    f.write_bytes(b"hello world, not an image" * 10)
    assert sniff.sniff(f) == "unknown"


def test_groups_patients_studies_series(demo_input):
    d, patients = demo_input
    inv = inventory.build(d, Pseudonymizer(KEY))
    ok = [r for r in inv.rows if r["status"] == "ok"]
    assert len(ok) == len(inv.rows)  # the demo is clean
    assert len(inv.subjects) == len(patients)
    by_subject = inv.by_subject()
    studies = {s: {r["session"] for r in rows} for s, rows in by_subject.items()}
    assert max(len(v) for v in studies.values()) == 2  # one patient has two studies
    for r in ok:
        assert r["out_relpath"].startswith(r["session"] + "/" + r["series_label"] + "/")
        for p in patients:  # no original identifier in any release path
            assert p.patient_id not in r["out_relpath"] and p.name.split("^")[0] not in r["out_relpath"]
    outs = [(r["subject"], r["out_relpath"]) for r in ok]
    assert len(set(outs)) == len(outs)


def test_layout_independent_of_walk_order_and_key_dependent(demo_input, tmp_path):
    d, _ = demo_input
    a = inventory.build(d, Pseudonymizer(KEY))
    copy = tmp_path / "renamed"
    shutil.copytree(d, copy)
    for i, sub in enumerate(sorted(copy.iterdir())):  # different folder names, same content
        sub.rename(copy / f"zz{9 - i}")
    b = inventory.build(copy, Pseudonymizer(KEY))
    key = lambda rows: sorted((r["subject"], r["out_relpath"], r["sop_uid"]) for r in rows)  # noqa: E731
    assert key(a.rows) == key(b.rows)
    c = inventory.build(d, Pseudonymizer(b"j" * 32))
    assert set(c.subjects).isdisjoint(a.subjects)


def _ct(tmp: Path, name: str, **attrs) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in attrs.items():
        setattr(ds, k, v)
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p


def test_quarantine_reasons(tmp_path):
    d = tmp_path / "in"
    _ct(d, "good/a.dcm", SOPInstanceUID="1.2.3.1")
    _ct(d, "mixed/a.dcm", SOPInstanceUID="1.2.3.2", SeriesInstanceUID="1.2.9", PatientID="A")
    _ct(d, "mixed/b.dcm", SOPInstanceUID="1.2.3.3", SeriesInstanceUID="1.2.9", PatientID="B")
    _ct(d, "dup/a.dcm", SOPInstanceUID="1.2.3.1")
    _ct(d, "noid/a.dcm", SOPInstanceUID="1.2.3.4", PatientID="")
    (d / "empty.dcm").write_bytes(b"")
    (d / "junk.dcm").write_bytes(b"\x13\x37" * 300)
    (d / "notes.txt").write_text("scanner notes")
    nii = bytearray(352)
    nii[:4] = struct.pack("<i", 348)
    nii[344:348] = b"n+1\0"
    (d / "head.nii").write_bytes(bytes(nii))
    raw = (d / "good" / "a.dcm").read_bytes()
    (d / "trunc.dcm").write_bytes(raw[:300])
    os.symlink(d / "good" / "a.dcm", d / "link.dcm")
    inv = inventory.build(d, Pseudonymizer(KEY))
    reasons = {r["relpath"]: r["reason"] for r in inv.rows if r["status"] == "quarantine"}
    released = {r["relpath"] for r in inv.rows if r["status"] == "ok"}
    assert released in ({"good/a.dcm"}, {"dup/a.dcm"}) and len(inv.rows) == len(reasons) + 1
    assert "2 different patients" in reasons["mixed/a.dcm"] and "2 different patients" in reasons["mixed/b.dcm"]
    assert "duplicate SOPInstanceUID" in (reasons.get("dup/a.dcm") or reasons["good/a.dcm"])
    assert "no PatientID" in reasons["noid/a.dcm"]
    assert reasons["empty.dcm"] == "zero-byte file"
    assert "unknown format" in reasons["junk.dcm"] and "unknown format" in reasons["notes.txt"]
    assert reasons["head.nii"].startswith("nifti1: ")
    assert "truncated" in reasons["trunc.dcm"] or "unreadable" in reasons["trunc.dcm"]
    assert "symbolic link" in reasons["link.dcm"]
    assert all("\n" not in r for r in reasons.values())


def test_cache_reuses_unchanged_rows(demo_input, tmp_path, monkeypatch):
    d, _ = demo_input
    ps = Pseudonymizer(KEY)
    restricted = tmp_path / "r"
    restricted.mkdir()
    first = inventory.build(d, ps)
    inventory.write(first, restricted)
    calls = []
    real = inventory._examine
    monkeypatch.setattr(inventory, "_examine", lambda *a: calls.append(a) or real(*a))
    again = inventory.build(d, ps, previous=restricted / "inventory.parquet")
    assert calls == []
    assert [r["out_relpath"] for r in again.rows] == [r["out_relpath"] for r in first.rows]


def test_write_is_stable_and_restricted(demo_input, tmp_path):
    d, _ = demo_input
    restricted = tmp_path / "r"
    restricted.mkdir(mode=0o700)
    inv = inventory.build(d, Pseudonymizer(KEY))
    inventory.write(inv, restricted)
    manifests = sorted((restricted / "manifests").iterdir())
    assert [m.stem for m in manifests] == inv.subjects
    mtimes = [m.stat().st_mtime_ns for m in manifests]
    inventory.write(inventory.build(d, Pseudonymizer(KEY)), restricted)
    assert [m.stat().st_mtime_ns for m in manifests] == mtimes  # unchanged content, untouched file
    for p in [restricted / "inventory.parquet", *manifests]:
        assert p.stat().st_mode & 0o777 == 0o600


def test_trust_centre_mapping_and_unmapped_patients(demo_input, tmp_path):
    from deidflow.pseudonym import load_mapping
    d, patients = demo_input
    f = tmp_path / "map.csv"
    f.write_text(f"id_old,id_new\n{patients[0].patient_id},TC0001\n")
    ps = Pseudonymizer(KEY, mapping=load_mapping(f))
    inv = inventory.build(d, ps, unmapped="quarantine")
    assert inv.subjects == ["sub-TC0001"]
    reasons = {r["reason"] for r in inv.rows if r["status"] == "quarantine"}
    assert reasons == {"PatientID not in the pseudonym mapping file"}
    inv = inventory.build(d, ps, unmapped="hmac")
    assert "sub-TC0001" in inv.subjects and len(inv.subjects) == len(patients)


def _gzip(src: Path, dst: Path) -> Path:
    import gzip
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, gzip.GzipFile(dst, "wb", mtime=0) as out:
        out.write(fin.read())
    return dst


def test_gzipped_dicom_is_read_and_other_archives_are_quarantined_with_their_reason(tmp_path):
    """Issue 20: .dcm.gz (and a .gz of any name with DICM inside) is DICOM with compression gzip,
    grouped like the plain file; zip/tar/7z/bzip2/xz archives and a gzip of anything else are
    quarantined saying what they are; a damaged gzip stream says so."""
    import tarfile
    import zipfile
    d = tmp_path / "in"
    plain = get_testdata_file("CT_small.dcm")
    _gzip(Path(plain), d / "a" / "ct.dcm.gz")
    _gzip(Path(get_testdata_file("MR_small.dcm")), d / "a" / "IM0001.gz")
    with zipfile.ZipFile(d / "b.zip", "w") as z:
        z.write(plain, "ct.dcm")
    with tarfile.open(d / "c.tar.gz", "w:gz") as t:
        t.add(plain, "ct.dcm")
    (d / "d.bz2").write_bytes(b"BZh91AY&SY" + bytes(40))
    (d / "e.xz").write_bytes(b"\xfd7zXZ\x00" + bytes(40))
    (d / "f.7z").write_bytes(b"7z\xbc\xaf\x27\x1c" + bytes(40))
    (tmp_path / "notes.txt").write_text("free text " * 50)
    _gzip(tmp_path / "notes.txt", d / "g.txt.gz")
    (d / "h.dcm.gz").write_bytes((d / "a" / "ct.dcm.gz").read_bytes()[:200])  # truncated stream
    assert sniff.sniff(d / "a" / "ct.dcm.gz") == "dicom" and sniff.is_gzip(d / "a" / "ct.dcm.gz")
    inv = inventory.build(d, Pseudonymizer(KEY))
    rows = {r["relpath"]: r for r in inv.rows}
    for rel in ("a/ct.dcm.gz", "a/IM0001.gz"):
        assert rows[rel]["status"] == "ok" and rows[rel]["compression"] == "gzip", rows[rel]
        assert rows[rel]["out_relpath"].endswith(".dcm") and not rows[rel]["out_relpath"].endswith(".gz")
    assert rows["a/ct.dcm.gz"]["patient_id"] == pydicom.dcmread(plain).PatientID
    reasons = {rel: r["reason"] for rel, r in rows.items() if r["status"] == "quarantine"}
    for rel, kind in (("b.zip", "zip"), ("c.tar.gz", "tar"), ("d.bz2", "bzip2"), ("e.xz", "xz"), ("f.7z", "7z"),
                      ("g.txt.gz", "gzip")):
        assert reasons[rel].startswith(f"{kind} archive: deidflow does not unpack archives"), (rel, reasons.get(rel))
    assert "h.dcm.gz" in reasons
    restricted = tmp_path / "restricted"
    inventory.write(inv, restricted)
    files = [f for m in (restricted / "manifests").glob("*.json")
             for s in __import__("json").loads(m.read_text())["subjects"] for f in s["files"]]
    assert sorted(f["relpath"] for f in files if f.get("compression") == "gzip") == ["a/IM0001.gz", "a/ct.dcm.gz"]


def test_decompressed_copy_is_private_and_removed(tmp_path):
    src = _gzip(Path(get_testdata_file("CT_small.dcm")), tmp_path / "x.dcm.gz")
    with sniff.decompressed(src, tmp_path) as plain:
        assert plain != src and plain.read_bytes() == Path(get_testdata_file("CT_small.dcm")).read_bytes()
        assert plain.stat().st_mode & 0o077 == 0
    assert not plain.exists()
    same = Path(get_testdata_file("CT_small.dcm"))
    with sniff.decompressed(same, tmp_path) as p:
        assert p == same
    bad = tmp_path / "bad.dcm.gz"
    bad.write_bytes(src.read_bytes()[:100])
    with pytest.raises(OSError, match="damaged gzip"):
        with sniff.decompressed(bad, tmp_path):
            pass
    assert not list(tmp_path.glob(".gunzip-*"))
