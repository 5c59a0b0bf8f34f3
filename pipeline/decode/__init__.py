"""Decoding and validation of input record values: pure functions, no Kafka.

Every function here either returns decoded data or raises `RejectedRecord` (stage, reason,
message), which the pipeline turns into a dead letter (CONTRACT.md, Dead letters).
"""

from pipeline.decode.audio import (
    AudioChunk,
    AudioLimits,
    ContentType,
    decode_audio,
    parse_content_type,
)
from pipeline.decode.device import device_id
from pipeline.decode.errors import Reason, RejectedRecord, Stage
from pipeline.decode.image import ImageFormat, ImageInfo, ImageLimits, decode_image, probe_image
from pipeline.decode.telemetry import TelemetryLimits, parse_telemetry

__all__ = [
    "AudioChunk",
    "AudioLimits",
    "ContentType",
    "ImageFormat",
    "ImageInfo",
    "ImageLimits",
    "Reason",
    "RejectedRecord",
    "Stage",
    "TelemetryLimits",
    "decode_audio",
    "decode_image",
    "device_id",
    "parse_content_type",
    "parse_telemetry",
    "probe_image",
]
