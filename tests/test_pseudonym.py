"""Keys, pseudonyms, UIDs and date offsets."""
from __future__ import annotations

import re

import pytest

from deidflow.pseudonym import (MissingKeyError, Pseudonymizer, fingerprint, load_key, load_mapping,
                                patient_key)

KEY = b"k" * 32


def test_refuses_without_key(monkeypatch):
    monkeypatch.delenv("DEIDFLOW_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="no secret key"):
        load_key(None)


def test_key_from_env_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DEIDFLOW_KEY", "env-key-0123456789abcdef")
    assert load_key(None) == b"env-key-0123456789abcdef"
    f = tmp_path / "key"
    f.write_text("file-key-0123456789abcdef\n")
    assert load_key(f) == b"file-key-0123456789abcdef"  # file wins, newline stripped


def test_short_key_refused(monkeypatch):
    monkeypatch.setenv("DEIDFLOW_KEY", "short")
    with pytest.raises(MissingKeyError, match="shorter than 16"):
        load_key(None)


def test_fingerprint_does_not_reveal_key():
    fp = fingerprint(KEY)
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and KEY.decode() not in fp
    assert fingerprint(b"x" * 32) != fp


def test_subject_label_is_keyed_and_bids_safe():
    a, b = Pseudonymizer(KEY), Pseudonymizer(b"j" * 32)
    pk = patient_key("12345", "HOSP")
    s = a.subject(pk)
    assert re.fullmatch(r"sub-[a-z2-7]{8}", s)
    assert a.subject(pk) == s and b.subject(pk) != s
    assert a.subject(patient_key("12345", "OTHER")) != s  # issuer qualifies the ID
    assert Pseudonymizer(KEY, length=12).subject(pk).startswith(s)


def test_uid_is_2_25_uuid_and_stable():
    p = Pseudonymizer(KEY)
    u = p.uid("1.2.840.113619.2.55.3.1234")
    assert u.startswith("2.25.") and len(u) <= 64
    n = int(u[5:])
    assert n < 2 ** 128 and (n >> 76) & 0xF == 8  # UUID version 8
    assert Pseudonymizer(KEY).uid("1.2.840.113619.2.55.3.1234") == u
    assert Pseudonymizer(b"j" * 32).uid("1.2.840.113619.2.55.3.1234") != u


def test_date_offset_in_range_and_per_patient():
    p = Pseudonymizer(KEY, offset_range=(-30, -10))
    offsets = {p.date_offset(patient_key(str(i))) for i in range(200)}
    assert min(offsets) >= -30 and max(offsets) <= -10 and len(offsets) > 10
    assert p.date_offset(patient_key("7")) == Pseudonymizer(KEY, offset_range=(-30, -10)).date_offset(patient_key("7"))


def test_user_mapping(tmp_path):
    f = tmp_path / "map.csv"
    f.write_text("id_old,id_new\nPAT001,tc0001\nPAT002,sub-tc0002\n")
    mapping = load_mapping(f)
    p = Pseudonymizer(KEY, mapping=mapping)
    assert p.subject(patient_key("PAT001"), "PAT001") == "sub-tc0001"
    assert p.subject(patient_key("PAT002"), "PAT002") == "sub-tc0002"
    assert p.subject(patient_key("PAT003"), "PAT003").startswith("sub-")


@pytest.mark.parametrize("text,match", [
    ("id_old,id_new\nA,x_y\n", "alphanumeric"),
    ("id_old,id_new\nA,x1\nA,x2\n", "twice"),
    ("id_old,id_new\nA,x1\nB,x1\n", "same id_new"),
    ("old,new\nA,x1\n", "columns"),
])
def test_bad_mapping_rejected(tmp_path, text, match):
    f = tmp_path / "map.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_mapping(f)
