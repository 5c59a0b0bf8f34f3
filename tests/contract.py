"""One contract test suite, run on the in-memory source and on the real broker.

A scenario is a list of input records; `check_contract` asserts what CONTRACT.md promises
about the published events and dead letters, whatever carried them.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.records import Headers, Record
from pipeline.settings import TopicSettings
from tests.factory import (
    T0,
    TOPICS,
    device_stream,
    jpeg,
    number,
    record,
    telemetry,
    wav,
)


@dataclass(frozen=True)
class Published:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int

    def header(self, name: str) -> str:
        values = [v for k, v in self.headers if k == name]
        assert values, f"header {name} missing from {self.headers}"
        return values[-1].decode()


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def bad_inputs(ts: int) -> list[tuple[Record, str]]:
    """One record per bad-input class of the contract, with the reason it must get."""
    cam, aud, tel = TOPICS.camera, TOPICS.audio, TOPICS.telemetry
    return [
        (record(tel, None, ts, telemetry(temperature_c=1.0)), "missing_key"),
        (record(tel, "bad key!", ts, telemetry(temperature_c=1.0)), "invalid_key"),
        (record(tel, "x" * 129, ts, telemetry(temperature_c=1.0)), "invalid_key"),
        (record(cam, "bad-cam", ts, b"not an image at all"), "unsupported_format"),
        (record(cam, "bad-cam", ts, jpeg()[:-200]), "image_truncated"),
        (record(cam, "bad-cam", ts, _png_header_only(5000, 5000)), "image_too_large_pixels"),
        (record(cam, "bad-cam", ts, b"\xff" * (8 * 1024 * 1024 + 1)), "image_too_large_bytes"),
        (record(cam, "bad-cam", ts, b""), "empty_value"),
        (record(aud, "bad-mic", ts, b"RIFF....WAVEjunk"), "audio_bad_header"),
        (record(aud, "bad-mic", ts, wav(seconds=11.0, rate=8000)), "audio_too_long"),
        (
            record(
                aud,
                "bad-mic",
                ts,
                b"\x00\x01" * 100,
                (("content-type", b"audio/pcm;rate=1000;channels=1;format=s16le"),),
            ),
            "audio_bad_rate",
        ),
        (record(tel, "bad-tel", ts, b'{"t": NaN}'), "telemetry_non_finite"),
        (record(tel, "bad-tel", ts, b'{"t": 1e999}'), "telemetry_non_finite"),
        (record(tel, "bad-tel", ts, b"[1, 2]"), "telemetry_not_object"),
        (record(tel, "bad-tel", ts, b'{"t": "\xff"}'), "telemetry_not_utf8"),
        (record(tel, "bad-tel", ts, b'{"t": ' + b"1" * 70000 + b"}"), "telemetry_too_large"),
    ]


def scenario() -> tuple[list[Record], list[tuple[Record, str]]]:
    """Three healthy devices (one telemetry-only), bad input interleaved, then a flush."""
    records = device_stream("cell-01", T0 + 130, 6)
    records += device_stream("cell-02", T0 + 50, 5, (Modality.CAMERA, Modality.AUDIO))
    records += device_stream("sensor-only", T0 + 700, 4, (Modality.TELEMETRY,))
    bad = bad_inputs(T0 + 1000)
    reasons = {id(r): reason for r, reason in bad}
    records += [r for r, _ in bad]
    records.sort(key=lambda r: r.timestamp_ms)
    numbered = number(records)
    bad = [(n, reasons[id(r)]) for r, n in zip(records, numbered, strict=True) if id(r) in reasons]
    return numbered, bad


def expected_windows(
    records: list[Record], bad: list[tuple[Record, str]], topics: TopicSettings = TOPICS
) -> Counter[tuple]:
    """(device, start, modality) -> record count, for every valid input record."""
    bad_ids = {(r.topic, r.partition, r.offset) for r, _ in bad}
    topic_mod = {
        topics.camera: Modality.CAMERA,
        topics.audio: Modality.AUDIO,
        topics.telemetry: Modality.TELEMETRY,
    }
    out: Counter[tuple] = Counter()
    for r in records:
        if (r.topic, r.partition, r.offset) not in bad_ids:
            assert r.key is not None
            out[(r.key.decode(), r.timestamp_ms // 2000 * 2000, topic_mod[r.topic])] += 1
    return out


def check_contract(
    records: list[Record],
    bad: list[tuple[Record, str]],
    published: list[Published],
    classes: tuple[str, ...],
    model_version: str,
    topics: TopicSettings = TOPICS,
) -> None:
    events = [p for p in published if p.topic == topics.events]
    dead = [p for p in published if p.topic == topics.deadletter]
    counts = expected_windows(records, bad, topics)
    windows = {(d, s) for d, s, _ in counts}
    seen = Counter(
        (json.loads(e.value or b"")["device_id"], json.loads(e.value or b"")["window"]["start_ms"])
        for e in events
    )
    assert set(seen) == windows, "every window with a record yields an event"
    assert all(n == 1 for n in seen.values()), f"duplicate events: {seen.most_common(3)}"
    for e in events:
        check_event(e, counts, classes, model_version)
    check_dead_letters(bad, dead)


def check_event(
    e: Published, counts: Counter[tuple], classes: tuple[str, ...], model_version: str
) -> None:
    v = json.loads(e.value or b"")
    device, start, end = v["device_id"], v["window"]["start_ms"], v["window"]["end_ms"]
    assert v["schema"] == "iotfuse.event/v1"
    assert e.key == device.encode() and e.timestamp_ms == end == start + 2000
    assert set(v["scores"]) == set(classes)
    assert abs(sum(v["scores"].values()) - 1.0) < 1e-4
    assert v["label"] == max(v["scores"], key=v["scores"].get)
    assert v["confidence"] == v["scores"][v["label"]]
    assert v["model"]["version"] == model_version
    assert isinstance(v["processed_at_ms"], int)
    for m in ALL_MODALITIES:
        n = counts.get((device, start, m), 0)
        assert v["modalities"][m]["records"] == n, (device, start, m)
        assert v["modalities"][m]["present"] == (n > 0)
        if n == 0:
            assert v["attribution"][m] == 0.0, "absent modality gets no attribution"
    if counts.get((device, start, Modality.AUDIO)):
        assert 0 < v["modalities"]["audio"]["seconds"] <= 2.0
    assert abs(sum(v["attribution"].values())) <= 1.0 + 1e-6


def check_dead_letters(bad: list[tuple[Record, str]], dead: list[Published]) -> None:
    assert len(dead) == len(bad), [d.header("iotfuse.error.reason") for d in dead]
    by_value = {(d.key, d.value): d for d in dead}
    for original, reason in bad:
        d = by_value[(original.key, original.value)]
        assert d.header("iotfuse.error.reason") == reason
        assert d.header("iotfuse.error.topic") == original.topic
        assert d.header("iotfuse.error.stage") in ("validate", "decode")
        assert int(d.header("iotfuse.error.timestamp")) == original.timestamp_ms
        assert int(d.header("iotfuse.error.offset")) >= 0
        assert d.header("iotfuse.error.message")
        assert tuple(h for h in d.headers if not h[0].startswith("iotfuse.error.")) == tuple(
            original.headers
        )
