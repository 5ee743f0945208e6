"""The interface every non-DICOM format module implements, and the helpers they share.

See :mod:`deidflow.formats` for the contract.  Nothing here knows a file format: the context
(who the subject is, which profile options apply, how dates move), the result (what was done,
which original values were found), the error type that becomes a quarantine reason, and
atomic multi-file output.
"""
from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..dates import DateError, shift_da
from ..errors import PublicError
from ..pseudonym import Pseudonymizer
from .. import textclean
from ..qc.identifiers import IdentifierModel
from ..textclean import clean_text


class FormatError(PublicError):
    """A file of a supported format cannot be de-identified (damaged, truncated, inconsistent).

    The message is a one-line quarantine reason built from format facts only (sizes, field
    names), never from an original value."""


@dataclass
class ScrubContext:
    """What a format module needs to scrub one subject's file.

    ``settings`` is the job's profile settings (:func:`deidflow.settings.profile_settings`):
    ``options`` (PS3.15 option names, applied to the matching non-DICOM fields) and anything
    else; ``formats`` is the ``formats`` section of the configuration (NIfTI extension policy).
    ``date_offset`` is the subject's day shift (used with ``retain_long_modified_dates``).
    ``known`` holds the subject's original identifying values (from the inventory) that free
    text is cleaned of, in addition to the file's own.
    """

    subject: str
    pseudo: Pseudonymizer
    date_offset: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    formats: Mapping[str, Any] = field(default_factory=dict)
    known: Iterable[str] = ()

    def option(self, name: str) -> bool:
        return name in (self.settings.get("options") or ())

    @property
    def date_policy(self) -> str:
        """``keep`` (retain_long_full_dates), ``shift`` (retain_long_modified_dates) or ``remove``."""
        if self.option("retain_long_full_dates"):
            return "keep"
        if self.option("retain_long_modified_dates") and self.date_offset is not None:
            return "shift"
        return "remove"

    def date(self, yyyymmdd: str) -> str | None:
        """A YYYYMMDD date under the date policy: kept, shifted, or None (remove it)."""
        policy = self.date_policy
        if policy == "keep":
            return yyyymmdd
        if policy == "shift":
            try:
                return shift_da(yyyymmdd, self.date_offset)
            except DateError:
                return None
        return None

    def identifier_model(self, extra: Iterable[str] = ()) -> IdentifierModel:
        """The subject's identifier model (:class:`deidflow.qc.identifiers.IdentifierModel`) from
        its known values (inventory) and ``extra`` values found in the file: what every kept text
        value is swept of."""
        model = IdentifierModel()
        for v in [*self.known, *extra]:
            model.add_guess("known", str(v))
        return model

    def clean(self, text: str, extra: Iterable[str] = ()) -> str:
        """``text`` without the subject's identifiers or generic identifier patterns."""
        return clean_text(self.identifier_model(extra).redact_text(text))

    def clean_fixed(self, text: str, extra: Iterable[str] = ()) -> str:
        """Like :meth:`clean` but every removed character becomes ``*``, so the length stays
        (for in-place edits of fixed-size fields and length-prefixed buffers)."""
        text = self.identifier_model(extra).redact_text(text, same_length=True)
        return textclean._GENERIC.sub(lambda m: "*" * len(m.group()), text)

    def clean_fixed_bytes(self, raw: bytes, extra: Iterable[str] = ()) -> bytes:
        """:meth:`clean_fixed` for the bytes of a field that declares no encoding: the subject's
        identifiers are found in them as the leak scan finds them (UTF-8, Latin-1, UTF-16,
        decomposed accents), then generic patterns; every removed byte becomes ``*``."""
        raw = self.identifier_model(extra).redact(raw)
        text = textclean._GENERIC.sub(lambda m: "*" * len(m.group()), raw.decode("latin-1"))
        return text.encode("latin-1")

    def identifying_numbers(self, values: Iterable[float], extra: Iterable[str] = ()) -> list[int]:
        """The positions in ``values`` (a numeric field's numbers) of those that write one of the
        subject's identifiers (an MRN, a birth date YYYYMMDD stored as a number)."""
        model = self.identifier_model(extra)
        return sorted({i for i, _ in model.matcher.numbers(values)}) if model.entries else []

    def pseudonym_of_length(self, n: int, domain: str = "") -> str:
        """The subject pseudonym padded with ``X`` or cut to exactly ``n`` characters (for
        equal-length in-place replacements); keyed, so it is the same for every file."""
        base = self.subject
        if domain:
            base = f"{self.subject}-{domain}"
        return (base + "X" * n)[:n]

    @staticmethod
    def companion_path(dst: Path, ext: str) -> Path:
        """Where the companion with extension ``ext`` of output ``dst`` goes (common stem)."""
        dst = Path(dst)
        return dst.with_name(stem_of(dst.name) + ext)


