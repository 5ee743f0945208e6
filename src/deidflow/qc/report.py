"""The QC report: one self-contained HTML file a privacy officer can read and sign off.

``derivatives/deidflow/qc/report.html`` in the release: dataset summary (subjects, studies,
series, files in and out per format, quarantined files by keyed source ID with their reasons),
settings, versions, key fingerprint, per-subject actions by attribute, QC renderings the stages left
in ``derivatives/deidflow/qc/<subject>/<stage>/index.json`` and the leak-scan result; a
filterable subject table and inline SVG charts.  Images are inline data URIs, there is no external
resource (a Content-Security-Policy forbids any), and it opens offline.

It lives in the release, so it holds no identifying value: original paths are never shown,
quarantine reasons are checked value by value, renderings whose kind contains ``before`` (the
original face, burned-in text) go only into the restricted copy ``restricted/qc/report-full.html``,
and the finished page is searched for every subject's original values before it is written.
The public page is deterministic (same key and input, same bytes); the run time is in the
restricted copy only.
"""
from __future__ import annotations

import base64
import html
import json
import re
import string
import time
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from .. import inventory
from ..errors import PublicError
from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, display_path, make_restricted_dir
from . import audit, leakscan

QC_SUBDIR = "derivatives/deidflow/qc"
ACTION_NAMES = {"X": "removed", "Z": "emptied", "D": "dummy value", "U": "keyed UID", "C": "cleaned/shifted",
                "P": "pseudonym", "R": "replaced", "K": "kept"}
ACTION_COLORS = {"X": "#b3261e", "Z": "#e8a33d", "D": "#7b5ea7", "U": "#2a7ab0", "C": "#3d9a5b", "P": "#1f3a5f",
                 "R": "#8f6b3a", "K": "#9aa5b1"}
VERSION_PACKAGES = ("pydicom", "numpy", "nibabel", "pyarrow", "snakemake", "dcm2niix", "antspyx", "onnxruntime")
FORMAT_NAMES = {"dicom": "DICOM", "nifti1": "NIfTI", "nifti2": "NIfTI", "analyze": "Analyze/NIfTI pair",
                "img": "Analyze/NIfTI pair", "json": "JSON", "mgh": "MGH", "minc1": "MINC", "minc2": "MINC",
                "parrec": "PAR/REC", "rec": "PAR/REC", "twix": "twix", "tiff": "TIFF"}
_DATA_URI = re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+")
_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def e(text) -> str:
    return html.escape(str(text), quote=True)


def _tsv_unescape(field: str) -> str:
    return re.sub(r"\\[\\tnr]", lambda m: _UNESCAPE[m.group()], field)


# ------------------------------------------------------------------------------------------------
# Gathering (restricted inputs -> public facts)
# ------------------------------------------------------------------------------------------------
def _inventory_rows(restricted: Path) -> list[dict]:
    if not (Path(restricted) / "inventory.parquet").exists():
        return []
    cols = ["relpath", "format", "status", "reason", "modality", "subject", "session", "series_label", "src_id"]
    table = inventory.read(restricted)
    cols = [c for c in cols if c in table.schema.names]
    return table.select(cols).to_pylist()


def _quarantine(restricted: Path, rows: list[dict]) -> list[dict]:
    """Quarantined files by keyed source ID, subject (when known), format and reason."""
    by_path = {display_path(r["relpath"]): r for r in rows}
    out = []
    q = Path(restricted) / "quarantine.tsv"
    lines = q.read_text(encoding="utf-8", errors="replace").splitlines()[1:] if q.exists() else []
    for line in lines:
        if not line:
            continue
        f, _, reason = line.partition("\t")
        f, reason = _tsv_unescape(f), _tsv_unescape(reason)
        r = by_path.get(f, {})
        out.append({"src_id": r.get("src_id") or "(not in inventory)", "subject": r.get("subject") or "",
                    "format": r.get("format") or "", "reason": reason, "_path": f})
    return sorted(out, key=lambda x: (x["src_id"], x["reason"]))


