"""Configuration: defaults from the workflow's config.yaml, validation against schema.yaml,
and the derived paths and profile settings every stage needs."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
import yaml

def _workflow_dir() -> Path:
    """The folder holding the Snakefile: the clone's top level (a development checkout, an
    editable install) or the copy a wheel carries as ``deidflow/workflow`` (see setup.py)."""
    here = Path(__file__).resolve().parent
    clone = here.parents[1]
    if (clone / "Snakefile").is_file() and (clone / "src" / "deidflow").is_dir():
        return clone
    return here / "workflow"


WORKFLOW_DIR = _workflow_dir()
SNAKEFILE = WORKFLOW_DIR / "Snakefile"
DEFAULT_CONFIG = WORKFLOW_DIR / "config" / "config.yaml"
SCHEMA = WORKFLOW_DIR / "config" / "schema.yaml"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def workflow_files_present() -> bool:
    return SNAKEFILE.is_file() and DEFAULT_CONFIG.is_file()


def load_defaults() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def deep_update(base: dict, extra: Mapping) -> dict:
    """Merge ``extra`` into ``base`` recursively (dicts merge, everything else replaces)."""
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def parse_set(pairs: Iterable[str]) -> dict:
    """``["dicom.private=safe", "profile.options=[clean_descriptors]"]`` → nested dict (YAML values)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def validate(config: dict, *, semantics: bool = True) -> dict:
    """Validate ``config`` against schema.yaml (no defaults filled) and, with ``semantics``, the
    profile rules (option conflicts, override attributes); raise ConfigError naming the key.
    The Snakefile runs the semantic check at parse time, so the CLI can skip its import cost."""
    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where}: {e.message}")
    if semantics:
        _check_semantics(config)
    return config


def effective_profile(config: Mapping[str, Any]) -> tuple[list[str], str]:
    """(options, private policy) after ``profile.preset`` (:func:`deidflow.profile.apply_preset`)."""
    from .profile import apply_preset
    return apply_preset(config["profile"].get("preset", "basic"), config["profile"]["options"],
                        config["dicom"]["private"])


def _check_semantics(config: dict) -> None:
    from .profile import build_plan
    try:
        options, private = effective_profile(config)
        build_plan(options, private, config["dicom"]["overrides"])
    except ValueError as exc:
        raise ConfigError(f"config key profile/dicom: {exc}") from None
    lo, hi = config["pseudonym"]["date_offset_days"]
    if lo > hi:
        raise ConfigError("config key pseudonym.date_offset_days: first value must not exceed the second")
    if config["pseudonym"].get("mapping_csv"):
        from .pseudonym import load_mapping  # a bad table is the user's mistake (exit 2), not a parse crash
        try:
            load_mapping(config["pseudonym"]["mapping_csv"])
        except (ValueError, OSError) as exc:
            raise ConfigError(f"config key pseudonym.mapping_csv: {getattr(exc, 'strerror', None) or exc}") from None
    if config.get("pixels"):
        from .pixels.policy import check_config  # bad tables or a missing OCR package fail here
        try:
            check_config(config["pixels"])
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f"config key pixels: {exc}") from None
    if (config.get("bids") or {}).get("mapping"):
        from .bids.heuristic import rules_for  # a bad user rule fails here, not at parse time
        try:
            rules_for(config["bids"]["mapping"])
        except ValueError as exc:
            raise ConfigError(f"config key {exc}") from None
    if config.get("face"):  # the face stage runs for BIDS images and for NIfTI/Analyze/MGH inputs
        from .face.backends import check_config  # a missing optional backend fails here, not in a job
        try:
            check_config(config["face"])
        except ValueError as exc:
            raise ConfigError(f"config key {exc}") from None


@dataclass(frozen=True)
class Paths:
    input: Path
    output: Path
    restricted: Path


def resolve_paths(config: Mapping[str, Any], base: Path | None = None) -> Paths:
    """Absolute input, release and restricted folders; checks they do not nest."""
    base = Path(base or os.getcwd())
    inp = (base / config["input"]).resolve()
    out = (base / config["output"]).resolve()
    restricted = (base / config["restricted"]).resolve() if config.get("restricted") else out.with_name(out.name + "_restricted")
    for a, b, what in ((out, inp, "output"), (restricted, inp, "restricted"), (inp, out, "input"),
                       (restricted, out, "restricted"), (out, restricted, "output")):
        if a == b or b in a.parents:
            raise ConfigError(f"config key {what}: {a} must not be inside or equal to {b}")
    return Paths(inp, out, restricted)


def clean_mode(value) -> str:
    """``pixels.clean`` as a word (YAML reads a bare ``off`` as false; missing: off)."""
    return "off" if value in (None, False, "off") else str(value)


def profile_settings(config: Mapping[str, Any]) -> dict:
    """Everything a de-identification job needs besides its manifest (no secrets, no PHI)."""
    options, private = effective_profile(config)
    return {
        "preset": config["profile"].get("preset", "basic"),
        "options": sorted(options),
        "private": private,
        "overrides": list(config["dicom"]["overrides"]),
        "pseudonym_length": config["pseudonym"]["length"],
        "date_offset_days": list(config["pseudonym"]["date_offset_days"]),
        "mapping_csv": config["pseudonym"]["mapping_csv"] or "",
        "key_file": config.get("key_file") or "",
        "pixels": {**(config.get("pixels") or {}), "clean": clean_mode((config.get("pixels") or {}).get("clean"))},
    }
