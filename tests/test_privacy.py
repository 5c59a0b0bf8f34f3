"""Differential privacy (issue 17): the GroupNorm switch, per-window gradients, DP-SGD's
spent epsilon in the model and in the evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from encoders.modality import ALL_MODALITIES, Modality
from fusion.batch import WindowBatch
from fusion.config import ModelConfig
from fusion.dp import DPSGD, DenseForward, DPIncompatible, dense_inputs, per_example_grads
from fusion.model import FusionClassifier
from fusion.modelfile import load_model, save_model
from fusion.train import TrainConfig, train
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.learn.privacy import DPOptions, calibrate
from pipeline.stream.model_runner import default_model_dir
from tests.factory import TINY_RATE, random_window, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _norms(model: nn.Module) -> tuple[int, int]:
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gn = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    return bn, gn


def test_the_shipped_model_keeps_batchnorm_and_group_norm_is_a_switch(tmp_path: Path) -> None:
    shipped = json.loads((default_model_dir() / "config.json").read_text())
    assert shipped.get("conv_norm", "batch") == "batch" and "privacy" not in shipped
    loaded = load_model(default_model_dir())
    assert loaded.config.conv_norm == "batch" and loaded.config.privacy is None
    assert _norms(loaded.model) == (11, 0)  # 4 camera + 4 audio + 3 telemetry blocks

    cfg = tiny_config()
    torch.manual_seed(0)
    plain = FusionClassifier(cfg)
    torch.manual_seed(0)
    group = FusionClassifier(dataclasses.replace(cfg, conv_norm="group"))
    assert _norms(plain) == (11, 0) and _norms(group) == (0, 11)
    shared = set(plain.state_dict()) & set(group.state_dict())
    # the same seed gives the same weights everywhere but in the norms
    assert all(torch.equal(plain.state_dict()[k], group.state_dict()[k]) for k in shared)
    assert not any("running_mean" in k for k in group.state_dict())
    save_model(group, tmp_path / "g")  # the switch is in the config: it loads as it was saved
    again = load_model(tmp_path / "g")
    assert again.config.conv_norm == "group" and _norms(again.model) == (0, 11)
    rng = np.random.default_rng(1)
    batch = WindowBatch.collate([random_window(rng, cfg, ALL_MODALITIES)], TINY_RATE)
    group.eval()
    assert torch.equal(group(batch)["logits"], again.model(batch)["logits"])


def colour_windows(
    cfg: ModelConfig, n: int, seed: int
) -> list[tuple[dict[Modality, np.ndarray], int]]:
    """Class = the colour a whole camera window is tinted with; audio and telemetry are
    noise, each missing half of the time."""
    rng = np.random.default_rng(seed)
    data = []
    for i in range(n):
        window = random_window(rng, cfg, ALL_MODALITIES)
        frames = rng.integers(0, 100, window[Modality.CAMERA].shape)
        frames[..., i % 3] += 120
        window[Modality.CAMERA] = frames.astype(np.uint8)
        for m in (Modality.AUDIO, Modality.TELEMETRY):
            if rng.random() < 0.5:
                del window[m]
        data.append((window, i % 3))
    return data


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_the_group_norm_model_learns_what_the_batchnorm_model_learns(norm: str) -> None:
    # GroupNorm with a group per channel (or 8 groups) subtracts each channel's mean over the
    # frame: a model built so reached macro-F1 0.31 here, BatchNorm 1.0 (one group: 1.0)
    cfg = dataclasses.replace(tiny_config(), conv_norm=norm)
    torch.manual_seed(0)
    result = train(
        FusionClassifier(cfg),
        colour_windows(cfg, 90, seed=0),
        colour_windows(cfg, 45, seed=1),
        TrainConfig(epochs=8, batch_size=16, lr=3e-3),
    )
    assert result.best_val_macro_f1 >= 0.9


def test_per_window_gradients_equal_each_window_trained_alone() -> None:
    cfg = dataclasses.replace(tiny_config(dropout=0.0), conv_norm="group")
    torch.manual_seed(0)
    model = FusionClassifier(cfg).train()
    rng = np.random.default_rng(0)
    subsets = [ALL_MODALITIES, (Modality.CAMERA,), (Modality.AUDIO, Modality.TELEMETRY)]
    windows = [random_window(rng, cfg, s) for s in subsets]
    y = torch.tensor([0, 1, 2])
    batch = WindowBatch.collate(windows, TINY_RATE)
    present = torch.tensor([[True, True, True], [True, False, False], [False, True, True]])
    grads, losses = per_example_grads(DenseForward(model), dense_inputs(model, batch), present, y)
    for i, window in enumerate(windows):  # the model's own forward, one window at a time
        model.zero_grad()
        logits = model(WindowBatch.collate([window], TINY_RATE))["logits"]
        loss = torch.nn.functional.cross_entropy(logits, y[i : i + 1])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[f"model.{name}"][i], want, atol=1e-5, rtol=1e-4)


def test_dp_sgd_refuses_batchnorm_and_spends_what_it_was_calibrated_to() -> None:
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    data = [(random_window(rng, cfg, ALL_MODALITIES), int(rng.integers(0, 3))) for _ in range(40)]
    dp = calibrate(DPOptions(epsilon=3.0, delta=1e-3), n_train=40, batch_size=10, epochs=2)
    with pytest.raises(DPIncompatible, match="GroupNorm"):
        train(FusionClassifier(cfg), data, data[:5], TrainConfig(epochs=1), recipe=dp.recipe)
    assert isinstance(dp, DPSGD) and dp.noise_multiplier > 0.5 and dp.sample_rate == 0.25
    model = FusionClassifier(dataclasses.replace(cfg, conv_norm="group"))
    train(model, data, data[:5], TrainConfig(epochs=2, batch_size=10), recipe=dp.recipe)
    assert dp.steps == 8  # 2 epochs x 1 / 0.25 Poisson steps (none empty at this rate)
    assert 2.5 < dp.epsilon(1e-3) <= 3.0  # the budget, spent, not exceeded
    with pytest.raises(UserError, match="too low"):
        calibrate(DPOptions(epsilon=1e-6), n_train=40, batch_size=40, epochs=1000)


@pytest.mark.slow
def test_train_with_dp_reports_epsilon_in_the_model_and_the_evaluation(tmp_path: Path) -> None:
    rec = tmp_path / "tiny.iotrec"
    assert (
        main(["simulate", "--seed", "3", "--devices", "2", "--duration", "8", "--out", str(rec)])
        == 0
    )
    out = tmp_path / "dp"
    args = ["train", "--data", str(rec), "--out", str(out), "--epochs", "2", "--device", "cpu"]
    assert main([*args, "--dp-epsilon", "4", "--dp-delta", "1e-4"]) == 0
    cfg = load_model(out).config
    assert cfg.conv_norm == "group" and cfg.privacy is not None
    assert cfg.privacy.target_epsilon == 4.0 and 0 < cfg.privacy.epsilon <= 4.0
    assert cfg.privacy.delta == 1e-4 and cfg.privacy.scope == "central"
    assert (
        main(["evaluate", "--model", str(out), "--data", str(rec), "--out", str(tmp_path / "r")])
        == 0
    )
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["model"]["privacy"]["epsilon"] == cfg.privacy.epsilon
    assert f"epsilon {cfg.privacy.epsilon:.2f}" in (tmp_path / "r" / "report.md").read_text()
    assert main([*args, "--overwrite", "--dp-epsilon", "4", "--nproc", "2"]) == 1  # one or other