def _release_formats(release: Path) -> tuple[Counter, dict[str, Counter]]:
    """Files in the release per format, overall and per subject (QC products excluded)."""
    total: Counter = Counter()
    per: dict[str, Counter] = defaultdict(Counter)
    qc = (Path(release) / QC_SUBDIR).as_posix()
    for p in sorted(Path(release).rglob("*")):
        if not p.is_file() or p.as_posix().startswith(qc + "/") or p.name == "RELEASE_INCOMPLETE":
            continue  # the run's own marker (deidflow.publish.MARKER) is no released file
        fmt = _format_of(p.name)
        total[fmt] += 1
        sub = next((part for part in p.relative_to(release).parts if re.match(r"^sub-[A-Za-z0-9]+$", part)), None)
        if sub is None:
            m = re.match(r"^(sub-[A-Za-z0-9]+)_", p.name)
            sub = m.group(1) if m else None
        if sub:
            per[sub][fmt] += 1
    return total, per


def _format_of(name: str) -> str:
    low = name.lower()
    for ext, fmt in ((".dcm", "DICOM"), (".nii.gz", "NIfTI"), (".nii", "NIfTI"), (".json", "JSON"),
                     (".tsv", "TSV"), (".hdr", "Analyze/NIfTI pair"), (".img", "Analyze/NIfTI pair"),
                     (".mnc", "MINC"), (".mgz", "MGH"), (".mgh", "MGH"), (".par", "PAR/REC"), (".rec", "PAR/REC"),
                     (".dat", "twix"), (".bval", "BIDS bval/bvec"), (".bvec", "BIDS bval/bvec"), (".png", "PNG"),
                     (".tif", "TIFF"), (".tiff", "TIFF"), (".svs", "TIFF")):
        if low.endswith(ext):
            return fmt
    return "other"


def _verify_results(restricted: Path) -> tuple[dict, dict | None]:
    subjects: dict[str, dict] = {}
    excluded: Counter = Counter()
    searched = 0
    pixel = False
    for f in sorted((Path(restricted) / "done" / "verify").glob("*.json")):
        r = json.loads(f.read_text())
        subjects.update(r["subjects"])
        excluded.update(r.get("excluded_forms", {}))
        searched += r.get("searched_forms", 0)
        pixel = pixel or r.get("pixel_data_scanned", False)
    ds_file = Path(restricted) / "done" / "verify_dataset.json"
    dataset = json.loads(ds_file.read_text()) if ds_file.exists() else None
    return {"subjects": subjects, "excluded": dict(sorted(excluded.items())), "searched": searched,
            "pixel_data": pixel}, dataset


