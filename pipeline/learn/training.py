"""Train a fusion model (or a single-modality baseline) from labelled recordings.

    summary = train_from_recordings(TrainOptions(data=(Path("train.iotrec"),), out=Path("m")),
                                    settings, stream=sys.stderr)

1. Windows: the recordings' records go through `pipeline.learn.dataset.labelled_windows` (the
   live pipeline's aligner, ingest, windower and feature code); labels come from the
   labels-topic records the recordings hold.
2. Validation split (`split_windows`): every 5th device is held out whole (with fewer
   than 5 devices: time blocks per device), so the best epoch is the one that does best
   on devices -- cameras, rooms, microphones, sensors -- it never trained on.
3. Telemetry normalisation (mean/std per metric) is fitted on the training windows only
   and stored in the model config.
4. `fusion.train.train`: the best epoch by validation macro-F1 is kept; every time the
   validation score improves the model directory is rewritten (a checkpoint).

Deterministic: the same data, options, device and thread count give the same weights
(and so the same `model.version`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, overload

import numpy as np

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.errors import UserError
from pipeline.learn.dataset import LabelledWindow, OnRecords, recording_windows
from pipeline.settings import Settings
from pipeline.stream.features import FeatureSpec

log = logging.getLogger(__name__)

# the simulator's sensor unit (pipeline/simulate/telemetry.py); --metrics overrides
DEFAULT_METRICS = ("temperature_c", "smoke_ppm", "vibration_rms", "motor_current_a", "door_open")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    data: tuple[Path, ...]
    out: Path
    modalities: tuple[Modality, ...] = ALL_MODALITIES
    epochs: int = 30
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    device: str = "auto"
    name: str = ""  # "" = "iotfuse-" + the modalities
    metrics: tuple[str, ...] = DEFAULT_METRICS
    window_ms: int = 2000
    val_fraction: float = 0.2
    val_block_ms: int = 30_000
    modality_dropout: float | None = None  # None: the fusion config's default
    augment: bool = True  # vary the training inputs (see Augmented)
    camera_hf: str | None = None  # local transformers vision model directory
    audio_hf: str | None = None  # local transformers AST directory
    freeze_hf: bool = False  # train only the heads and fusion on top of the hf trunks
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("no training data: pass one or more recordings with --data")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_block_ms < 1:
            raise UserError(f"val_block_ms must be >= 1, got {self.val_block_ms}")

    @property
    def model_name(self) -> str:
        return self.name or "iotfuse-" + "-".join(m.value for m in self.modalities)


@dataclass(frozen=True)
class TrainSummary:
    out: Path
    version: str
    classes: tuple[str, ...]
    train_windows: int
    val_windows: int
    best_epoch: int
    best_val_macro_f1: float
    seconds: float  # training only (windows excluded)
    window_seconds: float  # building the windows from the recordings
    history: list[dict[str, float]]


def parse_modalities(text: str) -> tuple[Modality, ...]:
    """ "camera,audio" -> (CAMERA, AUDIO), in the canonical slot order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = [m.value for m in ALL_MODALITIES]
    bad = [n for n in names if n not in known]
    if bad or not names or len(set(names)) != len(names):
        raise UserError(
            f"--modalities {text!r}: list distinct modalities among {known}, "
            "comma-separated, e.g. camera,audio"
        )
    return tuple(m for m in ALL_MODALITIES if m.value in names)


