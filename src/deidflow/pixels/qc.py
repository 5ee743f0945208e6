"""QC artefacts of the pixel step, per subject.

The *after* thumbnail (redacted frame, boxes outlined) goes into the release under
``<release>/derivatives/deidflow/qc/<subject>/pixels/``, listed in that folder's ``index.json``
(``[{"file", "caption", "kind": "pixels_before_after"}]``).  The *before* thumbnail shows the
burned-in PHI, so it goes only to the restricted folder (``<restricted>/qc/<subject>/pixels/``,
with its own ``index.json`` whose entries also name the released ``after`` file).  Both folders
are written in staging and published in one rename, like the subject's DICOM.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import os

from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_bytes, make_restricted_dir, publish_dir
from ..qc import captions
from .clean import Outcome

KIND = "pixels_before_after"


def _stem(release_name: str) -> str:
    """``sub-X/ses-Y/US1-x/0001.dcm`` → ``ses-Y_US1-x_0001`` (pseudonymous parts only)."""
    parts = release_name.split("/")[1:]
    stem = "_".join(parts)
    return stem[:-4] if stem.lower().endswith(".dcm") else stem


@dataclass
class SubjectPixelsQC:
    subject: str
    entries: list[tuple[str, Outcome]] = field(default_factory=list)

    def add(self, release_name: str, outcome: Outcome) -> None:
        if outcome.after_png is not None:
            self.entries.append((release_name, outcome))

    def publish(self, release_qc_root: Path, restricted: Path) -> None:
        """Write (or remove, when there is nothing to show) both thumbnail folders."""
        release_final = Path(release_qc_root) / self.subject / "pixels"
        restricted_final = Path(restricted) / "qc" / self.subject / "pixels"
        if not self.entries:
            for p in (release_final, restricted_final):
                if p.exists():
                    shutil.rmtree(p)
            return
        public, private = [], []
        make_restricted_dir(restricted_final.parent)
        stage_pub = self._stage(release_final, restricted, "release")
        stage_priv = self._stage(restricted_final, restricted, "restricted")
        try:
            for name, out in sorted(self.entries, key=lambda e: e[0]):
                stem = _stem(name)
                n = len(out.redactions)
                frames = len({r.frame for r in out.redactions})
                caption = captions.PIXELS.format(image=name, boxes=n, frames=frames, total=out.frames, action=out.action)
                atomic_write_bytes(stage_pub / f"{stem}_after.png", out.after_png)
                atomic_write_bytes(stage_priv / f"{stem}_before.png", out.before_png, RESTRICTED_FILE_MODE)
                public.append({"file": f"{stem}_after.png", "caption": caption, "kind": KIND})
                private.append({"file": f"{stem}_before.png", "after": f"{stem}_after.png",
                                "caption": caption, "kind": KIND})
            atomic_write_bytes(stage_pub / "index.json", (json.dumps(public, indent=1) + "\n").encode())
            atomic_write_bytes(stage_priv / "index.json", (json.dumps(private, indent=1) + "\n").encode(),
                               RESTRICTED_FILE_MODE)
            stage_priv.chmod(0o700)
            publish_dir(stage_priv, restricted_final)
            publish_dir(stage_pub, release_final)
        except BaseException:
            shutil.rmtree(stage_pub, ignore_errors=True)
            shutil.rmtree(stage_priv, ignore_errors=True)
            raise

    def _stage(self, final: Path, restricted: Path, tag: str) -> Path:
        """A fresh staging folder for ``final``, named for the subject (jobs run in parallel),
        inside the restricted folder when on the same file system, else beside ``final``."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_root = make_restricted_dir(Path(restricted) / "tmp")
        base = tmp_root if os.stat(tmp_root).st_dev == os.stat(final.parent).st_dev else final.parent
        stage = base / f".staging-qc-{self.subject}-{tag}"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        return stage
