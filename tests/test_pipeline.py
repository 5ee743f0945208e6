"""Parse-time preparation (deidflow.pipeline): the inventory started ahead in a forked child gives
the Snakefile exactly what preparing in-process gives, and its failures surface as the same errors."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from deidflow import pipeline
from deidflow.settings import deep_update, load_defaults


def _config(src: Path, out: Path, **extra) -> dict:
    return deep_update(load_defaults(), {"input": str(src), "output": str(out), **extra})


def _written(restricted: Path) -> dict[str, str]:
    """Digest of every file prepare() wrote (inventory, manifests, mappings, key fingerprint)."""
    return {str(p.relative_to(restricted)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(restricted.rglob("*")) if p.is_file()}


def test_prepared_ahead_equals_prepared_in_process(demo_export, tmp_path, key_env):
    plain = pipeline.prepare(_config(demo_export, tmp_path / "a" / "rel"))
    ahead_cfg = _config(demo_export, tmp_path / "b" / "rel")
    pipeline.prepare_ahead(ahead_cfg)
    ahead = pipeline.prepare(ahead_cfg)
    assert pipeline._ahead is None  # taken once; the next prepare() works in-process again
    assert (ahead.subjects, ahead.units, ahead.unit_formats, ahead.fingerprint) == (
        plain.subjects, plain.units, plain.unit_formats, plain.fingerprint)
    assert plain.subjects and _written(tmp_path / "a" / "rel_restricted") == _written(tmp_path / "b" / "rel_restricted")


def test_failure_ahead_is_raised_by_prepare(demo_export, tmp_path, key_env, monkeypatch):
    cfg = _config(demo_export, tmp_path / "rel")
    pipeline.prepare(cfg)
    monkeypatch.setenv("DEIDFLOW_KEY", "another-key-0123456789abcdef")  # the release was made with the test key
    pipeline.prepare_ahead(cfg)
    with pytest.raises(pipeline.ReleaseKeyMismatch, match="fingerprint"):
        pipeline.prepare(cfg)
    assert pipeline._ahead is None


def test_other_configuration_ahead_is_prepared_again(demo_export, tmp_path, key_env):
    """The Snakefile's configuration differs from the one prepared ahead (here: one job per subject
    instead of batches): prepare() waits for the child, then prepares what it was asked."""
    ahead_cfg = _config(demo_export, tmp_path / "rel")
    pipeline.prepare_ahead(ahead_cfg)
    cfg = _config(demo_export, tmp_path / "rel", jobs={"files_per_job": 0})
    got = pipeline.prepare(cfg)
    assert sorted(got.units) == got.subjects  # one unit per subject, named by its pseudonym
    assert all(u.startswith("batch-") for u in pipeline.prepare(ahead_cfg).units)  # what the child planned


def test_pending_child_is_settled_before_another_starts(demo_export, tmp_path, key_env):
    """Snakemake can stop before it reads the Snakefile (bad arguments): the child is reaped, and a
    second prepare_ahead waits for a pending one rather than letting two write at once."""
    cfg = _config(demo_export, tmp_path / "rel")
    pipeline.prepare_ahead(cfg)
    first = pipeline._ahead[0]
    pipeline.prepare_ahead(cfg)
    with pytest.raises(ChildProcessError):
        os.waitpid(first, os.WNOHANG)  # already reaped
    assert pipeline.settle_ahead() == pipeline._prepared_from(cfg)
    assert pipeline._ahead is None and pipeline.settle_ahead() is None
