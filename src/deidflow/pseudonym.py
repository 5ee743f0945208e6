"""Keyed, stateless pseudonyms: subject labels, UIDs and per-patient date offsets.

Everything is HMAC-SHA256 of the original value under a secret key, so the same key and input give
the same output in any job, on any machine, in any order, and later additions stay consistent.
The key itself is never written anywhere; only its fingerprint is.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

KEY_ENV = "DEIDFLOW_KEY"
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is small; more is a wrong file (or /dev/zero), not a key
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class MissingKeyError(RuntimeError):
    """No usable secret key was provided."""


def load_key(key_file: str | os.PathLike | None = None, *, env: dict | None = None) -> bytes:
    """Return the secret key from ``key_file`` or the ``DEIDFLOW_KEY`` environment variable.

    Refuses (raises :class:`MissingKeyError`) when neither is set or the key is shorter than 16 bytes.
    """
    env = os.environ if env is None else env
    if key_file:
        path = Path(key_file)
        raw = _read_key_file(path)
        source = f"key file {path}"
    elif env.get(KEY_ENV):
        raw = env[KEY_ENV].encode("utf-8", "surrogateescape").strip()  # as a key file's bytes are stripped
        source = f"${KEY_ENV}"
    else:
        raise MissingKeyError(
            f"no secret key: set ${KEY_ENV} or pass --key-file (config key_file). "
            "deidflow refuses to pseudonymize without a key; 'deidflow demo' makes an ephemeral one."
        )
    if len(raw) < MIN_KEY_BYTES:
        raise MissingKeyError(f"the key from {source} is shorter than {MIN_KEY_BYTES} bytes")
    return raw


def _read_key_file(path: Path) -> bytes:
    """The stripped bytes of a key file: a regular file (every job reads it again, so a pipe or a
    device cannot serve as one) of at most MAX_KEY_FILE_BYTES, read no further than that."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on a regular file)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise MissingKeyError(f"key file {path} is not a regular file (a pipe such as --key-file <(…), "
                                      "or a device, cannot serve as one: every job reads the key file again); "
                                      "use a file made by 'deidflow keygen FILE'")
            raw = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise MissingKeyError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise MissingKeyError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES // 1024} KiB: not a key "
                              "file; use a file made by 'deidflow keygen FILE'")
    return raw.strip()


def ephemeral_key() -> bytes:
    """A random key for demos; never stored."""
    return secrets.token_hex(32).encode("ascii")


def fingerprint(key: bytes) -> str:
    """A public 16-hex-digit fingerprint that identifies the key without revealing it."""
    return hmac.new(key, b"deidflow-key-fingerprint", hashlib.sha256).hexdigest()[:16]


def patient_key(patient_id: str, issuer: str = "") -> str:
    """The identity string a subject is derived from (PatientID qualified by its issuer)."""
    return f"{issuer.strip()}\x1f{patient_id.strip()}"


@dataclass
class Pseudonymizer:
    """HMAC-based pseudonyms under one key; caches UID results within a process."""

    key: bytes
    length: int = 8
    prefix: str = "sub-"
    offset_range: tuple[int, int] = (-365, -1)
    mapping: dict[str, str] = field(default_factory=dict)
    _uid_cache: dict[str, str] = field(default_factory=dict, repr=False)

    def _digest(self, domain: str, value: str) -> bytes:
        return hmac.new(self.key, f"{domain}\x00{value}".encode("utf-8"), hashlib.sha256).digest()

    def _label(self, domain: str, value: str, length: int) -> str:
        b32 = base64.b32encode(self._digest(domain, value)).decode("ascii").lower()
        return b32[:length]

    def subject(self, pkey: str, patient_id: str | None = None) -> str:
        """``sub-XXXXXXXX`` for a patient; a user mapping (PatientID → label) takes precedence."""
        if patient_id is not None and patient_id.strip() in self.mapping:
            return self.prefix + self.mapping[patient_id.strip()]
        return self.prefix + self._label("subject", pkey, self.length)

    def session(self, study_uid: str) -> str:
        """``ses-XXXXXX`` for a study (stateless: stable when studies are added later)."""
        return "ses-" + self._label("session", study_uid, 6)

    def series(self, series_uid: str) -> str:
        """Short keyed label for a series folder."""
        return self._label("series", series_uid, 6)

    def source_id(self, relpath: str) -> str:
        """Opaque id of an input file, used in audits instead of its name (any file-name bytes)."""
        return self._label("source", os.fsencode(relpath).hex(), 16)

    def uid(self, original: str) -> str:
        """``2.25.<int>`` from the HMAC of the original UID (a UUIDv8-shaped 128-bit integer)."""
        hit = self._uid_cache.get(original)
        if hit is None:
            b = bytearray(self._digest("uid", original)[:16])
            b[6] = (b[6] & 0x0F) | 0x80  # UUID version 8 (custom)
            b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
            hit = "2.25." + str(int.from_bytes(b, "big"))
            self._uid_cache[original] = hit
        return hit

    def same_length_uid(self, original: str) -> str:
        """A keyed UID of exactly the original's length and dot pattern, for UIDs embedded in
        binary private blobs (Siemens CSA) where offsets must not move."""
        digest = self._digest("embedded-uid", original)
        stream = "".join(str(b % 10) for b in digest * (len(original) // len(digest) + 1))
        out, i = [], 0
        for k, ch in enumerate(original):
            if ch == ".":
                out.append(".")
                continue
            d = stream[i]
            i += 1
            first = k == 0 or original[k - 1] == "."
            last = k + 1 == len(original) or original[k + 1] == "."
            if first and not last and d == "0":
                d = "1"  # no leading zero in a multi-digit component
            out.append(d)
        return "".join(out)

    def date_offset(self, pkey: str) -> int:
        """Per-patient day offset in ``offset_range`` (inclusive); times are not shifted."""
        lo, hi = self.offset_range
        n = int.from_bytes(self._digest("date-offset", pkey)[:8], "big")
        return lo + n % (hi - lo + 1)


def load_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Read a trust-centre mapping CSV with columns ``id_old,id_new`` (PatientID → label)."""
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or {"id_old", "id_new"} - set(reader.fieldnames):
            raise ValueError(f"mapping file {path} needs the columns id_old,id_new")
        for n, row in enumerate(reader, start=2):
            new = row["id_new"].strip()
            if new.startswith("sub-"):
                new = new[4:]
            if not _LABEL_RE.match(new):
                raise ValueError(f"mapping file {path} line {n}: id_new must be alphanumeric (BIDS label)")
            if row["id_old"].strip() in mapping:
                raise ValueError(f"mapping file {path} line {n}: id_old appears twice")
            mapping[row["id_old"].strip()] = new
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"mapping file {path}: two patients map to the same id_new")
    if len({v.lower() for v in mapping.values()}) != len(mapping):
        # sub-AB and sub-ab are one folder on a case-insensitive file system (macOS, exFAT, SMB):
        # the second patient's publish replaced the first's, or merged into it
        raise ValueError(f"mapping file {path}: two patients map to id_new labels that differ only in letter case")
    return mapping
