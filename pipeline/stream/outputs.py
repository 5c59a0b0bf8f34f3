"""What the pipeline publishes: window events and dead letters, shaped by the contract."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.decode import AudioChunk, RejectedRecord
from pipeline.records import Headers, Record, payload_bytes
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


@dataclass(frozen=True, slots=True)
class ModelId:
    name: str
    version: str


def dead_letter(record: Record, error: RejectedRecord, topic: str) -> Output:
    """The original record, unchanged, plus the contract's `iotfuse.error.*` headers."""
    extra: Headers = (
        ("iotfuse.error.topic", record.topic.encode()),
        ("iotfuse.error.partition", str(record.partition).encode()),
        ("iotfuse.error.offset", str(record.offset).encode()),
        ("iotfuse.error.timestamp", str(record.timestamp_ms).encode()),
        ("iotfuse.error.stage", error.stage.encode()),
        ("iotfuse.error.reason", str(error.reason).encode()),
        ("iotfuse.error.message", error.message.encode("utf-8", "replace")),
    )
    return Output(
        topic=topic,
        key=record.key,
        value=record.value,
        headers=tuple(record.headers) + extra,
        timestamp_ms=max(record.timestamp_ms, 0),
        holds=(Position(record.topic, record.partition, record.offset),),
    )


# what a one-record batch adds to key, value and headers on the broker (batch header 61
# bytes, record and header lengths as varints), with room to spare
RECORD_OVERHEAD_BYTES = 512


def fit_dead_letter(out: Output, max_message_bytes: int) -> Output:
    """A dead letter larger than its topic takes (`max.message.bytes`), without its value:
    the header `iotfuse.error.value_omitted` gives the value's size in bytes. Sent whole, the
    broker would refuse it and the worker stop, then re-read and refuse it again."""
    if payload_bytes(out.key, out.value, out.headers) + RECORD_OVERHEAD_BYTES <= max_message_bytes:
        return out
    value = out.value or b""
    omitted = (("iotfuse.error.value_omitted", str(len(value)).encode()),)
    return replace(out, value=b"", headers=out.headers + omitted)


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
