"""Training loop: AdamW + cross-entropy with modality dropout, best epoch by validation macro-F1.

Data are in-memory lists of (window, class index), a window being a mapping Modality -> raw
numpy array in the pipeline's format (see fusion/batch.py), with audio at the model's rate.

Determinism: `train` seeds torch (for weight-free randomness such as dropout) and uses its own
generator, seeded with cfg.seed, for shuffling and modality dropout. The model's initial weights
are the caller's: build it after torch.manual_seed(...) for a fully reproducible run. With the
same seed, data, device and thread count, two runs give identical weights.

On return the model holds the weights of the best epoch (also in TrainResult.state_dict).

What one epoch's batches are and what one step does is a `Recipe`: `SGD` (the default:
shuffled batches, backward, gradient clipping, AdamW) or `fusion.dp.DPSGD` (Poisson-sampled
batches, per-example clipping and Gaussian noise by Opacus). `Parallel` makes either run as
one of several data-parallel processes (torch.distributed DDP): each process takes its
share of every batch and of the validation windows, and they sum their scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.modality import Modality
from fusion.batch import WindowBatch
from fusion.metrics import classification_report, confusion_matrix
from fusion.model import FusionClassifier

Example = tuple[Mapping[Modality, np.ndarray], int]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01  # applied to matrices/conv kernels only, not biases or norms
    seed: int = 0
    modality_dropout: float | None = None  # None: use model.config.fusion.modality_dropout
    device: str = "cpu"  # the caller picks "cuda" when it wants it
    grad_clip: float = 1.0  # max global gradient norm
    keep_best: bool = True  # False: keep the last epoch (a federated site's local round)
    absent_views: bool = False  # also score each window with each modality removed in turn

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not (self.lr > 0 and self.weight_decay >= 0 and self.grad_clip > 0):
            raise ValueError("lr and grad_clip must be > 0 and weight_decay >= 0")
        if self.modality_dropout is not None and not 0 <= self.modality_dropout < 1:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")


@dataclass(frozen=True)
class TrainProgress:
    epoch: int  # 1-based
    epochs: int
    train_loss: float  # mean over the epoch's batches
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float  # wall time of this epoch


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    best_val_macro_f1: float
    history: list[TrainProgress]
    state_dict: dict[str, Tensor]  # weights of the best epoch, on CPU


def drop_modalities(present: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Drop each present slot with probability p, but never every slot of a window that had one
    (one of its present slots, chosen at random, is kept). present: bool [B, M] -> [B, M]."""
    if p <= 0:
        return present
    b, m = present.shape
    u = torch.rand(b, m, generator=generator).to(present.device)  # [B, M]
    keep = present & (u >= p)  # [B, M]
    lost = present.any(dim=1) & ~keep.any(dim=1)  # [B]: had a modality, all dropped
    score = torch.rand(b, m, generator=generator).to(present.device)  # [B, M]
    score = score.masked_fill(~present, -1.0)  # only present slots can be picked
    pick = F.one_hot(score.argmax(dim=1), m).bool()  # [B] -> [B, M]
    return keep | (pick & lost[:, None])  # [B, M]


class TrainStep(nn.Module):
    """A training forward pass: embed, modality dropout, fuse. As one module so DDP can wrap
    it (DDP syncs gradients of what runs through its forward)."""

    def __init__(
        self,
        model: FusionClassifier,
        p_drop: float,
        generator: torch.Generator,
        absent_views: bool = False,
    ):
        super().__init__()
        self.model = model
        self.p_drop = p_drop
        self.generator = generator
        self.absent_views = absent_views

    def forward(self, batch: WindowBatch) -> Tensor:
        """Logits [V*B, C]: the modality-dropout view, then with absent_views and M > 1 one
        view per slot m with m removed (V = 1 + M; a window whose only modality is m keeps
        it there). The views share one embedding; only the cheap fusion runs V times."""
        tokens, present = self.model.embed(batch)  # [B, M, D], [B, M]
        views = [drop_modalities(present, self.p_drop, self.generator)]  # V x [B, M]
        if self.absent_views and present.shape[1] > 1:
            for slot in range(present.shape[1]):
                removed = present.clone()  # [B, M]
                removed[:, slot] = False
                alone = ~removed.any(dim=1, keepdim=True)  # [B, 1]
                views.append(torch.where(alone, present, removed))  # [B, M]
        v = len(views)
        tokens = tokens.repeat(v, 1, 1)  # [B, M, D] -> [V*B, M, D]
        logits: Tensor = self.model.fuse(tokens, torch.cat(views))  # [V*B, C]
        return logits


