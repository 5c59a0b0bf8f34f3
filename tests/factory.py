"""Builders for test inputs: encoded media, records, and a small random model on disk."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.records import Headers, Record
from pipeline.settings import TopicSettings

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a multiple of every window length used
TOPICS = TopicSettings()
CLASSES = ("normal", "fire", "intrusion")
METRICS = ("temperature_c", "vibration_rms", "door_open")


def jpeg(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buf)


def png(width: int = 64, height: int = 48) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((height, width, 3), 127, np.uint8))
    assert ok
    return bytes(buf)


def wav(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def strict_json(value: bytes | None) -> Any:
    """Parse JSON as a strict parser would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(value or b"", parse_constant=refuse)


def telemetry(**metrics: float) -> bytes:
    return json.dumps(metrics).encode()


def record(
    topic: str,
    device: str | bytes | None,
    ts: int,
    value: bytes | None,
    headers: Headers = (),
    offset: int = -1,
    partition: int = 0,
) -> Record:
    key = device.encode() if isinstance(device, str) else device
    return Record(topic, partition, offset, ts, key, value, headers)


def number(records: list[Record]) -> list[Record]:
    """Assign per-(topic, partition) offsets in list order, like a broker would."""
    counters: dict[tuple[str, int], int] = {}
    out = []
    for r in records:
        n = counters.get((r.topic, r.partition), 0)
        counters[(r.topic, r.partition)] = n + 1
        out.append(Record(r.topic, r.partition, n, r.timestamp_ms, r.key, r.value, r.headers))
    return out


def device_stream(
    device: str, start: int, seconds: int, modalities: tuple[Modality, ...] = ALL_MODALITIES
) -> list[Record]:
    """5 fps camera, 0.5 s audio chunks, 10 Hz telemetry for one device."""
    recs: list[Record] = []
    for ms in range(0, seconds * 1000, 100):
        ts = start + ms
        if Modality.TELEMETRY in modalities:
            recs.append(
                record(
                    TOPICS.telemetry,
                    device,
                    ts,
                    telemetry(
                        temperature_c=20 + ms / 1000, vibration_rms=0.1, door_open=False, note=1.0
                    ),
                )
            )
        if Modality.CAMERA in modalities and ms % 200 == 0:
            recs.append(record(TOPICS.camera, device, ts, jpeg(seed=ms)))
        if Modality.AUDIO in modalities and ms % 500 == 0:
            recs.append(record(TOPICS.audio, device, ts, wav()))
    return recs


def make_model(
    directory: Path, modalities: tuple[Modality, ...] = ALL_MODALITIES, seed: int = 0
) -> Path:
    """A small random model saved like `iotfuse train` would (same code path)."""
    from fusion.config import CameraConfig, FusionConfig, ModelConfig, TelemetryConfig
    from fusion.model import FusionClassifier
    from fusion.modelfile import save_model

    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="test-model",
        classes=CLASSES,
        window_ms=2000,
        modalities=modalities,
        camera=CameraConfig(image_size=32, num_frames=2) if Modality.CAMERA in modalities else None,
        telemetry=TelemetryConfig(metrics=METRICS) if Modality.TELEMETRY in modalities else None,
        fusion=FusionConfig(dim=32, layers=1, heads=2),
    )
    save_model(FusionClassifier(cfg), directory)
    return directory
