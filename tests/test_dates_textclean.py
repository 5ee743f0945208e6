"""Date shifting and free-text cleaning."""
from __future__ import annotations

import datetime as dt

import pytest

from deidflow import dates, textclean


def test_shift_da_keeps_intervals():
    a, b = "20200110", "20200216"
    sa, sb = dates.shift_da(a, -100), dates.shift_da(b, -100)
    d = lambda s: dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))  # noqa: E731
    assert (d(sb) - d(sa)).days == (d(b) - d(a)).days == 37
    assert (d(a) - d(sa)).days == 100


@pytest.mark.parametrize("value,expected", [
    ("20200301120000.123456+0100", "20200221120000.123456+0100"),
    ("202003", "202002"),
    ("2020", "2019"),  # year precision: anchored at 1 January, then shifted
    ("20200301", "20200221"),
])
def test_shift_dt_keeps_precision_and_time(value, expected):
    assert dates.shift_dt(value, -9) == expected


def test_shift_multivalue_and_acr_nema_form():
    assert dates.shift("20200101\\20200102", "DA", -1) == "20191231\\20200101"
    assert dates.shift_da("2020.01.02", -1) == "20200101"


@pytest.mark.parametrize("bad", ["2020013", "20201301", "abc", "2020-01-01"])
def test_invalid_dates_raise(bad):
    with pytest.raises(dates.DateError):
        dates.shift_da(bad, 1)


def test_clean_text_removes_identifiers_keeps_meaning():
    from deidflow.qc.identifiers import IdentifierModel
    model = IdentifierModel([("name", "PatientName", "DOE^JOHN"), ("id", "PatientID", "MRN12345"),
                             ("date", "PatientBirthDate", "19610312")])
    out = textclean.clean_text(model.redact_text(
        "T1 MPRAGE for John Doe, born 12.03.1961, MRN12345, call +49 40 1234567"))
    for gone in ("John", "Doe", "1961", "12345", "1234567"):
        assert gone not in out
    assert out.startswith("T1 MPRAGE for")


def test_clean_text_generic_patterns_without_identifiers():
    assert textclean.clean_text("seen 2021-04-03 by MUELLER^HANS, mail a.b@c.org") == "seen * by *, mail *"
    assert textclean.clean_text("t1_fl2d_sag") == "t1_fl2d_sag"
