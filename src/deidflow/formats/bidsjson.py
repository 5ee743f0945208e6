"""BIDS JSON sidecars that arrive with the input, scrubbed by the same code as the sidecars the
``convert`` stage writes (:func:`deidflow.sidecar.scrub_sidecar`: an allow-list of fields, the
profile options, the subject's date offset, keyed UIDs).

Only a JSON object beside an image of a supported format with the same name (``x.json`` next to
``x.nii.gz``, ``x.hdr``, ``x.mnc``, ``x.mgz``, ``x.PAR``) is a sidecar; the inventory pairs them and
the sidecar is released next to its image under the image's pseudonymous name.  Any other JSON
(annotations, inherited BIDS files, unrelated exports) is quarantined, never released.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import Format, FormatError, Outputs, ScrubContext, ScrubResult

MAX_JSON_BYTES = 16 << 20


def _load(path: Path) -> dict:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise FormatError("JSON larger than 16 MiB (not a sidecar)")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError("JSON text does not parse") from None
    if not isinstance(data, dict):
        raise FormatError("JSON is not an object (not a BIDS sidecar)")
    return data


def identity(path: Path) -> dict:
    data = _load(Path(path))
    out = {}
    for field, key in (("PatientID", "patient_id"), ("PatientName", "patient_name"),
                       ("PatientBirthDate", "birth_date")):
        v = data.get(field)
        if isinstance(v, str) and v.strip():
            out[key] = v.strip()
    return out


def companions(path: Path) -> list[Path]:
    return []


def extension(path: Path) -> str:
    return ".json"


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    from ..sidecar import scrub_sidecar, sidecar_text
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    data = _load(src)
    try:
        new, actions = scrub_sidecar(data, options=ctx.settings.get("options") or (),
                                     date_offset_days=ctx.date_offset if ctx.date_policy == "shift" else None,
                                     uid=ctx.pseudo.uid, identifiers=list(ctx.known))
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"sidecar could not be scrubbed ({type(exc).__name__})") from None
    for field, code in actions.items():
        res.act(field, code)
        v = data.get(field)
        if code != "K" and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            res.found(field, v)
    with Outputs() as out:
        with open(out.path(dst), "w", encoding="utf-8") as fo:
            fo.write(sidecar_text(new))
        res.outputs = out.finals
    return res


FORMAT = Format(name="json", release_dir="bids", identity=identity, companions=companions, scrub=scrub,
                extension=extension)
