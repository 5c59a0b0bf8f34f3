"""A closed window -> the raw per-modality arrays the model takes.

The single code path from records to model input: the live pipeline, offline replay,
training and evaluation all build their inputs here.

- camera: `num_frames` frames sampled evenly across the window's frames (by event time),
  decoded at reduced resolution -> uint8 [T, S, S, 3]; a frame that fails to decode is
  rejected (dead-lettered) and another one is tried.
- audio: each chunk's samples placed at its event-time offset in the window -> float32
  [window_samples]; silence (zeros) where no audio arrived; samples past the window end
  are cut (the chunk belongs to the window of its first sample).
- telemetry: samples averaged per time step -> float32 [steps, n_metrics], NaN = missing;
  a mean beyond float32's range (telemetry accepts any finite JSON number, 1e300 too) is
  clipped to it: as infinity it stopped the worker at every restart, in the model's input
  check. The model clamps such readings further (encoders/telemetry.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoders.modality import Modality
from pipeline.decode import AudioChunk, RejectedRecord, decode_image
from pipeline.stream.ingest import CameraFrame
from pipeline.stream.windows import Item, Window

Decode = Callable[[Item], np.ndarray]  # a camera item -> uint8 [S, S, 3]; RejectedRecord


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """What the model takes from a window (derived from the model's config)."""

    window_ms: int
    modalities: tuple[Modality, ...]
    image_size: int = 64
    num_frames: int = 4
    sample_rate: int = 16000
    metrics: tuple[str, ...] = ()
    steps: int = 20

    @property
    def window_samples(self) -> int:
        return self.sample_rate * self.window_ms // 1000

    @classmethod
    def from_model_config(cls, cfg: Any) -> FeatureSpec:
        mods = tuple(Modality(m) for m in cfg.modalities)
        kw: dict[str, Any] = {"window_ms": cfg.window_ms, "modalities": mods}
        if Modality.CAMERA in mods:
            kw |= {"image_size": cfg.camera.image_size, "num_frames": cfg.camera.num_frames}
        if Modality.AUDIO in mods:
            kw |= {"sample_rate": cfg.audio.sample_rate}
        if Modality.TELEMETRY in mods:
            kw |= {"metrics": tuple(cfg.telemetry.metrics), "steps": cfg.telemetry.steps}
        return cls(**kw)


@dataclass(slots=True)
class WindowInputs:
    raw: dict[Modality, np.ndarray]
    rejected: list[tuple[Item, RejectedRecord]] = field(default_factory=list)
    unknown_metrics: int = 0


@functools.lru_cache(maxsize=4096)  # asked per frame and per window, for few (n, k)
def spread(n: int, k: int) -> tuple[int, ...]:
    """k indices spread evenly over range(n) (repeats when n < k)."""
    return tuple(int(round(i)) for i in np.linspace(0, n - 1, k)) if n else ()


def decode_frame(item: Item, size: int) -> np.ndarray:
    """One camera item's frame as uint8 [size, size, 3]; raises RejectedRecord."""
    frame = item.payload
    assert isinstance(frame, CameraFrame)
    return decode_image(frame.value, frame.info, size)


def camera_input(
    frames: list[Item], spec: FeatureSpec, decode: Decode | None = None
) -> tuple[np.ndarray | None, list[tuple[Item, RejectedRecord]]]:
    """Decode the sampled frames; failed decodes are returned for dead-lettering."""
    ordered = sorted(frames, key=lambda it: it.ts_ms)
    rejected: list[tuple[Item, RejectedRecord]] = []
    decoded: dict[int, np.ndarray] = {}
    wanted = list(spread(len(ordered), spec.num_frames))
    tried: set[int] = set()
    for idx in wanted + list(range(len(ordered))):
        if len(decoded) >= len(set(wanted)) or idx in tried:
            continue
        tried.add(idx)
        try:
            decoded[idx] = (
                decode(ordered[idx])
                if decode is not None
                else decode_frame(ordered[idx], spec.image_size)
            )
        except RejectedRecord as exc:
            rejected.append((ordered[idx], exc))
    if not decoded:
        return None, rejected
    good = sorted(decoded)
    picks = [good[i] for i in spread(len(good), spec.num_frames)]
    return np.stack([decoded[i] for i in picks]), rejected  # [T, S, S, 3] uint8


def audio_input(chunks: list[Item], spec: FeatureSpec, start_ms: int) -> np.ndarray:
    out = np.zeros(spec.window_samples, dtype=np.float32)  # [N]
    for it in sorted(chunks, key=lambda it: it.ts_ms):
        chunk = it.payload
        assert isinstance(chunk, AudioChunk)
        at = (it.ts_ms - start_ms) * spec.sample_rate // 1000
        n = max(0, min(len(chunk.samples), spec.window_samples - at))
        out[at : at + n] = chunk.samples[:n]
    return out


def telemetry_input(
    samples: list[Item], spec: FeatureSpec, start_ms: int
) -> tuple[np.ndarray, int]:
    """Per-step means of the model's metrics; returns (array, unknown metric count)."""
    col = {name: j for j, name in enumerate(spec.metrics)}
    sums = np.zeros((spec.steps, len(col)), dtype=np.float64)  # [steps, M]
    counts = np.zeros((spec.steps, len(col)), dtype=np.int64)  # [steps, M]
    unknown = 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # 1e308 + 1e308: inf
        for it in samples:
            metrics = it.payload
            assert isinstance(metrics, dict)
            step = min(spec.steps - 1, (it.ts_ms - start_ms) * spec.steps // spec.window_ms)
            for name, value in metrics.items():
                j = col.get(name)
                if j is None:
                    unknown += 1
                    continue
                sums[step, j] += value
                counts[step, j] += 1
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    limit = np.finfo(np.float32).max
    return np.clip(means, -limit, limit).astype(np.float32), unknown  # [steps, M], NaN kept


def window_inputs(window: Window, spec: FeatureSpec, decode: Decode | None = None) -> WindowInputs:
    """The model's inputs of a closed window; `decode` (default: decode now) gives a camera
    item's frame, e.g. one decoded ahead by pipeline.stream.prefetch."""
    out = WindowInputs(raw={})
    if Modality.CAMERA in spec.modalities and window.count(Modality.CAMERA):
        frames, rejected = camera_input(window.items[Modality.CAMERA], spec, decode)
        out.rejected += rejected
        if frames is not None:
            out.raw[Modality.CAMERA] = frames
    if Modality.AUDIO in spec.modalities and window.count(Modality.AUDIO):
        out.raw[Modality.AUDIO] = audio_input(window.items[Modality.AUDIO], spec, window.start_ms)
    if Modality.TELEMETRY in spec.modalities and window.count(Modality.TELEMETRY):
        raw, out.unknown_metrics = telemetry_input(
            window.items[Modality.TELEMETRY], spec, window.start_ms
        )
        out.raw[Modality.TELEMETRY] = raw
    return out
