"""Run dcm2niix on one de-identified series folder and collect what it wrote.

dcm2niix comes from the pinned PyPI wheel (``dcm2niix`` package, binary inside) or, under
``--sdm conda``, from the environment's PATH.  Options: BIDS sidecar on, its own anonymisation on
(``-ba y``), no recursion, no compression (deidflow gzips with a fixed header so the same input
gives the same bytes whatever gzip or pigz the machine has).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import output_stream

BASENAME = "series"


class ConversionError(RuntimeError):
    """dcm2niix failed on a series (the message holds no identifying value)."""


@dataclass
class Output:
    """One image dcm2niix wrote for a series: ``series<tag>.nii`` (+ .json, .bval, .bvec)."""

    tag: str  # what dcm2niix appended to the base name: "", "_e2", "_ph", "_e2_ph", "a", "_i00001"…
    nifti: Path
    sidecar: dict = field(default_factory=dict)
    bval: Path | None = None
    bvec: Path | None = None

    @property
    def bvals(self) -> list[float]:
        if self.bval is None:
            return []
        return [float(x) for x in self.bval.read_text().split()]


def executable() -> str:
    """Path of the dcm2niix binary: the pinned wheel's, else the one on PATH."""
    try:
        import dcm2niix  # the PyPI wheel ships the binary inside the package
        if Path(dcm2niix.bin).is_file():
            return str(dcm2niix.bin)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if not found:
        raise ConversionError("dcm2niix not found: install the pinned 'dcm2niix' package (pip) or envs/dcm2niix.yaml")
    return found


def version() -> str:
    """dcm2niix's version string (``v1.0.20260724``)."""
    out = subprocess.run([executable(), "--version"], capture_output=True, text=True, check=False)
    for word in (out.stdout + out.stderr).split():
        if word.startswith("v1.") or word.startswith("v2."):
            return word
    return "unknown"


def convert_series(series_dir: Path, workdir: Path, *, log=None) -> list[Output]:
    """Convert the DICOM files directly in ``series_dir`` into ``workdir`` (created empty).

    Returns the images written, sorted by tag; an empty list when dcm2niix found nothing it can
    convert (SR documents, presentation states…).  Raises :class:`ConversionError` when dcm2niix
    itself fails."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    cmd = [executable(), "-b", "y", "-ba", "y", "-z", "n", "-d", "0", "-f", BASENAME, "-w", "2",
           "-o", str(workdir), str(series_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if log is not None:
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.strip():
                log.info("dcm2niix: %s", line.strip())
    if proc.returncode not in (0, 2):  # 2: no valid DICOM found
        raise ConversionError(f"dcm2niix exited with status {proc.returncode}")
    outputs = []
    for nii in sorted(workdir.glob(f"{BASENAME}*.nii")):
        stem = nii.name[:-len(".nii")]
        sidecar_path = nii.with_name(stem + ".json")
        # strict=False: dcm2niix copies ISO 2022 text with its escape sequences (control characters)
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8", errors="replace"),
                             strict=False) if sidecar_path.is_file() else {}
        bval, bvec = nii.with_name(stem + ".bval"), nii.with_name(stem + ".bvec")
        outputs.append(Output(stem[len(BASENAME):], nii, sidecar, bval if bval.is_file() else None,
                              bvec if bvec.is_file() else None))
    return _canonical_collision_tags(outputs)


_COLLISION = re.compile(r"^(.*?)([a-z]?)$")


def _canonical_collision_tags(outputs: list[Output]) -> list[Output]:
    """dcm2niix names a second image that would get an existing name ``<name>a``, a third
    ``<name>b``…, in the order it reads the files, which is the folder's directory order (creation
    order on tmpfs, a hash order on ext4). Re-letter each such family by the images' content hash,
    so the same series gives the same names on every file system and after every resume."""
    tags = {o.tag for o in outputs}
    families: dict[str, list[Output]] = {}
    for o in outputs:
        base, letter = _COLLISION.match(o.tag).groups()
        families.setdefault(base if letter and base in tags else o.tag, []).append(o)
    for base, members in families.items():
        if len(members) > 1:
            members.sort(key=_content_key)
            for i, o in enumerate(members):
                o.tag = base + ("" if i == 0 else chr(ord("a") + i - 1))
    return sorted(outputs, key=lambda o: o.tag)


def _content_key(o: Output) -> tuple[str, str]:
    """What an image is, independent of the order dcm2niix met it: its voxels and its sidecar."""
    return hashlib.sha256(o.nifti.read_bytes()).hexdigest(), json.dumps(o.sidecar, sort_keys=True)


def gzip_file(src: Path, dst: Path) -> None:
    """``src`` gzipped into ``dst`` with a fixed header (no name, mtime 0): same bytes every run.
    A NIfTI's description loses the time of day dcm2niix writes there (:func:`without_time_of_day`)."""
    with open(src, "rb") as fin, output_stream(dst, gz=True) as gz:
        gz.write(without_time_of_day(fin.read(_NIFTI2_SIZE)))
        shutil.copyfileobj(fin, gz, 1 << 20)


_NIFTI1_SIZE, _NIFTI2_SIZE = 348, 540
_DESCRIP = {_NIFTI1_SIZE: (148, 228), _NIFTI2_SIZE: (240, 320)}
_TIME = re.compile(rb"Time=[0-9.]*")


def without_time_of_day(head: bytes) -> bytes:
    """``head`` (the start of a NIfTI-1/2 file) with dcm2niix's ``Time=hhmmss.fff`` in the
    description field replaced by ``Time=0.000``: the conversion working copy keeps acquisition
    times for slice timing, and the time of day is not released unless the profile keeps it in the
    sidecar.  Other bytes are returned unchanged."""
    size = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
    if size not in _DESCRIP:
        size = int.from_bytes(head[:4], "big") if len(head) >= 4 else 0
    if size not in _DESCRIP or len(head) < _DESCRIP[size][1]:
        return head
    a, b = _DESCRIP[size]
    text = _TIME.sub(b"Time=0.000", head[a:b].split(b"\0")[0])[:b - a]
    return head[:a] + text.ljust(b - a, b"\0") + head[b:]
