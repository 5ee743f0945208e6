"""Kept, changed and removed DICOM attributes across a release, for the QC report.

Changed and removed attributes come from the audit (every file, see :func:`deidflow.qc.audit.scan`).
What was *kept* is read from the released files themselves: one file per series folder (the
files of a series share their header layout), counted for every file of that series.  Private
tags are named by their creator and pydicom's private dictionary; creators of removed private
blocks are read from the original file of each sampled series (read-only).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .audit import AuditFacts

PER_KIND = 100  # series read for the kept attributes per kind of object (SOP class, modality) ...
MAX_SERIES = 500  # ... and in all (evenly spread when there are more)
MAX_ORIGINALS = 50  # originals read for private creators once every removed block has one
TEXT_VRS = frozenset({"AE", "AS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})
_TAG = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")


def _tag_label(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _private_name(tag: int, creator: str) -> str:
    from pydicom.datadict import private_dictionary_description
    try:
        return private_dictionary_description(tag, creator) if creator else ""
    except KeyError:
        return ""


def _creators_of(ds) -> dict[int, str]:
    """(group << 8 | block) -> private creator, for one dataset level (only the creator elements
    are decoded)."""
    out = {}
    for t in ds.keys():
        t = int(t)
        if t >> 16 & 1 and 0x10 <= t & 0xFFFF <= 0xFF:
            try:
                out[((t >> 16) << 8) | (t & 0xFF)] = str(ds[t].value or "").strip()
            except Exception:  # an undecodable creator names nothing
                continue
    return out


@lru_cache(maxsize=4096)
def _public(tag: int) -> tuple[str, str]:
    """(keyword, VR) of a public tag from the dictionary, ("", "") when unknown."""
    from pydicom.datadict import dictionary_keyword, dictionary_VR
    try:
        return dictionary_keyword(tag), dictionary_VR(tag)
    except KeyError:
        return "", ""


def _walk(ds, prefix: str, out: dict[str, tuple[int, str, str]]) -> None:
    """path -> (tag, VR, private creator) for every element of ``ds`` and its sequences; only
    sequences are decoded (the VR of an implicit-VR element comes from the dictionary)."""
    creators = _creators_of(ds)
    for t in ds.keys():
        t = int(t)
        if t == 0x7FE00010 or t & 0xFFFF == 0:
            continue
        raw = ds.get_item(t)
        vr = getattr(raw, "VR", None) or ""
        if t >> 16 & 1:
            el = t & 0xFFFF
            block = el if 0x10 <= el <= 0xFF else el >> 8 if el >= 0x1000 else -1
            creator = creators.get(((t >> 16) << 8) | block, "") if block >= 0 else ""
            name = _tag_label(t)
        else:
            creator = ""
            keyword, dict_vr = _public(t)
            name = keyword or _tag_label(t)
            vr = vr if vr and vr != "UN" else dict_vr
        if vr == "SQ" or (not vr and t >> 16 & 1 and isinstance(getattr(raw, "value", None), (bytes, bytearray))
                          and bytes(raw.value[:4]) == b"\xfe\xff\x00\xe0"):
            vr = "SQ"
        out.setdefault(prefix + name, (t, vr or "UN", creator))
        if vr == "SQ":
            try:
                items = ds[t].value or ()
            except Exception:
                continue
            for item in items:
                _walk(item, prefix + name + ".", out)


def _read(path: Path):
    import gzip

    import pydicom

    from ..sniff import is_gzip
    try:
        if is_gzip(path):  # a .dcm.gz input
            with gzip.open(path, "rb") as fh:
                return pydicom.dcmread(fh, stop_before_pixels=True, force=True)
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # unreadable here: the row stays without it, the report still builds
        return None


def _sample(series: Mapping[str, tuple[str, str, int]], kind_of: Mapping[str, object],
            per_kind: int, limit: int) -> list[tuple[str, str, int]]:
    """At most ``per_kind`` series of each kind of object (SOP class and modality of the series'
    file) and ``limit`` in all, evenly spread over the sorted series folders."""
    by_kind: dict[object, list[str]] = defaultdict(list)
    for k in sorted(series):
        by_kind[kind_of.get(series[k][1])].append(k)
    picked = []
    for keys in by_kind.values():
        if len(keys) > per_kind:
            step = len(keys) / per_kind
            keys = [keys[int(i * step)] for i in range(per_kind)]
        picked.extend(keys)
    if len(picked) > limit:
        step = len(picked) / limit
        picked = [picked[int(i * step)] for i in range(limit)]
    return [series[k] for k in sorted(picked)]


def _private_blocks(labels) -> set[int]:
    """(group << 8 | block) of the private element labels ``(gggg,eeee)`` among ``labels``."""
    out = set()
    for label in labels:
        m = _TAG.match(label.rsplit(".", 1)[-1])
        if m and int(m.group(1), 16) & 1:
            g, el = int(m.group(1), 16), int(m.group(2), 16)
            out.add((g << 8) | (el if el <= 0xFF else el >> 8))
    return out


def attribute_table(audit: AuditFacts, dicom_roots: list[Path], input_dir: Path | None,
                    source_paths: Mapping[str, str], kind_of: Mapping[str, object] | None = None, *,
                    per_kind: int = PER_KIND, limit: int = MAX_SERIES) -> dict:
    """Rows ``{path, keyword, tag, creator, private_name, vr, action, files}`` (codes as in the
    audit, ``K`` for kept), the series read and their total, and the "what survives" subset.
    ``kind_of``: source ID -> kind of object (the sample takes series of every kind)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    dicom = {f: s for f, s in audit.series.items() if s[0].lower().endswith(".dcm")}
    sample = _sample(dicom, kind_of or {}, per_kind, limit)
    kept: dict[str, list] = {}  # path -> [tag, VR, creators Counter, files]
    creators: dict[int, Counter] = defaultdict(Counter)  # (group << 8 | block) -> creators in originals
    input_vr: dict[str, str] = {}
    wanted = _private_blocks(a for a, _ in audit.attribute_files)  # removed/changed private blocks
    originals_read = 0
    read = files_read = 0
    for name, source, n in sample:
        path = next((r / name for r in dicom_roots if (r / name).is_file()), None)
        ds = _read(path) if path else None
        if ds is None:
            continue
        read += 1
        files_read += n
        found: dict[str, tuple[int, str, str]] = {}
        _walk(ds, "", found)
        for p, (t, vr, creator) in found.items():
            row = kept.setdefault(p, [t, vr, Counter(), 0])
            row[3] += n
            if creator:
                row[2][creator] += n
        # the originals only for the creators of removed private blocks: until each has one, then a few more
        if not wanted or (originals_read >= MAX_ORIGINALS and wanted <= set(creators)):
            continue
        rel = source_paths.get(source)
        orig = _read(Path(input_dir) / rel) if input_dir and rel else None
        if orig is not None:
            originals_read += 1
            for block, c in _creators_of(orig).items():
                creators[block][c] += 1
            for t in orig.keys():
                if int(t) >> 16 & 1:
                    input_vr.setdefault(_tag_label(int(t)), getattr(orig.get_item(t), "VR", None) or "")
    changed = {a for a, _ in audit.attribute_files}
    rows = []
    for (attr, code), files in audit.attribute_files.items():
        last = attr.rsplit(".", 1)[-1]
        m = _TAG.match(last)
        creator = pname = vr = ""
        if m:
            tag = int(m.group(1) + m.group(2), 16)
            if tag >> 16 & 1:
                elem = tag & 0xFFFF
                if 0x10 <= elem <= 0xFF:
                    pname, vr = "Private Creator", "LO"
                    creator = " | ".join(sorted(creators.get(((tag >> 16) << 8) | elem, ())))
                elif elem >= 0x1000:
                    creator = " | ".join(c for c, _ in creators.get(((tag >> 16) << 8) | (elem >> 8), Counter()).most_common())
                    pname = " | ".join(sorted({_private_name(tag, c) for c in creator.split(" | ") if c} - {""}))
                    vr = input_vr.get(last, "")
            keyword = ""
        else:
            keyword = last
            tag = tag_for_keyword(last) or 0
            try:
                vr = dictionary_VR(tag) if tag else ""
            except KeyError:
                vr = ""
        rows.append({"path": attr, "keyword": keyword, "tag": _tag_label(tag) if tag else "", "creator": creator,
                     "private_name": pname, "vr": vr, "action": str(code), "files": files})
    for p, (t, vr, cr, files) in kept.items():
        if p in changed:
            continue
        creator = " | ".join(c for c, _ in cr.most_common())
        private = bool(t >> 16 & 1)
        pname = ("Private Creator" if private and (t & 0xFFFF) < 0x1000 else
                 " | ".join(sorted({_private_name(t, c) for c in cr} - {""})) if private else "")
        rows.append({"path": p, "keyword": "" if private else p.rsplit(".", 1)[-1], "tag": _tag_label(t),
                     "creator": creator, "private_name": pname, "vr": vr, "action": "K", "files": files})
    rows.sort(key=lambda r: (r["action"] != "K", r["path"], r["action"]))
    survives = [r for r in rows if r["action"] == "K" and (r["vr"] in TEXT_VRS or r["creator"])
                and r["private_name"] != "Private Creator"]
    return {"rows": rows, "survives": survives, "series_read": read, "series": len(dicom), "files_read": files_read,
            "files": sum(s[2] for s in dicom.values())}
