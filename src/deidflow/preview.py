"""``deidflow run --dry-run``: what a run would do, computed in memory; nothing is written.

The inventory is built as the real run builds it (same key, same pseudonyms), then the first file
of each DICOM series is read up to its pixel data to predict the BIDS name the built-in heuristic
(and ``bids.mapping``) would give, whether the face stage would deface it and whether its pixels
would be cleaned.  Everything shown is keyed (subjects, sessions, series labels, source IDs) or a
count; no original value reaches the terminal.  The BIDS name is a prediction: dcm2niix can split
a series into several images, and face selection also looks at the converted volume.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from . import inventory
from .pipeline import pseudonymizer
from .settings import clean_mode, resolve_paths

MAX_LISTED = 25  # entries shown per section; the rest are counted


def _series_header(path: Path):
    import pydicom
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # an unreadable header: the real run quarantines the file
        return None


def _predict(ds, config: Mapping[str, Any], rules, policy, subject: str, session: str, n_files: int) -> tuple[str, str, str]:
    """(BIDS name, face decision, pixel decision) for one series from its first file's header."""
    from .bids import heuristic, series
    from .face import select
    from .pixels import policy as pixel_policy
    attrs: dict[str, Any] = {}
    for kw, kind in series.ATTRIBUTES.items():
        value = series._find(ds, kw)
        if value is not None:
            try:
                attrs[kw] = series._convert(value, kind)
            except (TypeError, ValueError):
                pass
    attrs["Description"] = " ".join(str(attrs.get(k, "")) for k in ("SeriesDescription", "ProtocolName")).strip()
    attrs["Plane"] = series._plane(series._find(ds, "ImageOrientationPatient"))
    attrs.setdefault("EchoNumber", 1)
    target = heuristic.classify(attrs, rules)
    if target.datatype == "unsorted":
        name = "sourcedata/unsorted (no BIDS rule matched)"
    else:
        ents = "".join(f"_{k}-{v}" for k, v in target.entities.items())
        name = f"{subject}/{session}/{target.datatype}/{subject}_{session}{ents}_{target.suffix}"
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        dy, dx = (float(v) for v in (ds.get("PixelSpacing") or (1, 1)))
        frames = int(ds.get("NumberOfFrames") or 0) or n_files
        dz = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1)
        extent = (cols * dx, rows * dy, frames * dz)
    except (TypeError, ValueError):
        extent = ()
    facts = select.ImageFacts(path=name, suffix=target.suffix, modality=str(attrs.get("Modality", "")),
                              body_part=str(attrs.get("BodyPartExamined", "")).upper(),
                              description=attrs["Description"], extent_mm=extent)
    face = select.decide(facts, config["face"])
    pix_mode = clean_mode((config.get("pixels") or {}).get("clean"))
    pix = pixel_policy.decide(pixel_policy.HeaderFacts.from_dataset(ds), pix_mode, policy)
    return name, f"{face.method} ({face.reason})", f"{pix.action} ({pix.why})"


def lines(config: Mapping[str, Any], key: bytes) -> list[str]:
    """The dry-run preview for ``config`` under ``key``."""
    from .bids import heuristic
    from .pixels import policy as pixel_policy
    paths = resolve_paths(config)
    inv = inventory.build(paths.input, pseudonymizer(key, config), previous=None,
                          unmapped=config["pseudonym"]["unmapped"],
                          subject_pattern=(config.get("formats") or {}).get("subject_pattern") or "")
    by_subject = inv.by_subject()
    bad = [r for r in inv.rows if r.get("status") != "ok"]
    n_ok = len(inv.rows) - len(bad)
    out = [f"deidflow: dry run — nothing was written. {len(inv.subjects)} subjects, {n_ok} files to "
           f"de-identify, {len(bad)} to quarantine (input {paths.input})"]
    out.append("subjects (keyed):")
    for s in inv.subjects[:MAX_LISTED]:
        rows = by_subject.get(s, [])
        fmts = Counter(r["format"] for r in rows)
        n_series = len({(r.get("session"), r.get("series_label")) for r in rows if r.get("series_label")})
        out.append(f"  {s}: {len(rows)} files ({', '.join(f'{k} {n}' for k, n in sorted(fmts.items()))}), "
                   f"{n_series} DICOM series")
    if len(inv.subjects) > MAX_LISTED:
        out.append(f"  … and {len(inv.subjects) - MAX_LISTED} more subjects")
    bids_on = config["outputs"].get("bids", True)
    rules = heuristic.rules_for((config.get("bids") or {}).get("mapping"))
    pix_cfg = config.get("pixels") or {}
    policy = pixel_policy.load_policy(pix_cfg.get("selection_file") or "")
    series: dict[tuple[str, str, str], list[dict]] = {}
    for r in inv.rows:
        if r.get("status") == "ok" and r["format"] == "dicom" and r.get("series_label"):
            series.setdefault((r["subject"], r["session"], r["series_label"]), []).append(r)
    out.append(f"DICOM series → BIDS name{'' if bids_on else ' (outputs.bids is off: DICOM only)'}; "
               "face; pixels:")
    deface = clean = 0
    for i, ((subject, session, label), members) in enumerate(sorted(series.items())):
        ds = _series_header(paths.input / members[0]["relpath"])
        if ds is None:
            name, face, pix = "(header unreadable)", "none", "none"
        else:
            name, face, pix = _predict(ds, config, rules, policy, subject, session, len(members))
        deface += not face.startswith("none")
        clean += pix.startswith("clean")
        if i < MAX_LISTED:
            out.append(f"  {subject}/{session}/{label} ({len(members)} files) → {name if bids_on else '-'}; "
                       f"face: {face}; pixels: {pix}")
    if len(series) > MAX_LISTED:
        out.append(f"  … and {len(series) - MAX_LISTED} more series")
    out.append(f"selected: {deface} series for {config['face']['method']}, {clean} series for pixel cleaning")
    if bad:
        out.append("to quarantine (keyed source ID: reason):")
        reasons = Counter(r.get("reason") or "unknown" for r in bad)
        for r in sorted(bad, key=lambda r: r.get("src_id") or "")[:MAX_LISTED]:
            out.append(f"  {r.get('src_id') or '(no id)'}: {r.get('reason') or 'unknown'}")
        if len(bad) > MAX_LISTED:
            out.append(f"  … and {len(bad) - MAX_LISTED} more; by reason: "
                       + "; ".join(f"{n} {k}" for k, n in reasons.most_common(5)))
    out.append("deidflow: run the same command without --dry-run to de-identify.")
    return out
