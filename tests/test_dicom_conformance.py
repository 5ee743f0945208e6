"""Conformance (issue 15): de-identification introduces no new kind of error reported by
``dciodvfy`` (Debian package ``dicom3tools``) on the DICOM files in ../shared/data, compared with the
same file before de-identification — under the default profile, ``private: safe`` and the clean
options.  (Siemens XA writes the SR's Type 1 CompletionFlag with VR LO; it used to be dropped as a
VR mismatch.)  dicom3tools is installed with apt-get when missing and this is a root Debian machine."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from deidflow.dicom import Scrubber, SubjectContext
from deidflow.dicomio import deidentify_path
from deidflow.profile import build_plan
from deidflow.pseudonym import Pseudonymizer

from .conftest import TEST_KEY, debian_program, require_shared

FILES_PER_FOLDER = 2  # every series folder is represented; dciodvfy costs ~0.1 s per file
CONFIGS = {"default": {}, "private_safe": {"private": "safe"},
           "clean": {"options": ("clean_descriptors", "clean_structured_content", "clean_graphics")}}


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    return debian_program("dciodvfy", "dicom3tools", "dciodvfy comparison")


def shared_dicom_files() -> list[Path]:
    root = require_shared()
    by_folder: dict[Path, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size > 132:
            with open(p, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                by_folder.setdefault(p.parent, []).append(p)
    return [f for files in by_folder.values() for f in files[:FILES_PER_FOLDER]]


def error_kinds(exe: str, path: Path) -> set[str]:
    """dciodvfy's error lines with the values left out (a de-identified value differs, the kind of
    error does not)."""
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    out = set()
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("Error"):
            line = re.sub(r"Value=<[^>]*>", "Value=<>", line.strip())
            out.add(re.sub(r"\[\d+\]", "[]", line))
    return out


@pytest.mark.realdata
@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_new_dciodvfy_error_kinds(config, dciodvfy, tmp_path):
    require_shared()
    plan = build_plan(**CONFIGS[config])
    files = shared_dicom_files()
    assert len(files) >= 20
    new: dict[str, set[str]] = {}
    for i, src in enumerate(files):
        scrubber = Scrubber(plan, SubjectContext(Pseudonymizer(TEST_KEY.encode()), "sub-conf", -10))
        dst = tmp_path / f"{i}.dcm"
        try:
            deidentify_path(src, dst, scrubber)
        except Exception:  # quarantined files are withheld, not released: nothing to validate
            continue
        added = error_kinds(dciodvfy, dst) - error_kinds(dciodvfy, src)
        if added:
            new[src.relative_to(require_shared()).as_posix()] = added
    assert not new, new
