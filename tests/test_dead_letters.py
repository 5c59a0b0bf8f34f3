"""Dead letters a reader can trust and a broker always takes (issue 19, parts 1 and 4)."""

from __future__ import annotations

from pipeline.decode import Reason, RejectedRecord
from pipeline.records import Record
from pipeline.stream.outputs import dead_letter, fit_dead_letter, record_digest, wire_bytes
from tests.factory import T0, TOPICS

TOPIC_LIMIT = 10_485_760  # what `iotfuse topics` gives the camera and dead-letter topics
# the hostile recipe: a record just under the camera topic's limit, so that the worker's
# error headers take its dead letter over the dead-letter topic's equal limit
PAD = TOPIC_LIMIT - 200


def _letter(key: bytes | None, value: bytes | None, headers=(), ts: int = T0) -> object:
    rec = Record(TOPICS.camera, 0, 7, ts, key, value, tuple(headers))
    error = RejectedRecord("validate", Reason.UNSUPPORTED_FORMAT, "not an image")
    return dead_letter(rec, error, TOPICS.deadletter)


def _header(out, name: str) -> bytes | None:
    values = [v for k, v in out.headers if k == name]
    assert len(values) == 1, f"{name}: {len(values)} headers"
    return values[0]


def test_a_dead_letter_that_fits_is_sent_unchanged() -> None:
    out = _letter(b"cam-1", b"\x00" * 5000)
    assert fit_dead_letter(out, wire_bytes(out.key, out.value, out.headers)) is out


def test_too_large_a_value_is_left_out_first_with_its_size_and_a_digest() -> None:
    out = _letter(b"cam-1", b"\x00" * 5000)
    slim = fit_dead_letter(out, wire_bytes(out.key, out.value, out.headers) - 1)
    assert slim.value == b"" and slim.key == b"cam-1" and slim.holds == out.holds
    assert _header(slim, "iotfuse.error.value_omitted") == b"5000"
    assert _header(slim, "iotfuse.error.omitted") == b"value=5000"
    original = tuple(h for h in out.headers if not h[0].startswith("iotfuse.error."))
    assert (
        _header(slim, "iotfuse.error.digest")
        == record_digest(out.key, out.value, original).encode()
    )
    assert _header(slim, "iotfuse.error.reason") == b"unsupported_format"


def test_an_oversized_header_is_left_out_after_the_value_and_the_letter_fits() -> None:
    out = _letter(b"dev-1", b"not an image", [("pad", b"P" * PAD), ("trace", b"t-1")])
    slim = fit_dead_letter(out, TOPIC_LIMIT)
    assert wire_bytes(slim.key, slim.value, slim.headers) <= TOPIC_LIMIT
    assert _header(slim, "iotfuse.error.omitted") == f"value=12,header:pad={PAD}".encode()
    assert slim.key == b"dev-1" and _header(slim, "trace") == b"t-1"
    assert all(k != "pad" for k, _ in slim.headers)


def test_an_oversized_key_is_left_out_last() -> None:
    out = _letter(b"K" * PAD, b"not an image", [("trace", b"t-1")])
    slim = fit_dead_letter(out, TOPIC_LIMIT)
    assert wire_bytes(slim.key, slim.value, slim.headers) <= TOPIC_LIMIT
    assert _header(slim, "iotfuse.error.omitted") == f"value=12,key={PAD}".encode()
    assert slim.key == b"" and _header(slim, "trace") == b"t-1"


def test_many_small_headers_count_their_lengths_too() -> None:
    headers = [(f"h{i}", b"x") for i in range(200_000)]  # ~1.2 MB of names and values
    out = _letter(b"dev-1", b"v", headers)
    limit = 1_000_000
    slim = fit_dead_letter(out, limit)
    assert wire_bytes(slim.key, slim.value, slim.headers) <= limit
    assert _header(slim, "iotfuse.error.reason") == b"unsupported_format"


def test_forged_error_headers_travel_renamed_and_ours_are_the_only_ones() -> None:
    forged = [("iotfuse.error.reason", b"forged"), ("IOTFUSE.ERROR.STAGE", b"forged")]
    out = _letter(b"dev-1", b"x", forged)
    assert _header(out, "iotfuse.error.reason") == b"unsupported_format"
    assert _header(out, "original.iotfuse.error.reason") == b"forged"
    assert _header(out, "original.IOTFUSE.ERROR.STAGE") == b"forged"
    assert [k for k, _ in out.headers if k.lower().startswith("iotfuse.")] == [
        k for k, _ in out.headers if k.startswith("iotfuse.error.")
    ]


def test_a_null_header_value_stays_null() -> None:
    out = _letter(b"dev-1", b"x", [("trace", None), ("empty", b"")])
    assert _header(out, "trace") is None and _header(out, "empty") == b""


def test_a_record_stamped_before_the_epoch_keeps_its_timestamp_in_the_headers() -> None:
    for ts in (-1, -1000):
        out = _letter(b"dev-1", b"x", ts=ts)
        assert out.timestamp_ms == 0  # Kafka takes no negative timestamp
        assert _header(out, "iotfuse.error.timestamp") == str(ts).encode()
