"""Training-time variation of the windows: new looks of the same scenes, and the same
scenes as slower or narrower hardware records them (`Augmented`, used by `iotfuse train`
and the federated sites).

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np

from encoders.modality import Modality

Example = tuple[dict[Modality, np.ndarray], int]  # a window's inputs and its class index


def augment_camera(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new look of the same scene: mirrored (half the time), channels shuffled (half the
    time), per-channel gain and a brightness shift. uint8 [T, S, S, 3] -> same."""
    x = frames[:, :, ::-1] if rng.random() < 0.5 else frames  # [T, S, S, 3]
    if rng.random() < 0.5:
        x = x[..., rng.permutation(3)]
    gain = rng.uniform(0.75, 1.25, size=3)  # [3], broadcast over the RGB axis
    shifted = x.astype(np.float32) * gain + rng.uniform(-20.0, 20.0)
    return np.clip(shifted, 0.0, 255.0).astype(np.uint8)


def slower_camera(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As a camera with a lower frame rate sees the window: its T frames drawn from 1..T-1
    distinct ones, each repeated. [T, S, S, 3] -> same."""
    t = frames.shape[0]
    distinct = int(rng.integers(1, max(t, 2)))
    kept = np.linspace(0, t - 1, distinct).round().astype(np.int64)  # [distinct]
    return frames[kept[np.linspace(0, distinct - 1, t).round().astype(np.int64)]]


def sparser_telemetry(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As a slower sensor: only every k-th time step (k in 2..10) keeps its values, the
    others are missing (NaN). float32 [steps, M] -> same."""
    k = int(rng.integers(2, 11))
    offset = int(rng.integers(0, k))
    out = np.full_like(x, np.nan)  # [steps, M]
    out[offset::k] = x[offset::k]
    return out


def narrower_audio(x: np.ndarray, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """As a microphone sampled at a lower rate: nothing above a 3-6 kHz cutoff.
    float32 [samples] -> same."""
    spectrum = np.fft.rfft(x)  # [samples // 2 + 1]
    spectrum[np.fft.rfftfreq(len(x), 1.0 / sample_rate) > rng.uniform(3000.0, 6000.0)] = 0
    return np.fft.irfft(spectrum, n=len(x)).astype(np.float32)  # [samples]


class Augmented(Sequence[Example]):
    """Training examples, each one varied anew every time it is read, so the model sees
    more scenes and hardware than the recordings hold: every camera window gets a new look
    (`augment_camera`); with probability `p_hardware` each modality is also seen as slower
    or narrower hardware records it (`slower_camera`, `narrower_audio`,
    `sparser_telemetry`). Deterministic: one generator seeded with `seed`, and fusion.train
    reads the examples in a seeded order."""

    def __init__(
        self,
        examples: Sequence[Example],
        seed: int,
        sample_rate: int = 16000,
        p_hardware: float = 0.3,
    ) -> None:
        self.examples = examples
        self.rng = np.random.default_rng(seed)
        self.sample_rate = sample_rate
        self.p_hardware = p_hardware

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Example]: ...

    def __getitem__(self, i: int | slice) -> Example | Sequence[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        inputs, label = self.examples[i]
        out = dict(inputs)
        rng, p = self.rng, self.p_hardware
        if Modality.CAMERA in out:
            frames = augment_camera(out[Modality.CAMERA], rng)
            out[Modality.CAMERA] = slower_camera(frames, rng) if rng.random() < p else frames
        if Modality.AUDIO in out and rng.random() < p:
            out[Modality.AUDIO] = narrower_audio(out[Modality.AUDIO], rng, self.sample_rate)
        if Modality.TELEMETRY in out and rng.random() < p:
            out[Modality.TELEMETRY] = sparser_telemetry(out[Modality.TELEMETRY], rng)
        return out, label
