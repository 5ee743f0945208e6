"""Sidecar scrubbing (deidflow.sidecar): allow-list, options, dates, ages, UIDs."""
from __future__ import annotations

import json

import pytest

from deidflow.sidecar import (CLASSES, capped_age, field_classes, scrub_sidecar, shift_date_value,
                              sidecar_text)

# What dcm2niix -ba n writes for a Siemens head scan (shape of dcm_qa_xa30), with planted identity.
RAW = {
    "Modality": "MR",
    "MagneticFieldStrength": 3,
    "Manufacturer": "Siemens",
    "InstitutionName": "Planted Hospital Northwood",
    "InstitutionalDepartmentName": "None",
    "InstitutionAddress": "1 Elm Street,Springfield",
    "DeviceSerialNumber": "67093",
    "StationName": "MRC35062",
    "SeriesInstanceUID": "1.3.12.2.1107.5.2.43.67093.2022071112080803357602701.0.0.0",
    "StudyID": "8fd8f3b7-572e-42",
    "PatientName": "Doe^Jane",
    "PatientID": "PID-778899",
    "PatientBirthDate": "1931-01-01",
    "PatientSex": "F",
    "PatientWeight": 72.5,
    "PatientAge": 93,
    "ProcedureStepDescription": "Doe research scan",
    "SeriesDescription": "T1 MPRAGE Jane 2022-07-11",
    "ProtocolName": "anat-T1w_acq-tfl",
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "NONE"],
    "ImageComments": "patient Doe moved",
    "AcquisitionTime": "12:05:17.042500",
    "AcquisitionDateTime": "2022-07-11T12:05:17.042500",
    "ConsistencyInfo": "63010001",
    "ReceiveCoilName": "HeadNeck_64",
    "EchoTime": 0.00241,
    "SliceTiming": [0.0, 0.5, 0.25],
    "BidsGuess": ["anat", "_acq-tfl_run-5_T1w"],
    "SomeVendorFreeText": "Jane Doe, ward 5",
    "TaskName": "rest",
}
PLANTED = ["Northwood", "Elm Street", "67093", "MRC35062", "1.3.12.2.1107", "8fd8f3b7", "Doe", "Jane",
           "PID-778899", "1931", "2022-07-11", "12:05:17"]


def _text(d):
    return json.dumps(d)


def test_basic_profile_removes_identity_and_keeps_acquisition():
    out, actions = scrub_sidecar(RAW)
    text = _text(out)
    for planted in PLANTED:
        assert planted not in text, planted
    for kept in ("Modality", "MagneticFieldStrength", "EchoTime", "SliceTiming", "ConsistencyInfo",
                 "ReceiveCoilName", "TaskName", "ImageType"):
        assert out[kept] == RAW[kept], kept
    assert actions["SomeVendorFreeText"] == "X"  # allow-list: unknown fields go
    assert actions["PatientSex"] == "X" and actions["PatientAge"] == "X"
    assert actions["SeriesDescription"] == "X" and actions["AcquisitionTime"] == "X"
    assert list(out) == [k for k in RAW if k in out]  # order kept
    assert set(actions) == set(RAW)


def test_options_keep_shift_and_clean():
    opts = ["retain_long_modified_dates", "clean_descriptors", "retain_patient_characteristics",
            "retain_device_identity", "retain_institution_identity"]
    out, actions = scrub_sidecar(RAW, options=opts, date_offset_days=-10, uid=lambda u: "2.25.42")
    assert out["AcquisitionDateTime"] == "2022-07-01T12:05:17.042500" and actions["AcquisitionDateTime"] == "C"
    assert out["AcquisitionTime"] == RAW["AcquisitionTime"]  # times of day are kept with shifted days
    assert out["SeriesInstanceUID"] == "2.25.42" and actions["SeriesInstanceUID"] == "U"
    assert out["PatientAge"] == 90 and out["PatientSex"] == "F"
    assert out["DeviceSerialNumber"] == "67093" and out["InstitutionName"] == RAW["InstitutionName"]
    assert "Doe" not in out["SeriesDescription"] and "Jane" not in out["SeriesDescription"]
    assert "2022" not in out["SeriesDescription"] and out["SeriesDescription"].startswith("T1 MPRAGE")
    assert "Doe" not in out["ImageComments"] and "PatientName" not in out and "PatientBirthDate" not in out


def test_full_dates_and_retain_uids():
    out, _ = scrub_sidecar(RAW, options=["retain_long_full_dates", "retain_uids"])
    assert out["AcquisitionDateTime"] == RAW["AcquisitionDateTime"]
    assert out["SeriesInstanceUID"] == RAW["SeriesInstanceUID"]


def test_modified_dates_without_offset_removes_dates():
    out, actions = scrub_sidecar(RAW, options=["retain_long_modified_dates"])
    assert "AcquisitionDateTime" not in out and actions["AcquisitionDateTime"] == "X"


def test_identifiers_in_kept_text_are_redacted_but_placeholders_are_not():
    raw = {**RAW, "ReceiveCoilName": "coil of PID-778899"}
    out, actions = scrub_sidecar(raw, identifiers=["Northwood General"])
    assert out["ReceiveCoilName"] == "coil of *" and actions["ReceiveCoilName"] == "C"
    assert out["ImageType"][3] == "NONE"  # "None" as a department name is a placeholder, not an identifier


def test_helpers():
    assert shift_date_value("2022-07-11", 1) == "2022-07-12"
    assert shift_date_value("20220711", -11) == "20220630"
    assert shift_date_value("2022-07-11T23:59:59", 1) == "2022-07-12T23:59:59"
    assert capped_age("095Y") == 90 and capped_age("031Y") == 31 and capped_age("006M") == 0.5
    assert capped_age("garbage") is None and capped_age(89.9) == 89
    text = sidecar_text({"b": 1, "a": "é"})
    assert text == '{\n  "b": 1,\n  "a": "é"\n}\n'


def test_field_table_is_consistent():
    table = field_classes()
    assert set(table.values()) <= set(CLASSES)
    for name in ("RepetitionTime", "EchoTime", "FlipAngle", "PhaseEncodingDirection", "SliceTiming",
                 "MagneticFieldStrength", "ImageType", "TotalReadoutTime", "EffectiveEchoSpacing"):
        assert table[name] == "keep", name
    for name in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        assert table[name] == "remove", name
    with pytest.raises(ValueError):
        scrub_sidecar(RAW, extra={"X": "nonsense"})
