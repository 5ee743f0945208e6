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


def _constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.lower().replace("_", "-")] = version
    return out


def test_core_env_covers_package_dependencies():
    """Every dependency comes from conda at the locked version, or from pip under constraints.txt."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs" / "core.yaml").read_text())
    conda = _conda_deps(env)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-c ../constraints.txt" in pip
    locked = _constraints()
    for d in deps:
        name = re.split(r"[<>=!~ \[]", d)[0].lower()
        assert CONDA_NAME.get(name, name) in conda or name in locked, f"envs/core.yaml lacks {name}"


def test_pins_agree_with_the_lock():
    """constraints.txt is the one list of exact versions: the conda pins of envs/*.yaml match it
    and the library's metadata keeps ranges, never exact pins."""
    locked = _constraints()
    conda_to_pypi = {v: k for k, v in CONDA_NAME.items()} | {"pytorch": "torch"}
    for f in (ROOT / "envs").glob("*.yaml"):
        env = yaml.safe_load(f.read_text())
        for name, version in _conda_deps(env).items():
            pypi = conda_to_pypi.get(name, name)
            if pypi in locked:
                assert (locked[pypi] + ".").startswith(version + "."), f"{f.name}: {name}={version}, lock {locked[pypi]}"
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert "-c ../constraints.txt" in pip, f"{f.name}: pip part ignores the lock"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for d in project["dependencies"] + [x for extra in project["optional-dependencies"].values() for x in extra]:
        assert "==" not in d, f"exact pin in the package metadata: {d}"


def test_core_env_installs_the_package():
    """Rules run `python -m deidflow.jobs`: the env must install deidflow itself (via pip)."""
    env = yaml.safe_load((ROOT / "envs" / "core.yaml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert pip and any("deidflow" in x for x in pip[0]["pip"])
    for smk in (ROOT / "rules").glob("*.smk"):
        for cmd in re.findall(r"-m (\S+) ", smk.read_text()):
            assert cmd == "deidflow.jobs", f"{smk.name} runs {cmd}"