def _qc_images(release: Path, restricted: Path, subject: str, *, restricted_copy: bool) -> list[dict]:
    """The renderings stages left for ``subject`` (index.json per stage), as data URIs; the
    restricted copy also shows those the stages kept in ``restricted/qc`` (original faces,
    burned-in text before redaction)."""
    out = []
    bases = [Path(release) / QC_SUBDIR / subject]
    if restricted_copy:
        bases.append(Path(restricted) / "qc" / subject)
    for index in sorted(i for base in bases for i in base.glob("*/index.json")):
        try:
            items = json.loads(index.read_text(encoding="utf-8"))
        except ValueError:
            continue
        for it in items if isinstance(items, list) else ():
            kind = str(it.get("kind", ""))
            if "before" in kind and not restricted_copy:
                continue
            png = index.parent / str(it.get("file", ""))
            if png.suffix.lower() != ".png" or not png.is_file() or index.parent not in png.resolve().parents:
                continue
            out.append({"stage": index.parent.name, "kind": kind, "caption": str(it.get("caption", "")),
                        "uri": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")})
    return out


def _before_images_in_release(release: Path) -> int:
    n = 0
    for index in sorted((Path(release) / QC_SUBDIR).glob("sub-*/*/index.json")):
        try:
            n += sum(1 for it in json.loads(index.read_text()) if "before" in str(it.get("kind", "")))
        except (ValueError, AttributeError):
            continue
    return n


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata
    from .. import __version__
    out = {"deidflow": __version__, "python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------------------
# Charts (inline SVG)
# ------------------------------------------------------------------------------------------------
def bar_chart(items: list[tuple[str, Mapping[str, int]]], title: str, colors: Mapping[str, str] | None = None,
              width: int = 560) -> str:
    """A horizontal (stacked) bar chart as an SVG string: ``items`` = [(label, {segment: count})]."""
    colors = colors or {}
    row, label_w, top = 20, 230, 26
    total_max = max([sum(v.values()) for _, v in items] or [1]) or 1
    segs = sorted({k for _, v in items for k in v})
    height = top + row * len(items) + 28
    bar_w = width - label_w - 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{e(title)}" font-family="sans-serif" font-size="11">',
           f'<text x="0" y="14" font-size="13" font-weight="bold">{e(title)}</text>']
    for i, (label, values) in enumerate(items):
        y = top + i * row
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{e(label[:40])}</text>')
        x = float(label_w)
        for s in segs:
            v = values.get(s, 0)
            if not v:
                continue
            w = max(1.0, bar_w * v / total_max)
            out.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" '
                       f'fill="{colors.get(s, "#2a7ab0")}"><title>{e(label)}: {e(s)} {v}</title></rect>')
            x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + 13}">{sum(values.values())}</text>')
    if len(segs) > 1 or colors:
        x = 0
        y = top + row * len(items) + 14
        for s in segs:
            out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colors.get(s, "#2a7ab0")}"/>'
                       f'<text x="{x + 14}" y="{y}">{e(s)} {e(ACTION_NAMES.get(s, ""))}</text>')
            x += 130
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _table(headers: Iterable[str], rows: Iterable[Iterable], *, numeric: Iterable[int] = (), attrs: str = "",
           row_attrs: Iterable[str] | None = None) -> str:
    numeric = set(numeric)
    head = "".join(f'<th class="n">{e(h)}</th>' if i in numeric else f"<th>{e(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    row_attrs = list(row_attrs) if row_attrs is not None else None
    for j, r in enumerate(rows):
        cells = "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        extra = f" {row_attrs[j]}" if row_attrs else ""
        body.append(f"<tr{extra}>{cells}</tr>")
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status(s: str) -> str:
    return {"clean": '<span class="ok">clean</span>', "leak": '<span class="bad">LEAK</span>'}.get(
        s, '<span class="warn">not scanned</span>')


def build(release: Path, restricted: Path) -> dict:
    """Everything the public report shows, gathered from the restricted folder and the release
    (``write_report`` adds the before-images for the restricted copy)."""
    release, restricted = Path(release), Path(restricted)
    rows = _inventory_rows(restricted)
    run = json.loads((restricted / "run.json").read_text()) if (restricted / "run.json").exists() else {}
    ok = [r for r in rows if r.get("status") == "ok"]
    subjects = sorted({r["subject"] for r in ok if r.get("subject")})
    verify, dataset = _verify_results(restricted)
    subjects = sorted(set(subjects) | set(verify["subjects"]))
    counts, audited = audit.summary(restricted)
    out_total, out_per = _release_formats(release)
    quarantine = _quarantine(restricted, rows)
    per = {}
    for s in subjects:
        mine = [r for r in ok if r.get("subject") == s]
        per[s] = {
            "sessions": len({r["session"] for r in mine if r.get("session")}),
            "series": len({(r.get("session"), r.get("series_label")) for r in mine if r.get("series_label")}),
            "files_in": len(mine),
            "released": sum(out_per.get(s, Counter()).values()),
            "formats": dict(sorted(out_per.get(s, Counter()).items())),
            "quarantined": sum(1 for q in quarantine if q["subject"] == s),
            "audited_files": audited.get(s, 0),
            "actions": counts.get(s, Counter()),
            "images": _qc_images(release, restricted, s, restricted_copy=False),
            "verify": verify["subjects"].get(s),
        }
    return {
        "run": run, "subjects": subjects, "per": per, "quarantine": quarantine, "verify": verify,
        "dataset_verify": dataset,
        "formats_in": dict(sorted(Counter(FORMAT_NAMES.get(r.get("format") or "", "other") for r in rows).items())),
        "formats_out": dict(sorted(out_total.items())), "files_in": len(rows),
        "modalities": dict(sorted(Counter((r.get("modality") or "other") for r in ok).items())),
        "studies": len({r["session"] for r in ok if r.get("session")}),
        "series": len({(r.get("session"), r.get("series_label")) for r in ok if r.get("series_label")}),
        "before_in_release": _before_images_in_release(release), "versions": _versions(),
        "restricted_copy": False,
    }


def render(facts: Mapping, *, run_time: str | None = None) -> tuple[str, dict[str, str]]:
    """The HTML page for ``facts`` (see :func:`build`)."""
    per, subjects = facts["per"], facts["subjects"]
    run = facts["run"]
    settings = run.get("settings", {})
    leaky = [s for s in subjects if (per[s]["verify"] or {}).get("status") == "leak"]
    unscanned = [s for s in subjects if not per[s]["verify"]]
    ds = facts["dataset_verify"]
    overall = ("LEAK" if leaky or (ds and ds["hits"]) else "not complete" if unscanned or ds is None else "clean")
    parts = []
    cards = [(len(subjects), "subjects"), (facts["studies"], "studies"), (facts["series"], "series"),
             (facts["files_in"], "input files"), (sum(facts["formats_out"].values()), "files released"),
             (len(facts["quarantine"]), "quarantined"), (overall, "leak scan")]
    parts.append('<section id="summary"><h2>Dataset summary</h2><div class="cards">' + "".join(
        f'<div class="card"><b class="{"bad" if v == "LEAK" else ""}">{e(v)}</b><span>{e(k)}</span></div>'
        for v, k in cards) + "</div>")
    if facts["before_in_release"] and not facts["restricted_copy"]:
        parts.append(f'<p class="bad">{facts["before_in_release"]} rendering(s) of data before de-identification '
                     "(kind \u201cbefore\u201d) lie in the release under derivatives/deidflow/qc: they show what was "
                     "removed; move them out of the release before sharing. This page shows them only in its "
                     "restricted copy.</p>")
    if run_time:
        parts.append(f'<p class="muted">Run time: {e(run_time)} (restricted copy only)</p>')
    fmt_names = sorted(set(facts["formats_in"]) | set(facts["formats_out"]))
    parts.append('<h3>Files in and out per format</h3>' + _table(
        ["format", "input files", "released files"],
        [(e(f), facts["formats_in"].get(f, ""), facts["formats_out"].get(f, "")) for f in fmt_names], numeric=(1, 2)))
    parts.append("</section>")
    # charts
    totals: Counter = Counter()
    for s in subjects:
        totals.update(per[s]["actions"])
    by_attr: dict[str, Counter] = defaultdict(Counter)
    for (attr, code), n in totals.items():
        by_attr[attr][code] += n
    top = sorted(by_attr.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:25]
    charts = {
        "modalities": bar_chart([(m, {"files": n}) for m, n in facts["modalities"].items()],
                                "Released DICOM files per modality"),
        "actions": bar_chart([(a, dict(c)) for a, c in top], "Actions per attribute (25 most frequent)",
                             ACTION_COLORS, width=640),
    }
    inline = {k: v.replace(' xmlns="http://www.w3.org/2000/svg"', "") for k, v in charts.items()}
    parts.append('<section id="charts"><h2>Charts</h2><div class="charts">' + inline["modalities"]
                 + inline["actions"] + "</div></section>")
    # subject table
    status_of = {s: (per[s]["verify"] or {}).get("status", "not scanned") for s in subjects}
    table_rows, row_attrs = [], []
    for s in subjects:
        p = per[s]
        table_rows.append((f'<a href="#{e(s)}">{e(s)}</a>', p["sessions"], p["series"], p["files_in"], p["released"],
                           p["quarantined"], len({a for a, _ in p["actions"]}), len(p["images"]), _status(status_of[s])))
        row_attrs.append(f'data-status="{e(status_of[s])}"')
    parts.append(
        '<section id="subject-table"><h2>Subjects</h2><div class="filters">'
        '<label>Filter <input id="subject-filter" type="search" placeholder="subject, count, status"></label>'
        '<label>Leak scan <select id="status-filter"><option value="">all</option><option value="clean">clean'
        '</option><option value="leak">leak</option><option value="not scanned">not scanned</option></select></label>'
        '<span id="subject-count" class="muted"></span></div>'
        + _table(["subject", "studies", "series", "input files", "released files", "quarantined",
                  "attributes changed", "QC images", "leak scan"], table_rows, numeric=(1, 2, 3, 4, 5, 6, 7),
                 attrs='id="subjects"', row_attrs=row_attrs) + "</section>")
    # renderings overview
    thumbs = [(s, im) for s in subjects for im in per[s]["images"]]
    if thumbs:
        parts.append('<section id="renderings"><h2>QC renderings</h2><p class="muted">What the stages left in '
                     "derivatives/deidflow/qc (faces after defacing, redacted pixels, …); renderings of data before "
                     "de-identification are only in the restricted copy.</p><div class=\"gallery\">" + "".join(
                         f'<figure><a href="#{e(s)}"><img alt="{e(s)} {e(im["kind"])}" src="{im["uri"]}"></a>'
                         f'<figcaption>{e(s)} \u00b7 {e(im["stage"])}: {e(im["caption"] or im["kind"])}</figcaption></figure>'
                         for s, im in thumbs) + "</div></section>")
    # leak scan
    v = facts["verify"]
    ex = ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in v["excluded"].items()) or "none"
    scanned = sum((per[s]["verify"] or {}).get("bytes_scanned", 0) for s in subjects)
    skipped = sum((per[s]["verify"] or {}).get("bytes_not_scanned", 0) for s in subjects)
    lines = [f"<p>Every release file of every subject was searched for that subject's (and its job unit's) "
             f"original identifying values: {v['searched']} searched forms; forms excluded by the documented "
             f"rules (docs/qc.md): {e(ex)}. {scanned:,} bytes searched; {skipped:,} bytes of image samples "
             + ("also searched." if v["pixel_data"] else "not byte-searched (pixel data, NIfTI image blocks).")
             + "</p>"]
    if ds is not None:
        lines.append(f"<p>Dataset-level files: {ds['files']}, {_status(ds['status'])}.</p>")
    hits = [(s, h) for s in subjects for h in ((per[s]["verify"] or {}).get("hits") or ())]
    hits += [("dataset", h) for h in (ds or {}).get("hits", ())]
    if hits:
        lines.append(_table(["scope", "file", "location", "kind", "field", "value hash", "value of"],
                            [(e(s), f"<code>{e(h['file'])}</code>", e(h["location"]), e(h["kind"]), e(h["field"]),
                              f"<code>{e(h['value_hash'])}</code>", e(h["owner"])) for s, h in hits]))
    parts.append('<section id="leak-scan"><h2>Leak scan</h2>' + "".join(lines) + "</section>")
    # quarantine
    q = facts["quarantine"]
    parts.append('<section id="quarantine"><h2>Quarantined files</h2>' + (
        "<p>None: every input file was released.</p>" if not q else
        f"<p>{len(q)} input file(s) were not released; original paths are in the restricted quarantine.tsv.</p>"
        + _table(["source ID", "subject", "format", "reason"],
                 [(f"<code>{e(x['src_id'])}</code>", e(x["subject"]), e(x["format"]), e(x["reason"])) for x in q]))
        + "</section>")
    # settings and versions
    opts = settings.get("options") or []
    overrides = settings.get("overrides") or []
    srows = [("PS3.15 options", e(", ".join(opts) or "none (Basic Profile)")),
             ("private attributes", e(settings.get("private", ""))),
             ("user overrides", e("; ".join(f"{o.get('attribute')}: {o.get('action')}" for o in overrides) or "none")),
             ("pseudonym length", e(settings.get("pseudonym_length", ""))),
             ("date offset range (days)", e(settings.get("date_offset_days", ""))),
             ("trust-centre mapping", "yes" if settings.get("mapping_csv") else "no"),
             ("key fingerprint", f"<code>{e(run.get('key_fingerprint', ''))}</code>")]
    parts.append('<section id="settings"><h2>Profile, options and versions</h2><div class="charts">'
                 + _table(["setting", "value"], srows)
                 + _table(["software", "version"], [(e(k), e(v)) for k, v in facts["versions"].items()])
                 + "</div></section>")
    # per subject
    secs = []
    for s in subjects:
        p = per[s]
        codes = sorted({c for _, c in p["actions"]})
        attrs: dict[str, Counter] = defaultdict(Counter)
        for (a, c), n in p["actions"].items():
            attrs[a][c] += n
        body = [f"<p>{p['released']} released file(s) ({e(', '.join(f'{k}: {n}' for k, n in p['formats'].items()) or 'none')}); "
                f"{p['quarantined']} quarantined; leak scan {_status(status_of[s])}"
                + (f", {p['verify']['files']} files, {p['verify']['identifiers']} original values searched" if p["verify"] else "")
                + ".</p>"]
        if p["images"]:
            body.append('<div class="gallery">' + "".join(
                f'<figure><img alt="{e(im["kind"])}" src="{im["uri"]}"><figcaption>{e(im["stage"])}: '
                f'{e(im["caption"] or im["kind"])}</figcaption></figure>' for im in p["images"]) + "</div>")
        if attrs:
            body.append("<h3>Actions by attribute (files)</h3>" + _table(
                ["attribute", *[f"{c} {ACTION_NAMES.get(c, '')}" for c in codes]],
                [(e(a), *[attrs[a].get(c, "") for c in codes]) for a in sorted(attrs)], numeric=range(1, len(codes) + 1)))
        vh = (p["verify"] or {}).get("hits") or []
        if vh:
            body.append("<h3>Leak-scan hits</h3>" + _table(
                ["file", "location", "kind", "field", "value hash"],
                [(f"<code>{e(h['file'])}</code>", e(h["location"]), e(h["kind"]), e(h["field"]),
                  f"<code>{e(h['value_hash'])}</code>") for h in vh]))
        secs.append(f'<details class="subject" id="{e(s)}"><summary>{e(s)} \u2014 {_status(status_of[s])}'
                    f"</summary>{''.join(body)}</details>")
    parts.append('<section id="subject-details"><h2>Subjects in detail</h2>' + "".join(secs) + "</section>")
    template = string.Template(resources.files("deidflow").joinpath("data", "qc_report.html").read_text(encoding="utf-8"))
    title = "deidflow QC report" + (" (restricted copy)" if facts["restricted_copy"] else "")
    subtitle = (f"deidflow {facts['versions'].get('deidflow', '')} \u00b7 {len(subjects)} subjects \u00b7 "
                f"leak scan: {overall} \u00b7 key fingerprint {run.get('key_fingerprint', '')}")
    return template.substitute(title=e(title), subtitle=e(subtitle), body="\n".join(parts)), charts


