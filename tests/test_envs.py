"""Conda environments: they parse, are pinned, and name what the rules import."""
from __future__ import annotations

import re
import tomllib

import yaml

from .conftest import ROOT

CONDA_NAME = {"snakemake": "snakemake-minimal"}  # PyPI name -> conda-forge/bioconda name


def _conda_deps(env: dict) -> dict[str, str]:
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, _, version = dep.partition("=")
            out[name] = version
    return out


def test_every_rule_names_an_existing_env():
    for smk in (ROOT / "rules").glob("*.smk"):
        text = smk.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, re.M))
        envs = re.findall(r'conda:\s*\n\s*"([^"]+)"', text)
        assert len(envs) == n_rules, f"{smk.name}: every rule needs conda:"
        for e in envs:
            assert (smk.parent / e).resolve().is_file(), e


def test_envs_parse_and_are_pinned():
    for f in (ROOT / "envs").glob("*.yaml"):
        env = yaml.safe_load(f.read_text())
        assert "conda-forge" in env["channels"]
        for name, version in _conda_deps(env).items():
            assert version, f"{f.name}: {name} is not pinned"


def test_core_env_covers_package_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = _conda_deps(yaml.safe_load((ROOT / "envs" / "core.yaml").read_text()))
    for d in deps:
        name = re.split(r"[<>=!~ \[]", d)[0].lower()
        assert CONDA_NAME.get(name, name) in conda, f"envs/core.yaml lacks {name}"


def test_core_env_installs_the_package():
    """Rules run `python -m deidflow.jobs`: the env must install deidflow itself (via pip)."""
    env = yaml.safe_load((ROOT / "envs" / "core.yaml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert pip and any("deidflow" in x for x in pip[0]["pip"])
    for smk in (ROOT / "rules").glob("*.smk"):
        for cmd in re.findall(r"-m (\S+) ", smk.read_text()):
            assert cmd == "deidflow.jobs", f"{smk.name} runs {cmd}"
