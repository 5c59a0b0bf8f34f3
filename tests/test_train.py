"""Training loop on separable toy problems; determinism; modality dropout; telemetry stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.batch import WindowBatch
from fusion.config import ModelConfig
from fusion.metrics import classification_report, confusion_matrix
from fusion.model import FusionClassifier
from fusion.train import (
    Example,
    TrainConfig,
    TrainProgress,
    drop_modalities,
    fit_telemetry_stats,
    train,
)
from tests.factory import TINY_RATE, random_window, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_data(cfg: ModelConfig, n: int, seed: int) -> list[Example]:
    """Class = dominant colour of the camera frames (red/green/blue); audio and telemetry are
    noise and each missing half of the time."""
    rng = np.random.default_rng(seed)
    data: list[Example] = []
    for i in range(n):
        label = i % 3
        window = random_window(rng, cfg, ALL_MODALITIES)
        frames = rng.integers(0, 100, window[Modality.CAMERA].shape)
        frames[..., label] += 120
        window[Modality.CAMERA] = frames.astype(np.uint8)
        for m in (Modality.AUDIO, Modality.TELEMETRY):
            if rng.random() < 0.5:
                del window[m]
        data.append((window, label))
    return data


def telemetry_data(cfg: ModelConfig, n: int, seed: int) -> list[Example]:
    """Class = level of the metrics (-2, 0, +2 plus unit noise); the camera shows noise."""
    rng = np.random.default_rng(seed)
    data: list[Example] = []
    for i in range(n):
        label = i % 3
        window = random_window(rng, cfg, (Modality.CAMERA, Modality.TELEMETRY))
        window[Modality.TELEMETRY] += 2.0 * (label - 1)
        data.append((window, label))
    return data


def accuracy(model: FusionClassifier, data: list[Example]) -> float:
    batch = WindowBatch.collate([w for w, _ in data], TINY_RATE)
    pred = model.predict(batch).label_idx.numpy()
    y = np.array([label for _, label in data])
    return float(classification_report(confusion_matrix(y, pred, 3), "abc")["accuracy"])


# with noise images beside it, telemetry needs more examples (else the noise is memorised first)
@pytest.mark.parametrize("make_data, n_train", [(colour_data, 90), (telemetry_data, 150)])
def test_learns_a_separable_toy_problem(make_data: object, n_train: int) -> None:
    epochs = 8
    cfg = tiny_config()
    train_data = make_data(cfg, n_train, seed=0)  # type: ignore[operator]
    val_data = make_data(cfg, 45, seed=1)  # type: ignore[operator]
    torch.manual_seed(0)
    model = FusionClassifier(cfg)
    seen: list[TrainProgress] = []
    result = train(
        model,
        train_data,
        val_data,
        TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, seed=0),
        seen.append,
    )
    assert [p.epoch for p in seen] == list(range(1, epochs + 1)) and result.history == seen
    assert seen[-1].train_loss < 0.6 * seen[0].train_loss
    assert result.best_val_macro_f1 == max(p.val_macro_f1 for p in seen)
    assert seen[result.best_epoch - 1].val_macro_f1 == result.best_val_macro_f1
    assert result.best_val_macro_f1 >= 0.9
    assert accuracy(model, val_data) >= 0.9  # the model now holds the best epoch's weights
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.state_dict.items())


def test_training_is_deterministic_for_a_seed() -> None:
    cfg = tiny_config(dropout=0.1)
    data = colour_data(cfg, 24, seed=0)

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = FusionClassifier(cfg)
        train(model, data, data[:6], TrainConfig(epochs=2, batch_size=8, seed=seed))
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_modality_dropout_never_drops_every_modality_of_a_window() -> None:
    g = torch.Generator().manual_seed(0)
    present = torch.rand(2000, 3, generator=g) < 0.7
    present[:10] = False
    dropped = drop_modalities(present, 0.9, g)
    assert not (dropped & ~present).any()  # never invents a modality
    assert torch.equal(dropped.any(dim=1), present.any(dim=1))  # never empties a window
    k = present.sum(dim=1).double()  # each slot kept w.p. 1-p, plus one when all k dropped
    expected_kept = (k * 0.1 + torch.where(k > 0, 0.9**k, 0.0)).sum()
    assert abs(dropped.sum().item() - expected_kept.item()) < 0.03 * expected_kept.item()
    assert torch.equal(drop_modalities(present, 0.0, g), present)


def test_fit_telemetry_stats_ignores_missing_values() -> None:
    nan = float("nan")
    windows: list[dict[Modality, np.ndarray]] = [
        {Modality.TELEMETRY: np.array([[1.0, nan, 5.0], [3.0, nan, 5.0]], np.float32)},
        {Modality.CAMERA: np.zeros((1, 16, 16, 3), np.uint8)},  # no telemetry: skipped
        {Modality.TELEMETRY: np.array([[5.0, nan, 5.0]], np.float32)},
    ]
    mean, std = fit_telemetry_stats(windows, 3)
    assert mean == pytest.approx((3.0, 0.0, 5.0))
    assert std == pytest.approx((math.sqrt(8 / 3), 1.0, 1.0))  # unseen and constant -> 1


def test_train_refuses_bad_labels_and_empty_validation() -> None:
    cfg = tiny_config((Modality.TELEMETRY,))
    model = FusionClassifier(cfg)
    data = telemetry_data(tiny_config(), 6, seed=0)
    data = [({Modality.TELEMETRY: w[Modality.TELEMETRY]}, y) for w, y in data]
    with pytest.raises(ValueError, match="val_data is empty"):
        train(model, data, [], TrainConfig(epochs=1))
    with pytest.raises(ValueError, match=r"class indices 0..2, got e.g. \[5\]"):
        train(model, data + [(data[0][0], 5)], data, TrainConfig(epochs=1))


def redundant_data(cfg: ModelConfig, n: int, seed: int) -> list[Example]:
    """Class in both the camera (dominant colour, easy) and the telemetry level (harder):
    a model may learn the camera alone unless it is asked to do without it."""
    rng = np.random.default_rng(seed)
    data: list[Example] = []
    for i in range(n):
        label = i % 3
        window = random_window(rng, cfg, (Modality.CAMERA, Modality.TELEMETRY))
        frames = rng.integers(0, 100, window[Modality.CAMERA].shape)
        frames[..., label] += 120
        window[Modality.CAMERA] = frames.astype(np.uint8)
        window[Modality.TELEMETRY] += 2.0 * (label - 1)
        data.append((window, label))
    return data


def test_absent_views_teach_each_modality_to_stand_in_for_a_missing_one() -> None:
    cfg = tiny_config((Modality.CAMERA, Modality.TELEMETRY))
    train_data, val_data = redundant_data(cfg, 150, seed=0), redundant_data(cfg, 60, seed=1)
    without_camera = [({Modality.TELEMETRY: w[Modality.TELEMETRY]}, y) for w, y in val_data]

    def run(absent_views: bool) -> FusionClassifier:
        torch.manual_seed(0)
        model = FusionClassifier(cfg)
        config = TrainConfig(
            epochs=6,
            batch_size=16,
            lr=3e-3,
            seed=0,
            modality_dropout=0.0,
            absent_views=absent_views,
        )
        train(model, train_data, val_data, config)
        return model

    plain, views = run(False), run(True)
    assert accuracy(views, val_data) >= 0.9  # the full windows lose nothing
    assert accuracy(views, without_camera) >= 0.85
    assert accuracy(plain, without_camera) < accuracy(views, without_camera) - 0.2
