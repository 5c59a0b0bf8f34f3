"""Why an input record was rejected: one exception type and every reason code in one place.

Decoding and validation raise `RejectedRecord`; the pipeline turns it into a dead letter
(`iotfuse.error.stage`, `iotfuse.error.reason`, `iotfuse.error.message`, see CONTRACT.md).

Stage says which step refused the record:
- ``validate``: checks on the key, headers and container metadata (sizes, formats, header
  fields, limits, truncation) made before the payload is turned into data;
- ``decode``: turning the payload into pixels, samples or metrics failed.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    VALIDATE = "validate"
    DECODE = "decode"


class Reason(StrEnum):
    """Machine-readable reason codes (snake_case), the value of `iotfuse.error.reason`."""

    # key, topic, headers (any modality)
    MISSING_KEY = "missing_key"
    INVALID_KEY = "invalid_key"
    UNKNOWN_TOPIC = "unknown_topic"
    INVALID_TIMESTAMP = "invalid_timestamp"
    EMPTY_VALUE = "empty_value"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INVALID_CONTENT_TYPE = "invalid_content_type"
    CONTENT_TYPE_MISMATCH = "content_type_mismatch"
    INTERNAL_DECODE_ERROR = "internal_decode_error"  # a bug: a decoder raised something else
    UNREADABLE_RECORD = "unreadable_record"  # the Kafka client could not parse it at all
    # its record batch decompresses past the worker's bound (pipeline/kafka/decompress.py)
    BATCH_TOO_LARGE_DECOMPRESSED = "batch_too_large_decompressed"
    UNSUPPORTED_COMPRESSION = "unsupported_compression"  # a codec the worker cannot read
    # camera
    IMAGE_TOO_LARGE_BYTES = "image_too_large_bytes"
    IMAGE_TOO_LARGE_PIXELS = "image_too_large_pixels"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_CORRUPT = "image_corrupt"
    # audio
    AUDIO_BAD_HEADER = "audio_bad_header"
    AUDIO_UNSUPPORTED_ENCODING = "audio_unsupported_encoding"
    AUDIO_BAD_RATE = "audio_bad_rate"
    AUDIO_BAD_CHANNELS = "audio_bad_channels"
    AUDIO_TOO_LONG = "audio_too_long"
    AUDIO_TRUNCATED = "audio_truncated"
    AUDIO_EMPTY = "audio_empty"
    AUDIO_NON_FINITE = "audio_non_finite"
    AUDIO_CORRUPT = "audio_corrupt"
    # telemetry
    TELEMETRY_TOO_LARGE = "telemetry_too_large"
    TELEMETRY_NOT_UTF8 = "telemetry_not_utf8"
    TELEMETRY_NOT_JSON = "telemetry_not_json"
    TELEMETRY_NOT_OBJECT = "telemetry_not_object"
    TELEMETRY_TOO_DEEP = "telemetry_too_deep"
    TELEMETRY_NON_FINITE = "telemetry_non_finite"


class RejectedRecord(Exception):
    """A record that cannot be processed and must be dead-lettered.

    `stage` and `reason` accept the enum members or their string values; anything else is a
    programming error (ValueError). `message` says what went wrong and what to do about it.
    """

    stage: Stage
    reason: Reason
    message: str

    def __init__(self, stage: Stage | str, reason: Reason | str, message: str) -> None:
        checked_stage, checked_reason = Stage(stage), Reason(reason)
        # args in constructor order, so the exception survives pickling (multiprocessing)
        super().__init__(checked_stage, checked_reason, message)
        self.stage = checked_stage
        self.reason = checked_reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.stage}/{self.reason}: {self.message}"


def invalid(reason: Reason, message: str) -> RejectedRecord:
    """A `RejectedRecord` from the validate stage."""
    return RejectedRecord(Stage.VALIDATE, reason, message)


def undecodable(reason: Reason, message: str) -> RejectedRecord:
    """A `RejectedRecord` from the decode stage."""
    return RejectedRecord(Stage.DECODE, reason, message)


def preview(data: bytes, limit: int = 32) -> str:
    """A short printable excerpt of untrusted bytes for error messages."""
    head = repr(data[:limit])
    return head + ("..." if len(data) > limit else "")
