"""Builders for test inputs: encoded media (and damaged media), records, engines, tiny model
configs and windows, and small random models on disk."""

from __future__ import annotations

import itertools
import json
import random
import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.config import AudioConfig, CameraConfig, FusionConfig, ModelConfig, TelemetryConfig
from pipeline.metrics import Metrics
from pipeline.records import Headers, Record
from pipeline.settings import Settings, TopicSettings
from pipeline.stream.assembly import build_engine
from pipeline.stream.engine import Engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import FakeClock

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a multiple of every window length used
TOPICS = TopicSettings()
CLASSES = ("normal", "fire", "intrusion")
METRICS = ("temperature_c", "vibration_rms", "door_open")
TINY_RATE = 8000  # audio sample rate of `tiny_config` models


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


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random damage: truncation, byte flips, insertion, deletion or duplication."""
    buf = bytearray(data)
    kind = rng.randrange(5)
    pos = rng.randrange(len(buf) + 1)
    if kind == 0:
        return bytes(buf[:pos])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] = rng.randrange(256) if rng.random() < 0.5 else buf[i] ^ (1 << rng.randrange(8))
        return bytes(buf)
    if kind == 2:
        return bytes(buf[:pos] + rng.randbytes(rng.randint(1, 64)) + buf[pos:])
    if kind == 3:
        return bytes(buf[:pos] + buf[pos + rng.randint(1, 64) :])
    return bytes(buf[:pos] + buf[rng.randrange(len(buf) + 1) :] + buf[pos:])


def jpeg_header_only(width: int, height: int, sof: int = 0xC0) -> bytes:
    """SOI, an APP0 segment, a SOFn frame header claiming width x height, EOI: no pixels."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    components = b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    body = struct.pack(">BHHB", 8, height, width, 3) + components
    frame_header = bytes([0xFF, sof]) + struct.pack(">H", len(body) + 2) + body
    return b"\xff\xd8" + app0 + frame_header + b"\xff\xd9"


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


def engine_with_early(runner: ModelRunner, early: bool, metrics: Metrics | None = None) -> Engine:
    """An engine with default settings but `runtime.early_inference`, on a `FakeClock`."""
    s = Settings()
    return build_engine(
        replace(s, runtime=replace(s.runtime, early_inference=early)),
        runner,
        metrics,
        clock=FakeClock(),
    )


def tiny_config(
    modalities: Sequence[Modality] = ALL_MODALITIES,
    classes: tuple[str, ...] = ("a", "b", "c"),
    dropout: float = 0.0,
    **sections: object,
) -> ModelConfig:
    """A model small enough for fast CPU tests: 32x32x2 frames, 0.5 s audio, 3x8 telemetry."""
    defaults: dict[str, object] = {
        "camera": CameraConfig(image_size=32, num_frames=2, width=4, embed_dim=8),
        "audio": AudioConfig(
            sample_rate=TINY_RATE, n_fft=256, hop_ms=10, n_mels=16, width=4, embed_dim=8
        ),
        "telemetry": TelemetryConfig(metrics=("t", "v", "p"), steps=8, width=8, embed_dim=8),
    }
    defaults.update(sections)
    chosen = {m.value: defaults[m.value] for m in modalities}
    return ModelConfig(
        name="tiny",
        classes=classes,
        window_ms=500,
        modalities=tuple(modalities),
        fusion=FusionConfig(dim=16, layers=1, heads=2, dropout=dropout),
        **chosen,
    )  # type: ignore[arg-type]


def random_window(
    rng: np.random.Generator, cfg: ModelConfig, modalities: Sequence[Modality]
) -> dict[Modality, np.ndarray]:
    window: dict[Modality, np.ndarray] = {}
    if Modality.CAMERA in modalities and cfg.camera is not None:
        c = cfg.camera
        window[Modality.CAMERA] = rng.integers(
            0, 256, (c.num_frames, c.image_size, c.image_size, 3), dtype=np.uint8
        )
    if Modality.AUDIO in modalities and cfg.audio is not None:
        n = cfg.audio.window_samples(cfg.window_ms)
        window[Modality.AUDIO] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    if Modality.TELEMETRY in modalities and cfg.telemetry is not None:
        t = cfg.telemetry
        x = rng.standard_normal((t.steps, len(t.metrics))).astype(np.float32)
        x[rng.random(x.shape) < 0.2] = np.nan
        window[Modality.TELEMETRY] = x
    return window


def all_subsets() -> list[tuple[Modality, ...]]:
    return [s for k in range(4) for s in itertools.combinations(ALL_MODALITIES, k)]


def tiny_vit(directory: Path) -> str:
    """Save a 1-layer ViT (32x32 images) into directory; returns its path."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(cfg).save_pretrained(directory)
    return str(directory)


def tiny_ast(directory: Path, n_mels: int = 16) -> str:
    from transformers import ASTConfig, ASTModel

    cfg = ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=16,
        frequency_stride=16,
        time_stride=16,
        max_length=64,
        num_mel_bins=n_mels,
    )
    ASTModel(cfg).save_pretrained(directory)
    return str(directory)
