"""Philips PAR/REC: the PAR text header is rewritten line by line; the REC is copied byte for byte.

Rules for the PAR lines (``.    Name   :   value`` in the general-information block and
``# Dataset name:`` in the preamble):

* ``Patient name`` → the subject pseudonym;
* ``Examination name`` → emptied (cleaned of identifiers with ``clean_descriptors``);
* ``Protocol name`` → cleaned of the patient's identifiers and generic identifier patterns
  (dates, long digit runs, person-name strings); it names the sequence, which analyses need;
* ``Examination date/time`` → the date is removed (``retain_long_modified_dates``: shifted by the
  subject's offset; ``retain_long_full_dates``: kept); the time of day is kept;
* ``# Dataset name:`` (the export path, which usually holds the patient's name) → the subject
  pseudonym;
* comment lines are cleaned of the patient's identifiers and generic identifier patterns (dates,
  digit runs: an export's note "MRN 5455565 born 23.04.1961"; Philips' own comment lines hold none);
* every other line (acquisition parameters, the image table) is kept, with the patient's own
  identifiers (name and its parts) removed wherever they still occur.

nibabel parses the header (``PARRECHeader``, not permitting truncated acquisitions) and the
REC must hold exactly the bytes the PAR describes; anything else is a quarantine reason.
Line endings (CRLF in Philips exports) are kept.
"""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

from .base import Format, FormatError, Outputs, ScrubContext, ScrubResult

MAX_PAR_BYTES = 16 << 20
_LINE = re.compile(r"^(\.\s+)([^:]*?)(\s*:\s*)(.*?)(\s*)$")
_EXAM_DT = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})(\s*/\s*.*)?$")


def _read(path: Path) -> str:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_PAR_BYTES + 1)
    if len(raw) > MAX_PAR_BYTES:
        raise FormatError("PAR header larger than 16 MiB")
    return raw.decode("latin-1")


def _header(text: str):
    import nibabel.parrec as pr
    try:
        return pr.PARRECHeader.from_fileobj(io.StringIO(text))
    except Exception as exc:  # PARRECError, ValueError, IndexError... for damaged headers
        first = str(exc).splitlines()[0][:120] if isinstance(exc, pr.PARRECError) else type(exc).__name__
        raise FormatError(f"PAR header rejected by nibabel: {first}") from None


def _general(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.setdefault(m.group(2).strip().lower(), m.group(4).strip())
    return out


def identity(path: Path) -> dict:
    """Patient name (also the grouping identity: PAR has no patient ID) and examination date."""
    text = _read(Path(path))
    _header(text)
    g = _general(text)
    out = {}
    name = g.get("patient name", "")
    if name:
        out["patient_name"] = name
        out["patient_id"] = name
    m = _EXAM_DT.match(g.get("examination date/time", ""))
    if m:
        out["study_date"] = m.group(1) + m.group(2) + m.group(3)
    return out


def _rec_of(path: Path) -> Path | None:
    for ext in (".REC", ".rec", ".Rec"):
        p = path.with_suffix(ext)
        if p.exists():
            return p
    return None


def companions(path: Path) -> list[Path]:
    rec = _rec_of(Path(path))
    if rec is None:
        raise FormatError("PAR header without its REC image file")
    return [rec]


def extension(path: Path) -> str:
    return ".par"


def _expected_rec_bytes(hdr) -> int:
    import numpy as np
    shape = hdr.get_data_shape()
    return int(np.prod(shape)) * hdr.get_data_dtype().itemsize


def scrub(src: Path, dst: Path, ctx: ScrubContext) -> ScrubResult:
    src, dst = Path(src), Path(dst)
    res = ScrubResult()
    text = _read(src)
    hdr = _header(text)
    rec = _rec_of(src)
    if rec is None:
        raise FormatError("PAR header without its REC image file")
    want, have = _expected_rec_bytes(hdr), rec.stat().st_size
    if have < want:
        raise FormatError(f"truncated REC: {have} of {want} bytes the PAR describes")
    if have > want:
        raise FormatError(f"REC holds {have} bytes, more than the {want} the PAR describes")
    g = _general(text)
    own = [v for k, v in g.items() if k in ("patient name",) and v]
    lines_out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        eol = line[len(body):]
        lines_out.append(_line(body, ctx, res, own) + eol)
    new = "".join(lines_out)
    with Outputs() as out:
        with open(out.path(dst), "wb") as fo:
            fo.write(new.encode("latin-1"))
        with open(rec, "rb") as fi, open(out.path(ctx.companion_path(dst, ".rec")), "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 22)
        res.outputs = out.finals
    return res


def _line(body: str, ctx: ScrubContext, res: ScrubResult, own: list[str]) -> str:
    if body.startswith("#") and "dataset name" in body.lower():
        i = body.lower().index("dataset name")
        j = body.find(":", i)
        if j >= 0 and body[j + 1:].strip():
            res.found("Dataset name", body[j + 1:].strip())
            res.act("Dataset name", "replaced")
            return body[:j + 1] + " " + ctx.subject
        return body
    if body.startswith("#"):  # Philips' comments are its own template: other text in them is an export's
        cleaned = ctx.clean(body, own)
        if cleaned != body:
            res.act("comments", "cleaned")
        return cleaned
    m = _LINE.match(body)
    if not m:
        return _without_own(body, ctx, own)
    lead, name, sep, value, trail = m.groups()
    key = name.strip().lower()
    if not value:
        return body
    if key == "patient name":
        res.found("Patient name", value)
        res.act("Patient name", "replaced")
        value = ctx.subject
    elif key == "examination name":
        res.found("Examination name", value)
        if ctx.option("clean_descriptors"):
            value = ctx.clean(value, own)
            res.act("Examination name", "cleaned")
        else:
            value = ""
            res.act("Examination name", "emptied")
    elif key == "protocol name":
        cleaned = ctx.clean(value, own)
        if cleaned != value:
            res.found("Protocol name", value)
        res.act("Protocol name", "cleaned")
        value = cleaned
    elif key == "examination date/time":
        res.found("Examination date/time", value)
        dm = _EXAM_DT.match(value)
        new = ctx.date("".join(dm.group(1, 2, 3))) if dm else None
        time_part = (dm.group(4) or "") if dm else ""
        if new:
            value = f"{new[:4]}.{new[4:6]}.{new[6:]}{time_part}"
            res.act("Examination date/time", "shifted" if ctx.date_policy == "shift" else "kept")
        else:
            value = time_part.lstrip(" /")
            value = f"/ {value}" if value else ""
            res.act("Examination date/time", "date removed")
    else:
        return _without_own(body, ctx, own)
    return lead + name + sep + value + trail


def _without_own(body: str, ctx: ScrubContext, own: list[str]) -> str:
    return ctx.identifier_model(own).redact_text(body, same_length=True)


FORMAT = Format(name="parrec", release_dir="parrec", identity=identity, companions=companions, scrub=scrub,
                extension=extension)