@dataclass
class ScrubResult:
    """What ``scrub`` wrote and did.  ``actions``: field → action word (audit, no values);
    ``identifiers``: field → original value found (restricted, for the leak scan)."""

    outputs: list[Path] = field(default_factory=list)
    actions: dict[str, str] = field(default_factory=dict)
    identifiers: dict[str, str] = field(default_factory=dict)

    def act(self, name: str, action: str) -> None:
        self.actions[name] = action

    def found(self, name: str, value: Any) -> None:
        """Record an original identifying value (ignored when empty)."""
        if value is None:
            return
        text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        text = text.strip("\x00 \t\r\n")
        if text:
            self.identifiers[name] = text


@dataclass(frozen=True)
class Format:
    """One format's functions, registered under a :mod:`deidflow.sniff` format name."""

    name: str
    release_dir: str                         # folder under <release>/sourcedata/
    identity: Callable[[Path], dict]
    companions: Callable[[Path], list[Path]]
    scrub: Callable[[Path, Path, ScrubContext], ScrubResult]
    extension: Callable[[Path], str]         # extension of the released file (".nii.gz")


_MULTI_EXT = (".nii.gz", ".hdr.gz", ".img.gz", ".mnc.gz")


def stem_of(name: str) -> str:
    """File name without its (possibly double) extension."""
    low = name.lower()
    for e in _MULTI_EXT:
        if low.endswith(e):
            return name[: -len(e)]
    return os.path.splitext(name)[0]


class Outputs:
    """Atomic output of several files: ``path(final)`` gives a temporary path next to ``final``;
    on success every temporary is renamed into place, on any error all are removed.

    >>> with Outputs() as out:
    ...     write(out.path(dst)); write(out.path(companion))
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".part")
        os.close(fd)
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    @property
    def finals(self) -> list[Path]:
        return [f for _, f in self._pending]

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            for tmp, final in self._pending:
                os.replace(tmp, final)
            return
        for tmp, final in self._pending:
            for p in (tmp,):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass


def copy_exact(src, dst, n: int, chunk: int = 1 << 22) -> int:
    """Copy ``n`` bytes (or to EOF when n < 0) from file object ``src`` to ``dst``; returns the
    number copied (less than ``n`` when the source ends early)."""
    done = 0
    while n < 0 or done < n:
        want = chunk if n < 0 else min(chunk, n - done)
        buf = src.read(want)
        if not buf:
            break
        dst.write(buf)
        done += len(buf)
    return done


def same_length(value: bytes, replacement: bytes, fill: bytes = b"X") -> bytes:
    """``replacement`` padded with ``fill`` or cut to exactly ``len(value)`` bytes."""
    n = len(value)
    return (replacement + fill * n)[:n]


# ------------------------------------------------------------------------------------------------
# Gzip-transparent input and output (NIfTI .nii.gz, MGZ)
# ------------------------------------------------------------------------------------------------
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_input(path: Path):
    """``path`` opened for binary reading, gunzipped on the fly when it is gzip."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


@contextmanager
def scrub_stream(src: Path) -> Iterator[tuple[Any, Outputs, bool]]:
    """For a scrubber that streams a possibly gzipped file: (input stream, the outputs, whether the
    input is gzip, so the output is too); a damaged compressed stream becomes a FormatError."""
    gz = is_gzip(src)
    try:
        with open_input(src) as fh, Outputs() as out:
            yield fh, out, gz
    except GZIP_ERRORS as exc:
        raise FormatError(f"compressed stream damaged ({type(exc).__name__})") from None
