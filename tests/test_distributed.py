"""Data-parallel training (issue 17): how batches and validation are shared among processes,
torchrun's environment, and `iotfuse train --nproc 2` end to end (gloo on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES
from fusion.model import FusionClassifier
from fusion.modelfile import load_model
from fusion.train import SGD, TrainConfig, TrainStep, validation_counts, validation_report
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.learn.distributed import Process, from_env
from tests.factory import random_window, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeGroup:
    """Process `rank` of `world`, where every other process holds the same sums."""

    def __init__(self, rank: int, world: int, others: list[np.ndarray] | None = None):
        self.rank, self.world, self.others = rank, world, others or []

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return values + sum(self.others, np.zeros_like(values))


def test_every_process_takes_a_batch_of_its_own_at_every_step() -> None:
    model = FusionClassifier(tiny_config())
    step = TrainStep(model, 0.0, torch.Generator())
    cfg = TrainConfig(batch_size=3)
    shares = []
    for rank in range(2):
        sgd = SGD(step, torch.optim.SGD(model.parameters(), lr=0.1), cfg, FakeGroup(rank, 2))
        shares.append(sgd.batches(14, torch.Generator().manual_seed(5)))
    alone = SGD(step, torch.optim.SGD(model.parameters(), lr=0.1), cfg).batches(
        14, torch.Generator().manual_seed(5)
    )
    assert [len(b) for b in alone] == [3, 3, 3, 3, 2]
    # the same shuffle, cut into global batches of 2 x 3 (BatchNorm sees 3 windows, as in
    # one process); the last global batch (2 windows) still gives each process one
    assert [len(b) for b in shares[0]] == [3, 3, 1] and [len(b) for b in shares[1]] == [3, 3, 1]
    together = [x for i in range(3) for s in shares for x in s[i]]
    assert sorted(together) == list(range(14)) and len(set(together)) == 14
    order = [x for b in alone for x in b]
    assert sorted(shares[0][0] + shares[1][0]) == sorted(order[:6])


def test_validation_counts_are_summed_over_the_processes() -> None:
    cfg = tiny_config()
    model = FusionClassifier(cfg).eval()
    rng = np.random.default_rng(0)
    data = [(random_window(rng, cfg, ALL_MODALITIES), i % 3) for i in range(9)]
    device = torch.device("cpu")
    _, whole = validation_counts(model, data, 4, device)
    # process 0 of 2 scores windows 0, 2, 4, ...; the other process's counts arrive summed
    _, other = validation_counts(model, data[1::2], 4, device)
    loss, report = validation_report(
        model, data, 4, device, FakeGroup(0, 2, [np.r_[0.0, other.ravel()]])
    )
    assert report["support"] == 9 == int(whole.sum())
    alone_loss, alone = validation_report(model, data, 4, device, None)
    assert report["macro_f1"] == alone["macro_f1"]
    assert loss < alone_loss  # the other process's loss sum was left at 0 in this fake


def test_torchrun_environment() -> None:
    assert from_env({}) is None and from_env({"WORLD_SIZE": "1"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert from_env(env) == Process(rank=3, world=4, local_rank=1, local_world=2)
    with pytest.raises(UserError, match="torchrun"):
        from_env({"WORLD_SIZE": "2"})


@pytest.mark.slow
def test_train_with_two_processes_writes_one_model(tmp_path: Path) -> None:
    rec = tmp_path / "tiny.iotrec"
    assert (
        main(["simulate", "--seed", "4", "--devices", "3", "--duration", "8", "--out", str(rec)])
        == 0
    )
    out = tmp_path / "ddp"
    args = ["train", "--data", str(rec), "--out", str(out), "--epochs", "2", "--device", "cpu"]
    assert main([*args, "--nproc", "2"]) == 0
    loaded = load_model(out)
    assert loaded.config.conv_norm == "batch" and loaded.config.privacy is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
