"""What the pipeline publishes: window events and dead letters, shaped by the contract."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.decode import AudioChunk, RejectedRecord
from pipeline.records import Headers, Record
from pipeline.stream.windows import Position, Window

EVENT_SCHEMA = "iotfuse.event/v1"


@dataclass(frozen=True, slots=True)
class Output:
    """One record to publish, and the input positions it holds until acknowledged."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    holds: tuple[Position, ...]
    closed_at_ms: int | None = None  # wall time its window closed (events only)


@dataclass(frozen=True, slots=True)
class Decision:
    """The model's verdict on one window."""

    label: str
    confidence: float
    scores: Mapping[str, float]
    attribution: Mapping[Modality, float]
    # optional: {"telemetry": [(metric, fall of p(label) without it), ...]} with
    # runtime.explain_telemetry_top (docs/contract.md); None: the event has no explanation
    explanation: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ModelId:
    name: str
    version: str


def dead_letter(record: Record, error: RejectedRecord, topic: str) -> Output:
    """The original record plus the contract's `iotfuse.error.*` headers.

    The worker's `iotfuse.error.*` headers are the only ones on a dead letter: an input's
    own headers named `iotfuse.*` (any case) travel renamed `original.iotfuse.*`, so a
    forged `iotfuse.error.reason` cannot stand in front of ours. Other headers, null values
    included, are kept as they came. A record stamped before the epoch (negative) gets a
    dead letter stamped 0, as Kafka takes no negative timestamps; `iotfuse.error.timestamp`
    keeps the original."""
    extra: Headers = (
        ("iotfuse.error.topic", record.topic.encode()),
        ("iotfuse.error.partition", str(record.partition).encode()),
        ("iotfuse.error.offset", str(record.offset).encode()),
        ("iotfuse.error.timestamp", str(record.timestamp_ms).encode()),
        ("iotfuse.error.stage", error.stage.encode()),
        ("iotfuse.error.reason", str(error.reason).encode()),
        ("iotfuse.error.message", error.message.encode("utf-8", "replace")),
    )
    kept = tuple(
        (f"{ORIGINAL_PREFIX}{k}" if k.lower().startswith(OURS_PREFIX) else k, v)
        for k, v in record.headers
    )
    return Output(
        topic=topic,
        key=record.key,
        value=record.value,
        headers=kept + extra,
        timestamp_ms=max(record.timestamp_ms, 0),
        holds=(Position(record.topic, record.partition, record.offset),),
    )


OURS_PREFIX = "iotfuse."
ORIGINAL_PREFIX = "original."
# the bytes one record batch of one record adds to the sizes of its parts on the wire at
# most: batch header 61, record length, attributes, timestamp and offset deltas, key and
# value lengths, header count (varints at their widest), with room to spare
RECORD_OVERHEAD_BYTES = 128
HEADER_OVERHEAD_BYTES = 10  # a header's name and value lengths as varints, at their widest
OVERSIZED_HEADER_BYTES = 1024  # an input header this large goes before the key does
MAX_NAMED_OMISSIONS = 16  # headers named one by one in iotfuse.error.omitted