def subjects_tsv(facts: Mapping) -> str:
    lines = ["subject\tstudies\tseries\tinput_files\treleased_files\tquarantined\tattributes_changed\tqc_images\tleak_scan\n"]
    for s in facts["subjects"]:
        p = facts["per"][s]
        lines.append(f"{s}\t{p['sessions']}\t{p['series']}\t{p['files_in']}\t{p['released']}\t{p['quarantined']}\t"
                     f"{len({a for a, _ in p['actions']})}\t{len(p['images'])}\t"
                     f"{(p['verify'] or {}).get('status', 'not scanned')}\n")
    return "".join(lines)


def _own_words() -> frozenset[bytes]:
    """Every word of an empty report page (template, headings, legends): a patient called "Value"
    is not leaked by the heading "dummy value"."""
    empty = {"run": {}, "subjects": [], "per": {}, "quarantine": [], "verify": {"subjects": {}, "excluded": {},
             "searched": 0, "pixel_data": False}, "dataset_verify": None, "formats_in": {}, "formats_out": {},
             "files_in": 0, "modalities": {}, "studies": 0, "series": 0, "before_in_release": 1, "versions": {},
             "restricted_copy": False}
    page = render(empty)[0] + " ".join(ACTION_NAMES.values()) + " ".join(FORMAT_NAMES.values())
    return frozenset(re.findall(rb"[a-z]+", html.unescape(page).encode("utf-8").lower()))


