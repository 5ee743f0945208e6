"""Shared fixtures. Real data lives in ../shared/data: missing in CI is an error, elsewhere a skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
TEST_KEY = "deidflow-test-key-0123456789abcdef"


def require_shared(*parts: str) -> Path:
    """Path under ../shared/data; fails in CI (CI=true) and skips elsewhere when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        msg = f"real test data {path} is missing (../shared/data must sit beside the clone)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared_data():
    return require_shared


@pytest.fixture
def key_env(monkeypatch):
    """A fixed secret key in $DEIDFLOW_KEY."""
    monkeypatch.setenv("DEIDFLOW_KEY", TEST_KEY)
    return TEST_KEY.encode()
