"""Hostile input at the decoders: each gets the reason that names its fault (issue 19.4)."""

from __future__ import annotations

import struct

import pytest

from pipeline.decode import Reason, RejectedRecord, parse_telemetry, probe_image
from tests.factory import png


def _reason(fn, *args) -> Reason:
    with pytest.raises(RejectedRecord) as caught:
        fn(*args)
    return caught.value.reason


def test_json_nested_a_thousand_deep_is_too_deep_not_invalid_json() -> None:
    assert _reason(parse_telemetry, b"[" * 1000 + b"]" * 1000) == Reason.TELEMETRY_TOO_DEEP
    deep_object = b'{"a":' * 1000 + b"1" + b"}" * 1000
    assert _reason(parse_telemetry, deep_object) == Reason.TELEMETRY_TOO_DEEP


def test_nesting_within_the_limit_and_brackets_in_strings_still_parse() -> None:
    assert parse_telemetry(b'{"a": [[[1]]], "t": 21.5}') == {"t": 21.5}
    assert parse_telemetry(b'{"s": "' + b"[" * 500 + b'", "x": 1}') == {"x": 1.0}
    assert parse_telemetry(b'{"s": "\\"' + b"{" * 500 + b'", "x": 2}') == {"x": 2.0}


def test_a_whole_png_with_a_chunk_claiming_two_gigabytes_is_corrupt_not_truncated() -> None:
    whole = png()
    ihdr_end = 8 + 12 + 13
    lying = struct.pack(">I4s", 2**31 - 1, b"tEXt") + b"comment" + b"\x00" * 4
    value = whole[:ihdr_end] + lying + whole[ihdr_end:]
    assert _reason(probe_image, value, "image/png") == Reason.IMAGE_CORRUPT


def test_a_png_cut_short_is_still_truncated() -> None:
    assert _reason(probe_image, png()[:-20], "image/png") == Reason.IMAGE_TRUNCATED
