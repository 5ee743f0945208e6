"""The backends of the face stage behind one interface, and what each needs to run.

Every backend has ``removal_mask(volume) -> bool array`` (RAS, True = set to zero): for defacing
the face region, for skull-stripping everything outside the brain. A backend that registers a
template (``ants``) also has ``registration(data, affine, modality) -> HeadRegistration``: one
registration per head, whose ``mask_for(shape, affine)`` gives the removed region on any grid of
that head (every series in its frame of reference; see :mod:`.ants_deface`). :func:`check_backend` runs at
config validation, before any job, and names the install command of a missing optional backend.
"""
from __future__ import annotations

import importlib.util
from typing import Protocol

import numpy as np

from .volume import Volume

METHODS = ("deface", "skullstrip", "none")
BACKENDS = {  # name -> methods it implements
    "ants": ("deface",),
    "quickshear": ("deface",),
    "deepbet": ("skullstrip",),
    "external": ("deface", "skullstrip"),
}
_NEEDS = {  # name -> (python modules, install command)
    "ants": (("ants", "pydeface"), "pip install deidflow (antspyx and pydeface are core dependencies)"),
    "quickshear": (("deepbet", "torch"), "pip install 'deidflow[deepbet]'"),
    "deepbet": (("deepbet", "torch"), "pip install 'deidflow[deepbet]'"),
    "external": (("nipype",), "pip install nipype"),
}


class Backend(Protocol):
    name: str
    methods: tuple[str, ...]

    def removal_mask(self, vol: Volume) -> np.ndarray: ...


class BackendUnavailable(RuntimeError):
    """A configured backend cannot run here; the message says how to install it."""


def check_backend(name: str, method: str, program: str | None = None) -> None:
    """Raise :class:`BackendUnavailable` unless ``name`` can do ``method`` here (cheap: no imports)."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown face backend {name!r} (known: {', '.join(BACKENDS)})")
    if method not in BACKENDS[name]:
        raise BackendUnavailable(f"backend {name!r} cannot {method} (it does: {', '.join(BACKENDS[name])})")
    modules, install = _NEEDS[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"backend {name!r} needs {', '.join(missing)}, not installed: {install}")
    if name == "ants":
        from .ants_deface import template_files_present
        if not template_files_present():
            raise BackendUnavailable("backend 'ants' needs its template data (deidflow/data/face_template.npz): "
                                     "reinstall deidflow")
    if name == "external":
        from .external import PROGRAMS, missing_reason
        if program is None or PROGRAMS.get(program, (None,))[0] != method:
            raise BackendUnavailable(f"backend 'external' needs a program that can {method}: "
                                     + ", ".join(p for p, (m, _) in PROGRAMS.items() if m == method))
        reason = missing_reason(program)
        if reason:
            raise BackendUnavailable(reason)


def get_backend(name: str, program: str | None = None) -> Backend:
    """An instance of backend ``name`` (imports its libraries)."""
    if name == "ants":
        from .ants_deface import AntsDeface
        return AntsDeface()
    if name == "deepbet":
        from .deepbet_strip import DeepbetStrip
        return DeepbetStrip()
    if name == "quickshear":
        from .quickshear import Quickshear
        return Quickshear()
    if name == "external":
        from .external import External
        return External(program or "")
    raise BackendUnavailable(f"unknown face backend {name!r}")


def check_config(face_cfg) -> None:
    """Config validation (parse time): every backend the ``face`` block can use must be available.
    Raises ``ValueError('face.<key>: reason')`` naming the key and the install command."""
    import re
    try:
        re.compile(face_cfg["select"]["description_pattern"])
    except re.error as exc:
        raise ValueError(f"face.select.description_pattern: not a regular expression ({exc})") from None
    sel = face_cfg["select"]
    if sel.get("min_extent_mm", 0) >= sel.get("max_extent_mm", float("inf")):
        # no volume could be a head: every face would be released as it is (a typo: 600 for 60)
        raise ValueError(f"face.select.min_extent_mm: {sel['min_extent_mm']} is not below face.select.max_extent_mm "
                         f"({sel['max_extent_mm']}): no volume could be selected for the face step")
    used = {face_cfg["method"], *face_cfg.get("by_suffix", {}).values()} - {"none"}
    for method in sorted(used):
        key = f"face.{method}_backend"
        name = face_cfg[f"{method}_backend"]
        try:
            check_backend(name, method, face_cfg.get("external", {}).get(method))
        except BackendUnavailable as exc:
            raise ValueError(f"{key}: {exc}") from None
