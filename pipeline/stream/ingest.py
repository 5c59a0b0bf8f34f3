"""Record -> (device, window item), or a rejection with the contract's reason code.

The only place that knows which topic carries which modality and how each is validated.
Cheap checks happen here; images are only probed (header, size, truncation) and fully
decoded later, when their window closes, and only the frames the model uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from encoders.modality import Modality
from pipeline.decode import (
    AudioLimits,
    ImageInfo,
    ImageLimits,
    Reason,
    RejectedRecord,
    TelemetryLimits,
    decode_audio,
    device_id,
    parse_telemetry,
    probe_image,
)
from pipeline.records import Record
from pipeline.settings import LimitSettings, TopicSettings
from pipeline.stream.windows import Item, Position


@dataclass(frozen=True, slots=True)
class CameraFrame:
    """A validated, not yet decoded image (decoded at window close if the model uses it)."""

    value: bytes
    info: ImageInfo


@dataclass(frozen=True, slots=True)
class Ingested:
    device_id: str
    item: Item


@dataclass(frozen=True, slots=True)
class IngestConfig:
    topics: dict[str, Modality]  # input topic -> modality
    image: ImageLimits
    audio: AudioLimits
    telemetry: TelemetryLimits
    sample_rate: int  # audio is resampled to what the model expects

    @classmethod
    def from_settings(
        cls, topics: TopicSettings, limits: LimitSettings, sample_rate: int
    ) -> IngestConfig:
        return cls(
            topics={
                topics.camera: Modality.CAMERA,
                topics.audio: Modality.AUDIO,
                topics.telemetry: Modality.TELEMETRY,
            },
            image=ImageLimits(
                max_width=limits.image_max_width,
                max_height=limits.image_max_height,
                max_bytes=limits.image_max_bytes,
            ),
            audio=AudioLimits(max_seconds=limits.audio_max_seconds),
            telemetry=TelemetryLimits(max_bytes=limits.telemetry_max_bytes),
            sample_rate=sample_rate,
        )


def _content_type(record: Record) -> str | None:
    raw = record.header("content-type")
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedRecord(
            "validate", Reason.INVALID_CONTENT_TYPE, "content-type header is not UTF-8"
        ) from None


def _payload(modality: Modality, record: Record, cfg: IngestConfig) -> tuple[object, int]:
    value = record.value
    if not value:
        raise RejectedRecord(
            "validate", Reason.EMPTY_VALUE, "record has no value; send the encoded payload"
        )
    if modality is Modality.CAMERA:
        info = probe_image(value, _content_type(record), cfg.image)
        return CameraFrame(value, info), len(value)
    if modality is Modality.AUDIO:
        chunk = decode_audio(value, _content_type(record), cfg.sample_rate, cfg.audio)
        return chunk, int(chunk.samples.nbytes)
    metrics = parse_telemetry(value, cfg.telemetry)
    return metrics, len(value)


def ingest(record: Record, cfg: IngestConfig) -> Ingested:
    """Validate and decode one input record; raises RejectedRecord with a reason code."""
    modality = cfg.topics.get(record.topic)
    if modality is None:
        raise RejectedRecord(
            "validate",
            Reason.UNKNOWN_TOPIC,
            f"topic {record.topic!r} is not one of the input topics {sorted(cfg.topics)}",
        )
    device = device_id(record.key)
    if record.timestamp_ms < 0:
        raise RejectedRecord(
            "validate",
            Reason.INVALID_TIMESTAMP,
            f"record timestamp {record.timestamp_ms} is not a valid event time; "
            "produce with a timestamp (milliseconds since the epoch)",
        )
    try:
        payload, nbytes = _payload(modality, record, cfg)
    except RejectedRecord:
        raise
    except Exception as exc:  # hostile bytes must never escape as a crash
        raise RejectedRecord(
            "decode", Reason.INTERNAL_DECODE_ERROR, f"{type(exc).__name__}: {exc}"
        ) from exc
    position = Position(record.topic, record.partition, record.offset)
    return Ingested(device, Item(modality, record.timestamp_ms, payload, position, nbytes))