def split_windows(
    windows: Sequence[LabelledWindow],
    val_fraction: float,
    block_ms: int,
    sources: Sequence[int] | None = None,
) -> tuple[list[LabelledWindow], list[LabelledWindow]]:
    """(train, validation), deterministically, with k = round(1 / val_fraction).

    A device is a device id within one recording (`sources[i]`: the recording of window i).
    1. With at least k devices, every k-th device (in sorted order) is held out whole:
       validation then measures what matters, devices -- cameras, rooms, microphones,
       sensors -- the model never saw.
    2. Fewer devices: time blocks `start_ms // block_ms` (epoch-aligned) are held out per
       device, block b of device d when (b + d) % k == k - 1 (staggered across devices).
    3. If that leaves either side empty (tiny data), every k-th window of each device."""
    k = max(2, round(1.0 / val_fraction))
    keys = [(0 if sources is None else sources[i], w.device_id) for i, w in enumerate(windows)]
    devices = {d: i for i, d in enumerate(sorted(set(keys)))}
    rank = [devices[key] for key in keys]

    def by(
        held: Callable[[int, LabelledWindow, int], bool],
    ) -> tuple[list[LabelledWindow], list[LabelledWindow]]:
        train: list[LabelledWindow] = []
        val: list[LabelledWindow] = []
        seen: dict[int, int] = {}
        for i, w in enumerate(windows):
            n = seen[rank[i]] = seen.get(rank[i], -1) + 1
            (val if held(rank[i], w, n) else train).append(w)
        return train, val

    train: list[LabelledWindow] = []
    val: list[LabelledWindow] = []
    if len(devices) >= k:
        train, val = by(lambda d, _w, _n: d % k == k - 1)
    if not train or not val:
        train, val = by(lambda d, w, _n: (w.start_ms // block_ms + d) % k == k - 1)
    if not train or not val:
        train, val = by(lambda d, _w, n: (n + d) % k == k - 1)
    if not train or not val:
        raise UserError(
            f"{len(windows)} labelled window(s) cannot be split into training and "
            "validation; simulate or record more data"
        )
    return train, val


def model_config(options: TrainOptions, classes: Sequence[str]) -> Any:
    """The untrained model's ModelConfig (telemetry stats are fitted later)."""
    from fusion.config import AudioConfig, CameraConfig, FusionConfig, ModelConfig
    from fusion.config import TelemetryConfig as Telemetry

    mods, freeze = options.modalities, options.freeze_hf
    camera = audio = None
    if Modality.CAMERA in mods:
        camera = (
            CameraConfig(trunk="hf", hf_path=options.camera_hf, freeze_trunk=freeze)
            if options.camera_hf
            else CameraConfig()
        )
    if Modality.AUDIO in mods:
        audio = (
            AudioConfig(trunk="hf", hf_path=options.audio_hf, freeze_trunk=freeze)
            if options.audio_hf
            else AudioConfig()
        )
    return ModelConfig(
        name=options.model_name,
        classes=tuple(classes),
        window_ms=options.window_ms,
        modalities=mods,
        camera=camera,
        audio=audio,
        telemetry=Telemetry(metrics=options.metrics) if Modality.TELEMETRY in mods else None,
        fusion=FusionConfig(),
    )


def with_telemetry_stats(config: Any, windows: Sequence[LabelledWindow]) -> Any:
    """The config with telemetry mean/std fitted on `windows` (unchanged without telemetry)."""
    from fusion.train import fit_telemetry_stats

    if config.telemetry is None:
        return config
    mean, std = fit_telemetry_stats((w.inputs for w in windows), len(config.telemetry.metrics))
    telemetry = dataclasses.replace(config.telemetry, mean=mean, std=std)
    return dataclasses.replace(config, telemetry=telemetry)


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


def choose_classes(windows: Sequence[LabelledWindow]) -> tuple[str, ...]:
    """The simulator's classes when every label is one of them, else the labels sorted."""
    from pipeline.simulate import CLASSES

    labels = {w.label for w in windows}
    return tuple(CLASSES) if labels <= set(CLASSES) else tuple(sorted(labels))


class EpochBar:
    """One line per epoch on `stream`: a bar, the training loss and the validation scores."""

    def __init__(self, stream: TextIO | None, width: int = 20) -> None:
        self.stream = stream
        self.width = width
        self.best = -math.inf

    def __call__(self, step: Any) -> bool:
        """Show `step` (a fusion.train.TrainProgress); True when it is the best so far."""
        best = bool(step.val_macro_f1 > self.best)
        self.best = max(self.best, step.val_macro_f1)
        if self.stream is not None:
            done = self.width * step.epoch // step.epochs
            bar = "#" * done + "." * (self.width - done)
            self.stream.write(
                f"epoch {step.epoch:>3}/{step.epochs} [{bar}] loss {step.train_loss:.4f} | "
                f"val loss {step.val_loss:.4f} acc {step.val_accuracy:.3f} macro-F1 "
                f"{step.val_macro_f1:.3f}{' *' if best else '  '} | {step.seconds:.1f} s\n"
            )
            self.stream.flush()
        return best


def _check_out(options: TrainOptions) -> None:
    out = options.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the model")
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise UserError(f"--out {out} is not empty; choose a new directory or pass --overwrite")


def train_from_recordings(
    options: TrainOptions,
    settings: Settings,
    stream: TextIO | None = None,
    on_records: OnRecords | None = None,
) -> TrainSummary:
    import torch

    from fusion.model import FusionClassifier
    from fusion.modelfile import save_model
    from fusion.train import TrainConfig, train
    from pipeline.stream.model_runner import resolve_device

    _check_out(options)
    device = resolve_device(options.device)
    untrained = model_config(options, ("a", "b"))  # the feature spec does not need classes
    started = time.monotonic()
    per_file = recording_windows(
        options.data, settings, FeatureSpec.from_model_config(untrained), on_records
    )
    window_seconds = time.monotonic() - started
    windows = [w for got in per_file for w in got]
    sources = [i for i, got in enumerate(per_file) for _ in got]
    classes = choose_classes(windows)
    train_w, val_w = split_windows(windows, options.val_fraction, options.val_block_ms, sources)
    config = with_telemetry_stats(model_config(options, classes), train_w)
    index = {c: i for i, c in enumerate(classes)}
    train_data = [(w.inputs, index[w.label]) for w in train_w]
    val_data = [(w.inputs, index[w.label]) for w in val_w]
    if stream is not None:
        stream.write(
            f"train: {len(windows)} windows ({len(train_w)} training, {len(val_w)} "
            f"validation) in {window_seconds:.0f} s; classes {list(classes)}; "
            f"{_class_counts(train_w, classes)}; device {device}\n"
        )
    torch.manual_seed(options.seed)
    model = FusionClassifier(config)
    bar = EpochBar(stream)

    def progress(step: Any) -> None:
        if bar(step):
            save_model(model, options.out)  # checkpoint: the best epoch so far

    cfg = TrainConfig(
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        seed=options.seed,
        device=str(device),
        modality_dropout=options.modality_dropout,
    )
    started = time.monotonic()
    rate = config.audio.sample_rate if config.audio is not None else 16000
    examples = Augmented(train_data, options.seed, rate) if options.augment else train_data
    result = train(model, examples, val_data, cfg, progress)
    seconds = time.monotonic() - started
    version = save_model(model, options.out)
    return TrainSummary(
        out=options.out,
        version=version,
        classes=classes,
        train_windows=len(train_w),
        val_windows=len(val_w),
        best_epoch=result.best_epoch,
        best_val_macro_f1=result.best_val_macro_f1,
        seconds=seconds,
        window_seconds=window_seconds,
        history=[dataclasses.asdict(h) for h in result.history],
    )


def _class_counts(windows: Sequence[LabelledWindow], classes: Sequence[str]) -> str:
    labels = np.array([w.label for w in windows])
    return ", ".join(f"{c} {int((labels == c).sum())}" for c in classes)