def wire_bytes(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper bound of what a record takes against a topic's `max.message.bytes`."""
    names = sum(len(k.encode("utf-8", "surrogatepass")) for k, _ in headers)
    values = sum(len(v or b"") for _, v in headers)
    parts = len(key or b"") + len(value or b"") + names + values
    return RECORD_OVERHEAD_BYTES + parts + HEADER_OVERHEAD_BYTES * len(headers)


def record_digest(key: bytes | None, value: bytes | None, headers: Headers) -> str:
    """`sha256:HEX` over the record's key, value and headers, each part length-prefixed
    (-1 for null): what `iotfuse.error.digest` carries to trace a shrunk dead letter."""
    h = hashlib.sha256()

    def part(data: bytes | None) -> None:
        h.update((-1 if data is None else len(data)).to_bytes(8, "big", signed=True))
        h.update(data or b"")

    part(key)
    part(value)
    for name, v in headers:
        part(name.encode("utf-8", "surrogatepass"))
        part(v)
    return f"sha256:{h.hexdigest()}"


def fit_dead_letter(out: Output, max_message_bytes: int) -> Output:
    """A dead letter the dead-letter topic takes (`max.message.bytes`, at most what the
    producer sends): sent whole, the broker would refuse it, the worker stop, then re-read
    and refuse it again, for good.

    Whatever does not fit is left out, in this order: the value, then the input's
    oversized headers (OVERSIZED_HEADER_BYTES and more), largest first, then the key, then
    any other input headers; never the worker's `iotfuse.error.*` headers. What was left
    out is named in `iotfuse.error.omitted` (`value=12,header:pad=10485299,key=5`: part and
    size in bytes; past MAX_NAMED_OMISSIONS headers, one `more_headers=COUNT/BYTES`), the
    value's size also in `iotfuse.error.value_omitted`, and `iotfuse.error.digest`
    identifies the original record (`record_digest`)."""
    if wire_bytes(out.key, out.value, out.headers) <= max_message_bytes:
        return out
    ours = tuple((k, v) for k, v in out.headers if k.startswith("iotfuse.error."))
    theirs = [(k, v) for k, v in out.headers if not k.startswith("iotfuse.error.")]
    digest = record_digest(out.key, out.value, tuple(theirs))
    key, value = out.key, b""
    omitted = [f"value={len(out.value)}"] if out.value else []
    dropped: list[int] = []

    def letter() -> Output:
        more = dropped[MAX_NAMED_OMISSIONS:]
        named = [
            f"header:{_preview(theirs[i][0])}={_len(theirs[i][1])}"
            for i in dropped[:MAX_NAMED_OMISSIONS]
        ]
        summary = [f"more_headers={len(more)}/{sum(_len(theirs[i][1]) for i in more)}"]
        entries = omitted + named + (summary if more else [])
        gone = set(dropped)
        marks: Headers = (
            *([("iotfuse.error.value_omitted", str(len(out.value)).encode())] if out.value else []),
            ("iotfuse.error.omitted", ",".join(entries).encode()),
            ("iotfuse.error.digest", digest.encode()),
        )
        kept = tuple(h for i, h in enumerate(theirs) if i not in gone)
        return replace(out, key=key, value=value, headers=(*kept, *ours, *marks))

    def over() -> int:
        fitted = letter()
        return wire_bytes(fitted.key, fitted.value, fitted.headers) - max_message_bytes

    by_size = sorted(range(len(theirs)), key=lambda i: -_len(theirs[i][1]))
    excess = over()
    for i in by_size:  # the oversized ones first
        if excess <= 0 or _len(theirs[i][1]) < OVERSIZED_HEADER_BYTES:
            break
        dropped.append(i)
        excess = over()
    if excess > 0 and key:
        omitted.append(f"key={len(key)}")
        key = b""
        excess = over()
    gone = set(dropped)
    for i in by_size:  # then any, largest first: counted without rebuilding the letter
        if excess <= 0:
            break
        if i not in gone:
            dropped.append(i)
            name, v = theirs[i]
            excess -= len(name.encode("utf-8", "surrogatepass")) + _len(v) + HEADER_OVERHEAD_BYTES
            excess += 0 if len(dropped) > MAX_NAMED_OMISSIONS else len(name) + 32
    return letter()


def _len(data: bytes | None) -> int:
    return len(data or b"")


def _preview(name: str, limit: int = 64) -> str:
    """A header name as `iotfuse.error.omitted` names it: printable, commas escaped, short."""
    clean = "".join(c if c.isprintable() and c not in ",=" else "?" for c in name[:limit])
    return clean + ("..." if len(name) > limit else "")


def _audio_seconds(window: Window) -> float:
    total_ms = 0
    for it in window.items.get(Modality.AUDIO, ()):
        chunk = it.payload
        if isinstance(chunk, AudioChunk):
            total_ms += min(chunk.duration_ms, window.end_ms - it.ts_ms)
    return round(total_ms / 1000.0, 3)


def modality_summary(window: Window, excluded: int = 0) -> dict[str, dict[str, Any]]:
    """`modalities` of the event; `excluded` camera frames were dead-lettered at decode."""
    out: dict[str, dict[str, Any]] = {}
    for m in ALL_MODALITIES:
        n = window.count(m) - (excluded if m is Modality.CAMERA else 0)
        entry: dict[str, Any] = {"present": n > 0, "records": n}
        if m is Modality.AUDIO:
            entry["seconds"] = _audio_seconds(window) if n else 0.0
        out[str(m)] = entry
    return out


def event_value(
    window: Window, decision: Decision, model: ModelId, processed_at_ms: int, excluded: int = 0
) -> dict[str, Any]:
    return {
        "schema": EVENT_SCHEMA,
        "device_id": window.device_id,
        "window": {"start_ms": window.start_ms, "end_ms": window.end_ms},
        "label": decision.label,
        "confidence": round(float(decision.confidence), 6),
        "scores": {k: round(float(v), 6) for k, v in decision.scores.items()},
        "modalities": modality_summary(window, excluded),
        "attribution": {
            str(m): round(float(decision.attribution.get(m, 0.0)), 6) for m in ALL_MODALITIES
        },
        **({} if decision.explanation is None else {"explanation": dict(decision.explanation)}),
        "model": {"name": model.name, "version": model.version},
        "processed_at_ms": processed_at_ms,
    }


def event_output(
    window: Window,
    value: dict[str, Any],
    topic: str,
    holds: tuple[Position, ...],
    closed_at_ms: int,
) -> Output:
    return Output(
        topic=topic,
        key=window.device_id.encode(),
        value=json.dumps(value, separators=(",", ":")).encode(),
        headers=(("content-type", b"application/json"),),
        timestamp_ms=window.end_ms,
        holds=holds,
        closed_at_ms=closed_at_ms,
    )
