"""Telemetry JSON parsing, device ids and the rejection type (pipeline/decode)."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from pipeline.decode import (
    Reason,
    RejectedRecord,
    Stage,
    TelemetryLimits,
    device_id,
    parse_telemetry,
)
from tests.factory import mutate


def reason_of(value: bytes, max_bytes: int = 64 * 1024) -> Reason:
    with pytest.raises(RejectedRecord) as info:
        parse_telemetry(value, TelemetryLimits(max_bytes))
    return info.value.reason


# --- telemetry: what is accepted ---------------------------------------------------------


def test_numeric_fields_are_metrics() -> None:
    value = b'{"temperature_c": 41.2, "vibration_rms": 0.83, "door_open": 0, "big": -3e300}'
    metrics = parse_telemetry(value)
    assert metrics == {
        "temperature_c": 41.2,
        "vibration_rms": 0.83,
        "door_open": 0.0,
        "big": -3e300,
    }
    assert all(type(v) is float for v in metrics.values())


def test_booleans_count_as_zero_and_one() -> None:
    metrics = parse_telemetry(b'{"on": true, "off": false}')
    assert metrics == {"on": 1.0, "off": 0.0}
    assert all(type(v) is float for v in metrics.values())  # not bool, although bool is an int


def test_non_numeric_fields_are_ignored() -> None:
    value = b'{"t": 1, "s": "3.5", "n": null, "o": {"x": 1}, "a": [1, 2], "e": {}}'
    assert parse_telemetry(value) == {"t": 1.0}


def test_empty_object_has_no_metrics() -> None:
    assert parse_telemetry(b" {} \n") == {}


def test_unicode_names_and_a_huge_integer_are_fine() -> None:
    value = json.dumps({"températur": 1, "n": 10**300}).encode()
    assert parse_telemetry(value) == {"températur": 1.0, "n": 1e300}


def test_exactly_the_byte_limit_is_accepted() -> None:
    value = b'{"x": 1}'
    assert parse_telemetry(value, TelemetryLimits(max_bytes=len(value))) == {"x": 1.0}


# --- telemetry: what is rejected, and why ------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b'{"x": NaN}',
        b'{"x": Infinity}',
        b'{"x": -Infinity}',
        b'{"x": 1e999}',
        b'{"x": -1e999}',
        b'{"x": 1' + b"0" * 400 + b"}",  # an integer beyond float range
        b'{"ignored": {"deep": [NaN]}}',  # also inside fields that would be ignored
    ],
)
def test_non_finite_numbers_are_rejected(value: bytes) -> None:
    with pytest.raises(RejectedRecord) as info:
        parse_telemetry(value)
    assert (info.value.stage, info.value.reason) == (Stage.DECODE, Reason.TELEMETRY_NON_FINITE)


@pytest.mark.parametrize("value", [b"[1, 2]", b"42", b'"text"', b"null", b"true"])
def test_non_objects_are_rejected(value: bytes) -> None:
    assert reason_of(value) == Reason.TELEMETRY_NOT_OBJECT


def test_over_64_kib_is_rejected_before_parsing() -> None:
    value = b'{"x": "' + b"a" * (64 * 1024) + b'"}'
    assert reason_of(value) == Reason.TELEMETRY_TOO_LARGE
    assert reason_of(b"\xff" * (64 * 1024 + 1)) == Reason.TELEMETRY_TOO_LARGE  # size first


@pytest.mark.parametrize("value", [b'{"x": "\xff"}', b'{"t\xc3": 1}', b"\xef\xbb"])
def test_invalid_utf8_is_rejected(value: bytes) -> None:
    assert reason_of(value) == Reason.TELEMETRY_NOT_UTF8


@pytest.mark.parametrize(
    "value",
    [
        b'{"x": 1',
        b"{'x': 1}",
        b'{"x": 1} {"y": 2}',
        b'\xef\xbb\xbf{"x": 1}',  # a byte-order mark
    ],
)
def test_invalid_json_is_rejected(value: bytes) -> None:
    assert reason_of(value) == Reason.TELEMETRY_NOT_JSON


@pytest.mark.parametrize("value", [b"[" * 60000, b'{"a":' * 10000 + b"1" + b"}" * 10000])
def test_json_nested_past_the_limit_is_too_deep(value: bytes) -> None:
    assert reason_of(value) == Reason.TELEMETRY_TOO_DEEP


def test_empty_value_is_rejected() -> None:
    assert reason_of(b"") == Reason.EMPTY_VALUE


def test_fuzzed_json_only_ever_raises_rejected_record() -> None:
    original = json.dumps(
        {
            "temperature_c": 41.2,
            "door_open": True,
            "vibration_rms": 0.83,
            "site": "b7",
            "nested": {"a": [1, 2.5, None]},
            "count": 12,
        }
    ).encode()
    rng, outcomes = random.Random(20260103), {"parsed": 0, "rejected": 0}
    for _ in range(2000):
        try:
            metrics = parse_telemetry(mutate(original, rng))
        except RejectedRecord as err:
            assert err.reason in set(Reason) and err.message
            outcomes["rejected"] += 1
        else:
            assert all(type(v) is float for v in metrics.values())
            outcomes["parsed"] += 1
    assert outcomes["rejected"] > 500 and outcomes["parsed"] > 50  # both paths exercised


# --- device id (the record key) ----------------------------------------------------------


@pytest.mark.parametrize("key", [b"cell-07", b"a", b"site:3.cam_1-A", b"x" * 128])
def test_valid_device_ids(key: bytes) -> None:
    assert device_id(key) == key.decode()


@pytest.mark.parametrize("key", [None, b""])
def test_missing_key(key: bytes | None) -> None:
    with pytest.raises(RejectedRecord) as info:
        device_id(key)
    assert (info.value.stage, info.value.reason) == (Stage.VALIDATE, Reason.MISSING_KEY)


@pytest.mark.parametrize(
    "key",
    [b"x" * 129, b"cell 07", b"cell/07", b"caf\xc3\xa9", b"\xff\xfe", b"cell-07\n", b"a\x00"],
)
def test_invalid_device_ids(key: bytes) -> None:
    with pytest.raises(RejectedRecord) as info:
        device_id(key)
    assert (info.value.stage, info.value.reason) == (Stage.VALIDATE, Reason.INVALID_KEY)


# --- the rejection itself ----------------------------------------------------------------


def test_rejection_carries_its_fields_and_survives_pickling() -> None:
    err = RejectedRecord("decode", "image_corrupt", "bad scan; check the camera")
    assert (err.stage, err.reason, err.message) == (
        "decode",
        "image_corrupt",
        "bad scan; check the camera",
    )
    assert str(err) == "decode/image_corrupt: bad scan; check the camera"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.stage, copy.reason, copy.message) == (err.stage, err.reason, err.message)


def test_unknown_stage_or_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        RejectedRecord("parse", Reason.IMAGE_CORRUPT, "x")
    with pytest.raises(ValueError):
        RejectedRecord(Stage.DECODE, "it_broke", "x")


def test_reason_codes_are_snake_case_and_unique() -> None:
    assert len(Reason.__members__) == len(list(Reason))  # two names with one value alias
    values = [r.value for r in Reason]
    assert all(v.replace("_", "").isalnum() and v == v.lower() for v in values)
