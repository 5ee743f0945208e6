"""De-identification of every non-DICOM format: one module per format, one interface.

Each format module (``nifti``, ``analyze``, ``mgh``, ``minc1``, ``minc2``, ``parrec``, ``twix``,
``bidsjson``; ``tiff`` for whole-slide images) provides a :class:`~deidflow.formats.base.Format`
object registered under the format names of :mod:`deidflow.sniff`::

    from deidflow import formats
    fmt = formats.get("nifti1")            # KeyError for a format nothing handles
    ident = fmt.identity(path)             # {"patient_id": ..., "patient_name": ..., ...}; raises FormatError
    comps = fmt.companions(path)           # [Path of .img / .REC / ...] that travel with ``path``
    res = fmt.scrub(src, dst, ctx)         # writes dst (and dst-stem companions); ScrubResult

Contract (every module keeps it, :mod:`deidflow.formats.base` has the types):

* ``identity(path) -> dict`` reads only the header.  Keys (all optional, strings):
  ``patient_id``, ``patient_name``, ``birth_date`` (YYYYMMDD), ``study_date`` (YYYYMMDD),
  ``study_uid``.  Used for subject assignment (``patient_id``, else ``patient_name``) and by
  the leak scan.  Raises :class:`FormatError` when the header cannot be read.
* ``companions(path) -> list[Path]``: the files that belong to ``path`` and are written by its
  ``scrub`` (Analyze/NIfTI-pair ``.img``, PAR ``.REC``).  Missing companions raise FormatError.
* ``scrub(src, dst, ctx) -> ScrubResult`` writes ``dst`` and each companion at
  ``dst`` with the companion's extension (``ctx.companion_path``), atomically (temporary name +
  rename) and deterministically (same key and input: same bytes).  Image bytes are never
  changed; headers are edited in place with equal-length values wherever the format allows.
  Raises FormatError (a one-line reason, no original value in it) for damaged input; nothing
  is left at ``dst`` then.
* :class:`ScrubResult` ``actions`` maps each header field to what was done (``removed``,
  ``emptied``, ``replaced``, ``shifted``, ``kept``, ``cleaned``) — never a value — and goes
  to the restricted audit; ``identifiers`` maps field names to the original identifying values
  found, which the leak scan (QC) searches for; it is written only to the restricted folder.
"""
from __future__ import annotations

import importlib

from .base import Format, FormatError, ScrubContext, ScrubResult

# sniff.py format name -> module defining FORMAT
_MODULES = {
    "nifti1": "nifti", "nifti2": "nifti", "analyze": "nifti", "mgh": "mgh",
    "minc1": "minc", "minc2": "minc", "parrec": "parrec", "twix": "twix",
    "json": "bidsjson", "tiff": "tiff",
}
# Formats that are only ever companions of another file (handled by its scrub).
COMPANION_FORMATS = {"img", "rec"}
# Formats holding image volumes nibabel reads (screened for burned-in text, defaced).
VOLUME_FORMATS = ("nifti1", "nifti2", "analyze", "mgh", "minc1", "minc2", "parrec")


def get(name: str) -> Format:
    """The :class:`Format` handling sniff format ``name``; KeyError when there is none (yet)."""
    mod = _MODULES.get(name)
    if mod is None:
        raise KeyError(name)
    try:
        module = importlib.import_module(f"{__name__}.{mod}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{mod}":
            raise KeyError(name) from None
        raise
    return module.FORMATS[name] if hasattr(module, "FORMATS") else module.FORMAT


def supported(name: str) -> bool:
    """Whether a format module for ``name`` is installed."""
    try:
        get(name)
    except KeyError:
        return False
    return True


__all__ = ["Format", "FormatError", "ScrubContext", "ScrubResult", "get", "supported", "COMPANION_FORMATS",
           "VOLUME_FORMATS"]
