"""The pixel step of one subject in the ``dicom`` job, series by series.

The DICOM engine stages a subject's files in manifest order, which keeps each series' files
together (``<session>/<series>/NNNN.dcm``); :class:`SubjectPixels` collects them and, once a
series is complete, decides for the whole series:

* header rules (``data/pixel_policy.tsv``) select a file → it is cleaned (US, SC, …, WSI labels);
* ``pixels.clean: auto``: every other image series is screened (:mod:`.screen`); text found →
  every file of the series is cleaned as ``always`` would;
* ``pixels.series_file`` overrides the mode of one series (by its original SeriesInstanceUID):
  ``always``, ``off`` (screened, never cleaned: what is found is left for the pixel leak check
  to judge) or ``auto``.

Files that are not cleaned are never rewritten: their pixel data stay byte for byte.  The facts
of every series (frames screened, text found, boxes cleaned, thumbnails, the files the pixel leak
check must read) go to ``<restricted>/pixels/<subject>.json`` (:func:`facts_path`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..fsutil import RESTRICTED_FILE_MODE, atomic_write_text, make_restricted_dir
from .leakcheck import facts_path
from .clean import Outcome, PixelCleaner, PixelError
from .layout import intersection
from .policy import Decision
from .qc import SubjectPixelsQC, _stem
from . import screen

CHECK_FRAMES = 16  # at most this many frames per file are read again by the pixel leak check


@dataclass
class _Member:
    relpath: str  # input path (for the quarantine list)
    file: str  # audit name: <subject>/<session>/<series>/NNNN.dcm
    name: str  # the same from the release root (what the pixel leak check opens)
    staged: Path
    header: object  # original values the engine captured (pydicom Dataset) or None
    entry: dict  # the file's audit record (gets "pixels")
    decision: Decision
    image: bool  # has rows and columns
    wsi: bool  # a whole-slide pyramid level (never screened: policy.wsi_level)
    tiled: bool  # a whole-slide image stored as tiles (policy.tiled_wsi: not cleaned)
    outcome: Outcome | None = None


class SubjectPixels:
    """Collect a subject's staged files and clean or screen them series by series."""

    def __init__(self, cleaner: PixelCleaner, subject: str, qc: SubjectPixelsQC, prefix: str = "",
                 output_error: Callable[[OSError], Exception] | None = None):
        """``prefix``: where the subject's DICOM folder lies below the release root
        (``sourcedata/dicom``); ``output_error`` turns an error writing the release into the
        job's failure (nothing is withheld for it)."""
        self.cleaner, self.subject, self.qc = cleaner, subject, qc
        self.prefix = prefix.strip("/")
        self.output_error = output_error
        self.series: list[dict] = []
        self.bad: list[tuple[str, str]] = []
        self._key: str | None = None
        self._members: list[_Member] = []

    def add(self, relpath: str, file: str, staged: Path, header, entry: dict) -> None:
        """One staged file (``file``: ``<subject>/<session>/<series>/NNNN.dcm``, its audit name);
        a series is handled when the first file of the next one arrives."""
        key = file.rsplit("/", 1)[0]
        if key != self._key:
            self.flush()
            self._key = key
        name = f"{self.prefix}/{file}" if self.prefix else file
        self._members.append(_Member(relpath, file, name, Path(staged), header, entry, *self.cleaner.classify(header)))

    def flush(self) -> None:
        if self._members:
            self._series(self._key or "", self._members)
        self._members = []

    def finish(self, restricted: Path) -> list[tuple[str, str]]:
        """Handle the last series, write the facts file; the (input path, reason) of every file
        withheld (their staged copies are gone)."""
        self.flush()
        target = facts_path(restricted, self.subject)
        make_restricted_dir(target.parent)
        doc = {"subject": self.subject, "mode": self.cleaner.mode, "policy": self.cleaner.policy,
               "series": self.series}
        atomic_write_text(target, json.dumps(doc, indent=1, sort_keys=True) + "\n", RESTRICTED_FILE_MODE)
        return self.bad

    # -- one series ---------------------------------------------------------------------------
    def _series(self, key: str, members: list[_Member]) -> None:
        c = self.cleaner
        uid = _value(members[0].header, "SeriesInstanceUID")
        override = c.series_overrides.get(uid) if uid else None
        mode = override[0] if override else c.mode
        fact = {"series": key.split("/", 1)[-1], "files": len(members), "mode": mode,
                "override": bool(override), "decision": "", "why": "", "frames": 0, "screened_frames": 0,
                "sampled_frames": 0, "outlier_frames": 0, "detector_runs": 0, "screen_seconds": 0.0,
                "text_found": None, "found": [], "files_cleaned": 0, "boxes": 0, "withheld": 0,
                "thumbnails": [], "check": []}
        for m in members:
            if m.decision.action == "withhold":
                self._withhold(m, m.decision.why, fact)
        members = [m for m in members if not m.entry.get("withheld")]
        images = [m for m in members if m.image]
        forced = [m for m in members if m.decision.action != "skip"]
        screenable = [m for m in images if m.decision.action == "skip" and not m.wsi]
        clean: list[_Member] = []
        if mode == "off":
            fact["decision"], fact["why"] = "kept", "pixels.series_file: off"
        elif mode == "always":
            clean = [m for m in members if m.decision.action != "skip" or (m in screenable and not m.tiled)]
            fact["decision"], fact["why"] = "cleaned", ("pixels.series_file: always" if override
                                                       else "pixels.clean is always")
        else:
            clean = list(forced)
            if forced:
                fact["decision"], fact["why"] = "cleaned", forced[0].decision.why
            else:
                fact["decision"], fact["why"] = "kept", "no image" if not images else ""
        if screenable and (mode == "off" or (mode == "auto" and not forced)):
            res = self._screen(screenable, fact)
            if res is not None and res.text and mode == "auto":
                self._withhold_tiled(screenable, fact)
                clean = [m for m in screenable if not m.entry.get("withheld") and not m.tiled]
                fact["decision"], fact["why"] = "cleaned", "text found by the screen"
            elif res is not None and mode == "auto":
                fact["why"] = "no text found by the screen"
            elif res is not None and res.text:
                fact["why"] += "; text found, left for the pixel leak check"
        elif screenable and mode == "auto" and forced:
            clean += [m for m in screenable if m not in clean and not m.tiled]  # a selected file cleans its series
        if mode != "off" and fact["text_found"] is None:
            self._screen_tiles([m for m in screenable if m.tiled and m not in clean and not m.entry.get("withheld")],
                               screenable, fact)
        for m in members:
            if m.entry.get("withheld"):
                continue
            if m in clean:
                self._clean(m, fact)
                if m in screenable and not m.entry.get("withheld") and c.policy == "all_text":
                    self._removed_found(m, screenable.index(m), fact)
            elif m in screenable and fact["text_found"] is not None:
                m.entry["pixels"] = {"action": "screened" if not fact["text_found"] else "kept",
                                     "why": fact["why"]}
        fact["frames"] = fact["frames"] or sum(int(_value(m.header, "NumberOfFrames") or 1) for m in images)
        if mode == "off" and fact["text_found"]:
            for i in sorted({f["file"] for f in fact["found"]}):
                fact["check"].append({"file": screenable[i].name,
                                      "frames": sorted({f["frame"] for f in fact["found"] if f["file"] == i})})
        self.series.append(fact)

    def _screen(self, members: list[_Member], fact: dict) -> "screen.Result | None":
        """Screen ``members``; a file whose pixels cannot be read is withheld and the rest screened."""
        todo = list(members)
        while todo:
            try:
                res = screen.screen([(m.staged, m.header) for m in todo], self.cleaner.threads)
            except screen.ScreenError as exc:
                bad = todo.pop(exc.index)
                self._withhold(bad, f"pixel data could not be screened for burned-in text: {exc.reason}", fact)
                continue
            fact.update(frames=res.frames, screened_frames=res.screened, sampled_frames=res.sampled,
                        outlier_frames=res.outliers, detector_runs=res.detector_runs,
                        screen_seconds=round(res.seconds, 3), text_found=res.text,
                        found=[{**f.as_dict(), "file": members.index(todo[f.file])} for f in res.found])
            # found[].file indexes ``members`` (the screened files of the series)
            return res
        return None

    def _screen_tiles(self, tiles: list[_Member], screenable: list[_Member], fact: dict) -> None:
        """Screen the few-tile whole-slide images that are neither screened with their series nor
        cleaned (``always``, or a series in which a label or another image was selected): text in
        one withholds it.  They were released unscreened (a label stored as 2 x 2 tiles)."""
        if not tiles:
            return
        part = {"withheld": 0}
        res = self._screen(tiles, part)
        fact["withheld"] += part["withheld"]
        if res is None:
            return
        for k in ("screened_frames", "sampled_frames", "outlier_frames", "detector_runs", "screen_seconds",
                  "text_found"):
            fact[k] = part[k]
        fact["found"] = [{**f, "file": screenable.index(tiles[f["file"]])} for f in part["found"]]
        self._withhold_tiled(screenable, fact)

    def _withhold_tiled(self, screened: list[_Member], fact: dict) -> None:
        """A whole-slide image of a few tiles in which the screen found text is withheld: its tiles
        are not cleaned, and text may cross them (a label stored as tiles)."""
        for i in sorted({f["file"] for f in fact["found"]}):
            if screened[i].tiled and not screened[i].entry.get("withheld"):
                self._withhold(screened[i], "a whole-slide image stored as tiles shows text (a slide label or "
                                            "annotation; its tiles are not cleaned)", fact)

    def _clean(self, m: _Member, fact: dict) -> None:
        c = self.cleaner
        d = m.decision if m.decision.action != "skip" else Decision("clean", fact["why"] or "selected")
        try:
            out = c.process(m.staged, m.header, decision=d)
        except PixelError as exc:
            self._withhold(m, str(exc), fact)
            return
        except OSError as exc:
            from ..errors import output_error_of
            if (full := output_error_of(exc)) is not None and self.output_error is not None:
                raise self.output_error(full) from None
            self._withhold(m, f"pixel data could not be cleaned: {exc.strerror}", fact)
            return
        m.outcome = out
        if out.action == "dropped":
            m.staged.unlink(missing_ok=True)  # WSI label image, not released (pixels.wsi_label: drop)
        m.entry["pixels"] = out.audit()
        self.qc.add(m.file, out)
        if out.redactions:
            fact["files_cleaned"] += 1
            fact["boxes"] += len(out.redactions)
            frames = sorted({r.frame for r in out.redactions})
            if len(frames) > CHECK_FRAMES:  # evenly spread, first and last included
                last = len(frames) - 1
                frames = sorted({frames[round(k * last / (CHECK_FRAMES - 1))] for k in range(CHECK_FRAMES)})
            fact["check"].append({"file": m.name, "frames": frames})
        if out.after_png is not None:
            stem = _stem(m.file)
            fact["thumbnails"].append({"after": f"{stem}_after.png", "before": f"{stem}_before.png"})

    def _removed_found(self, m: _Member, index: int, fact: dict) -> None:
        """Fail closed (policy ``all_text``, which blanks every text block): text the screen found
        in this file (``index`` among the screened files) must lie in a box the cleaner filled, on
        the same frame; else the file is withheld.  (``identifiers_only`` keeps text it judges
        harmless; the pixel leak check reads what it keeps.)"""
        done = m.outcome.redactions if m.outcome else []
        for f in fact["found"]:
            if f["file"] != index:
                continue
            if not any(r.frame == f["frame"] and intersection(r.box, tuple(f["box"])) > 0 for r in done):
                fact["check"] = [c for c in fact["check"] if c["file"] != m.name]
                self._withhold(m, f"burned-in text the screen found on frame {f['frame']} was not removed by "
                                  "the cleaner", fact)
                return

    def _withhold(self, m: _Member, reason: str, fact: dict) -> None:
        m.staged.unlink(missing_ok=True)
        m.entry["withheld"] = True
        self.bad.append((m.relpath, reason))
        fact["withheld"] += 1


def _value(header, keyword: str):
    if header is None:
        return None
    try:
        v = header.get(keyword)
    except Exception:
        return None
    return None if v is None else (str(v).strip() if keyword.endswith("UID") else v)