def _check_public(restricted: Path, facts: dict, texts: Mapping[str, str]) -> None:
    """Withhold quarantine reasons that hold an identifying value; refuse to write a page that does."""
    originals = sorted({part for q in facts["quarantine"] for part in q["_path"].split("/") if part})
    reasons = {str(i): q["reason"] for i, q in enumerate(facts["quarantine"])}
    if reasons:
        found = leakscan.text_hits(restricted, reasons, originals)
        for i, q in enumerate(facts["quarantine"]):
            if found[str(i)]:
                q["reason"] = "(reason withheld: it contains an identifying value; see the restricted quarantine.tsv)"
    stripped = {k: _DATA_URI.sub("data:", t) for k, t in texts.items()}  # images were scanned as files
    bad = {k: n for k, n in leakscan.text_hits(restricted, stripped, originals, _own_words()).items() if n}
    if bad:
        raise PublicError(f"QC report not written: {sum(bad.values())} identifying value(s) would appear in "
                          f"{', '.join(sorted(bad))}")


def write_report(release: Path, restricted: Path, output: Path, charts: str, table: Path, full: Path) -> Path:
    """Write the public report, its charts and subject table (release) and the restricted copy."""
    release, restricted = Path(release), Path(restricted)
    facts = build(release, restricted)
    _check_public(restricted, facts, {})  # withholds identifying quarantine reasons
    page, svgs = render(facts)
    tsv = subjects_tsv(facts)
    _check_public(restricted, facts, {"report.html": page, "subjects.tsv": tsv, **svgs})
    chart_paths = [Path(p) for p in charts.split(",")] if charts else []
    for path, svg in zip(chart_paths, (svgs["modalities"], svgs["actions"])):
        atomic_write_text(path, svg + "\n", 0o644)
    atomic_write_text(table, tsv, 0o644)
    atomic_write_text(output, page, 0o644)
    # the restricted copy: the same facts (quarantine reasons as checked above) plus the before-images
    full_facts = {**facts, "restricted_copy": True, "per": {
        s: {**p, "images": _qc_images(release, restricted, s, restricted_copy=True)} for s, p in facts["per"].items()}}
    make_restricted_dir(Path(full).parent)
    atomic_write_text(full, render(full_facts, run_time=_run_time(restricted))[0], RESTRICTED_FILE_MODE)
    return Path(output)