class Parallel(Protocol):
    """One of `world` data-parallel processes (pipeline.learn.distributed implements it)."""

    rank: int
    world: int

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module whose forward syncs gradients across the processes (DDP)."""
        ...

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the processes (float64)."""
        ...


class Recipe(Protocol):
    """What an epoch's batches are and what one optimisation step does."""

    def batches(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """This process's example indices of each step of one epoch."""
        ...

    def step(self, batch: WindowBatch, y: Tensor) -> float:
        """One optimisation step on a batch; returns its mean loss."""
        ...


class SGD:
    """The default recipe: a seeded shuffle cut into batches, cross-entropy, global gradient
    clipping, AdamW. With `parallel`, each step takes `batch_size` windows in every process
    (a global batch of world x batch_size, as torchrun scripts do): BatchNorm then sees as
    many windows as in one process. Splitting one batch_size batch among the processes
    instead (BatchNorm over batch_size / world windows) scored 0.735 against 0.786 on
    held-out data (2 processes, 2 seeds each, docs/federated.md). A last global batch
    smaller than the process count is skipped so that every process takes part in every
    step."""

    def __init__(
        self,
        step_module: TrainStep,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        parallel: Parallel | None = None,
    ):
        self.module = step_module if parallel is None else parallel.wrap(step_module)
        self.params = [p for p in step_module.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.cfg = cfg
        self.parallel = parallel

    def batches(self, n: int, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(n, generator=generator).tolist()
        size = self.cfg.batch_size * (1 if self.parallel is None else self.parallel.world)
        chunks = [order[i : i + size] for i in range(0, n, size)]
        if self.parallel is None:
            return chunks
        rank, world = self.parallel.rank, self.parallel.world
        return [c[rank::world] for c in chunks if len(c) >= world]

    def step(self, batch: WindowBatch, y: Tensor) -> float:
        logits = self.module(batch)  # [V*B, C]
        views = logits.shape[0] // y.shape[0]
        loss = F.cross_entropy(logits, y.repeat(views))  # [V*B, C], [V*B] -> scalar
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        return float(loss.item())


RecipeFactory = Callable[[TrainStep, torch.optim.Optimizer, TrainConfig, int], Recipe]


def evaluate(
    model: FusionClassifier, data: Sequence[Example], batch_size: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and predicted class per example (eval mode, no dropout)."""
    model.eval()
    losses, preds = [], []
    with torch.inference_mode():
        for batch, y in _batches(model, data, range(len(data)), batch_size, device):
            logits = model(batch)["logits"]  # [B, C]
            losses.append(F.cross_entropy(logits, y, reduction="sum").item())
            preds.append(logits.argmax(dim=1).cpu().numpy())  # [B]
    return sum(losses) / len(data), np.concatenate(preds)


def train(
    model: FusionClassifier,
    train_data: Sequence[Example],
    val_data: Sequence[Example],
    cfg: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    *,
    recipe: RecipeFactory | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train `model` in place; `recipe(step_module, optimizer, cfg, n_train)` builds the
    Recipe (default: SGD, data-parallel with `parallel`)."""
    classes = model.config.classes
    _check_labels(train_data, "train_data", len(classes))
    _check_labels(val_data, "val_data", len(classes))
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    p_drop = (
        model.config.fusion.modality_dropout
        if cfg.modality_dropout is None
        else cfg.modality_dropout
    )
    model.to(device)
    optimizer = _optimizer(model, cfg)
    step_module = TrainStep(model, p_drop, generator, cfg.absent_views)
    steps: Recipe = (
        SGD(step_module, optimizer, cfg, parallel)
        if recipe is None
        else recipe(step_module, optimizer, cfg, len(train_data))
    )
    history: list[TrainProgress] = []
    best_epoch, best_f1, best_state = 0, -math.inf, _cpu_state(model)
    for epoch in range(1, cfg.epochs + 1):
        started = time.monotonic()
        model.train()
        total, batches = 0.0, 0
        for indices in steps.batches(len(train_data), generator):
            for batch, y in _batches(model, train_data, indices, len(indices), device):
                total, batches = total + steps.step(batch, y), batches + 1
        val_loss, report = validation_report(model, val_data, cfg.batch_size, device, parallel)
        step = TrainProgress(
            epoch=epoch,
            epochs=cfg.epochs,
            train_loss=total / max(batches, 1),
            val_loss=val_loss,
            val_accuracy=report["accuracy"],
            val_macro_f1=report["macro_f1"],
            seconds=time.monotonic() - started,
        )
        history.append(step)
        if step.val_macro_f1 > best_f1 or not cfg.keep_best:
            best_epoch, best_f1, best_state = epoch, step.val_macro_f1, _cpu_state(model)
        if progress is not None:
            progress(step)
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        best_epoch=best_epoch, best_val_macro_f1=best_f1, history=history, state_dict=best_state
    )


def validation_counts(
    model: FusionClassifier, data: Sequence[Example], batch_size: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """(summed cross-entropy, confusion matrix [C, C]) over `data`: what processes or
    federated sites add up to score a model on validation windows they hold apart."""
    n_classes = len(model.config.classes)
    if len(data) == 0:
        return 0.0, np.zeros((n_classes, n_classes), dtype=np.int64)
    mean_loss, y_pred = evaluate(model, data, batch_size, device)
    y_true = np.array([label for _, label in data], dtype=np.int64)
    return mean_loss * len(data), confusion_matrix(y_true, y_pred, n_classes)


def validation_report(
    model: FusionClassifier,
    data: Sequence[Example],
    batch_size: int,
    device: torch.device,
    parallel: Parallel | None,
) -> tuple[float, dict[str, float]]:
    """Mean validation loss and the classification report; with `parallel` each process
    scores its share of the windows and the counts are summed."""
    share = data if parallel is None else data[parallel.rank :: parallel.world]
    loss_sum, cm = validation_counts(model, share, batch_size, device)
    if parallel is not None:
        summed = parallel.all_sum(np.concatenate([[loss_sum], cm.ravel()]).astype(np.float64))
        loss_sum, cm = float(summed[0]), summed[1:].round().astype(np.int64).reshape(cm.shape)
    report = classification_report(cm, model.config.classes)
    return loss_sum / max(int(cm.sum()), 1), report


def fit_telemetry_stats(
    windows: Iterable[Mapping[Modality, np.ndarray]], n_metrics: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-metric mean and std of raw telemetry [steps, n_metrics] over all windows, ignoring
    NaN (missing). A metric never seen gets mean 0, std 1; a constant one gets std 1."""
    return stats_from_sums(*telemetry_sums(windows, n_metrics))


def telemetry_sums(
    windows: Iterable[Mapping[Modality, np.ndarray]], n_metrics: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, sum, sum of squares) per metric [n_metrics] of the values present: what
    federated sites send instead of values (sums over sites give the same statistics)."""
    count = np.zeros(n_metrics)
    total = np.zeros(n_metrics)
    total_sq = np.zeros(n_metrics)
    for window in windows:
        raw = window.get(Modality.TELEMETRY)
        if raw is None:
            continue
        x = np.asarray(raw, dtype=np.float64).reshape(-1, n_metrics)  # [steps, M]
        seen = ~np.isnan(x)
        count += seen.sum(axis=0)
        total += np.where(seen, x, 0.0).sum(axis=0)
        total_sq += np.where(seen, x * x, 0.0).sum(axis=0)
    return count, total, total_sq


def stats_from_sums(
    count: np.ndarray, total: np.ndarray, total_sq: np.ndarray
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-metric (mean, std) from counts, sums and sums of squares [M]."""
    n_metrics = len(count)
    mean = np.divide(total, count, out=np.zeros(n_metrics), where=count > 0)
    var = np.divide(total_sq, count, out=np.zeros(n_metrics), where=count > 0) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 1e-6 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _batches(
    model: FusionClassifier,
    data: Sequence[Example],
    order: Iterable[int],
    batch_size: int,
    device: torch.device,
) -> Iterable[tuple[WindowBatch, Tensor]]:
    rate = model.config.audio.sample_rate if model.config.audio is not None else 0
    order = list(order)
    for start in range(0, len(order), batch_size):
        chosen = [data[i] for i in order[start : start + batch_size]]
        batch = WindowBatch.collate([w for w, _ in chosen], audio_sample_rate=rate)
        y = torch.tensor([label for _, label in chosen], dtype=torch.int64)  # [B]
        yield batch.to(device), y.to(device)


def _optimizer(model: FusionClassifier, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _cpu_state(model: FusionClassifier) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _check_labels(data: Sequence[Example], name: str, n_classes: int) -> None:
    if len(data) == 0:
        raise ValueError(
            f"{name} is empty; training needs examples for both training and "
            f"validation (the best epoch is chosen by validation macro-F1)"
        )
    bad = [label for _, label in data if not 0 <= int(label) < n_classes]
    if bad:
        raise ValueError(
            f"{name}: labels must be class indices 0..{n_classes - 1}, got e.g. {bad[:5]}"
        )
