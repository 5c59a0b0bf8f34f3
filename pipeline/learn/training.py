"""The training recipe: how a fusion model (or a single-modality baseline) is trained from
labelled recordings. `iotfuse train` runs it centrally (pipeline.learn.central), and every
federated site runs it on its own recordings (pipeline.learn.federated.site).

    prep = prepare(TrainOptions(data=(Path("train.iotrec"),), out=Path("m")), settings)

1. Windows: the recordings' records go through `pipeline.learn.dataset.labelled_windows` (the
   live pipeline's aligner, ingest, windower and feature code); labels come from the
   labels-topic records the recordings hold.
2. Validation split (`split_windows`): every 5th device is held out whole (with fewer
   than 5 devices: time blocks per device), so the best epoch is the one that does best
   on devices -- cameras, rooms, microphones, sensors -- it never trained on.
3. Telemetry normalisation (mean/std per metric) is fitted on the training windows only
   and stored in the model config.
4. `fusion.train.train`: the best epoch by validation macro-F1 is kept; every time the
   validation score improves the model directory is rewritten (a checkpoint). Training
   windows are varied anew on every read (pipeline.learn.augment.Augmented).
5. With `dp` (DPOptions): DP-SGD, GroupNorm in the CNN trunks (pipeline.learn.privacy).
6. With `init` (a model directory): training starts from that model's weights, and its
   config (architecture, classes, windows, telemetry normalisation) is kept as it is: how
   a public model (the shipped one) is fine-tuned on a site's private recordings.

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
from typing import Any, TextIO

import numpy as np

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.errors import UserError
from pipeline.learn.augment import Augmented as Augmented  # the recipe's parts in one place
from pipeline.learn.augment import Example
from pipeline.learn.dataset import LabelledWindow, OnRecords, recording_windows
from pipeline.learn.privacy import DPOptions
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
    absent_views: bool = True  # also train each window with each modality removed in turn
    augment: bool = True  # vary the training inputs (see Augmented)
    camera_hf: str | None = None  # local transformers vision model directory
    audio_hf: str | None = None  # local transformers AST directory
    freeze_hf: bool = False  # train only the heads and fusion on top of the hf trunks
    overwrite: bool = False
    dp: DPOptions | None = None  # train with DP-SGD (pipeline.learn.privacy)
    init: Path | None = None  # start from this model: its weights, architecture and config
    nproc: int = 1  # data-parallel processes on this machine (pipeline.learn.distributed)

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("no training data: pass one or more recordings with --data")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_block_ms < 1:
            raise UserError(f"val_block_ms must be >= 1, got {self.val_block_ms}")
        if self.nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {self.nproc}")

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
    epsilon: float | None = None  # spent by DP-SGD (None: trained without DP)


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


@dataclass(frozen=True)
class Prepared:
    """The labelled windows of a training run, split, with the model config to train."""

    config: Any  # fusion ModelConfig, telemetry statistics fitted on the training windows
    train: list[LabelledWindow]
    val: list[LabelledWindow]
    window_seconds: float
    start: Any = None  # --init's fusion LoadedModel: the weights training starts from

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)


def read_windows(
    options: TrainOptions, settings: Settings, untrained: Any, on_records: OnRecords | None
) -> tuple[list[LabelledWindow], list[int], float]:
    """(windows, the recording of each, seconds) of every --data recording, made as the
    `untrained` ModelConfig's features say (classes do not matter)."""
    started = time.monotonic()
    per_file = recording_windows(
        options.data, settings, FeatureSpec.from_model_config(untrained), on_records
    )
    windows = [w for got in per_file for w in got]
    sources = [i for i, got in enumerate(per_file) for _ in got]
    return windows, sources, time.monotonic() - started


def prepare(
    options: TrainOptions, settings: Settings, on_records: OnRecords | None = None
) -> Prepared:
    start = None if options.init is None else load_init(options.init)
    untrained = model_config(options, ("a", "b")) if start is None else start.config
    windows, sources, seconds = read_windows(options, settings, untrained, on_records)
    train_w, val_w = split_windows(windows, options.val_fraction, options.val_block_ms, sources)
    if start is not None:
        # what DP spent on the starting model does not describe this run (it records its own)
        config = dataclasses.replace(start.config, privacy=None)
        unknown = sorted({w.label for w in windows} - set(config.classes))
        if unknown:
            raise UserError(
                f"--init {options.init} does not know the labels {unknown} of --data; train "
                "without --init, or leave those recordings out"
            )
        if options.name:
            config = dataclasses.replace(config, name=options.name)
        return Prepared(config, train_w, val_w, seconds, start)  # its normalisation, norms
    config = with_telemetry_stats(model_config(options, choose_classes(windows)), train_w)
    if options.dp is not None:
        from pipeline.learn.privacy import dp_architecture

        config = dp_architecture(config)
    return Prepared(config, train_w, val_w, seconds)


def load_init(path: Path) -> Any:
    """--init's model (a UserError saying why when it does not load)."""
    from fusion.modelfile import load_model

    try:
        return load_model(path)
    except (ValueError, OSError) as exc:  # ModelFileError, ModelConfigError, unreadable
        raise UserError(f"--init {path}: {exc}") from exc


def labelled_examples(
    windows: Sequence[LabelledWindow], classes: Sequence[str]
) -> list[tuple[dict[Modality, np.ndarray], int]]:
    index = {c: i for i, c in enumerate(classes)}
    return [(w.inputs, index[w.label]) for w in windows]


def training_examples(
    examples: Sequence[Example], config: Any, augment: bool, seed: int
) -> Sequence[Example]:
    """What the recipe trains on: the examples, varied anew on every read (Augmented)."""
    rate = config.audio.sample_rate if config.audio is not None else 16000
    return Augmented(examples, seed, rate) if augment else examples


def train_config(options: TrainOptions, device: str) -> Any:
    """fusion.train.TrainConfig of these options."""
    from fusion.train import TrainConfig

    return TrainConfig(
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        seed=options.seed,
        device=device,
        modality_dropout=options.modality_dropout,
        absent_views=options.absent_views,
    )


def class_counts(windows: Sequence[LabelledWindow], classes: Sequence[str]) -> str:
    labels = np.array([w.label for w in windows])
    return ", ".join(f"{c} {int((labels == c).sum())}" for c in classes)