def _run_time(restricted: Path) -> str:
    """From the run's configuration being written (``deidflow run``) or the first job log to now."""
    cfg = Path(restricted) / "run-config.yaml"
    logs = [p.stat().st_mtime for p in (Path(restricted) / "logs").rglob("*.log")] if (Path(restricted) / "logs").is_dir() else []
    start = cfg.stat().st_mtime if cfg.exists() else min(logs or [time.time()])
    secs = max(0.0, time.time() - start)
    return f"{int(secs // 60)} min {secs % 60:.0f} s (until the report was written)"


# ------------------------------------------------------------------------------------------------
# One line per stage at the end of a run
# ------------------------------------------------------------------------------------------------
def stage_summaries(restricted: Path) -> list[str]:
    """One summary line per stage from its done markers (counts and pseudonyms only)."""
    done = Path(restricted) / "done"
    lines = []
    for stage_dir in sorted(p for p in done.iterdir() if p.is_dir()) if done.is_dir() else ():
        markers = sorted(stage_dir.glob("*.json"))
        docs = []
        for m in markers:
            try:
                docs.append(json.loads(m.read_text()))
            except ValueError:
                continue
        stage = stage_dir.name
        if stage == "verify":
            subs = {s: r for d in docs for s, r in d.get("subjects", {}).items()}
            leaky = sorted(s for s, r in subs.items() if r.get("hits"))
            text = (f"{len(subs)} subjects scanned, {sum(r.get('files', 0) for r in subs.values())} files: "
                    + (f"LEAK in {', '.join(leaky)}" if leaky else "no identifying value found"))
        else:
            subs = [s for d in docs for s in d.get("subjects", []) if isinstance(s, dict)]
            files = sum(int(s.get("files", 0) or 0) for s in subs)
            bad = sum(int(s.get("quarantined", 0) or 0) for s in subs)
            text = f"{len(markers)} job units" + (f", {len(subs)} subjects, {files} files" if subs else "") + (
                f", {bad} quarantined" if bad else "")
        lines.append(f"deidflow: {stage}: {text}")
    ds = done / "verify_dataset.json"
    if ds.exists():
        r = json.loads(ds.read_text())
        lines.append(f"deidflow: verify_dataset: {r['files']} dataset-level files: "
                     + ("LEAK" if r["hits"] else "no identifying value found"))
    return lines
