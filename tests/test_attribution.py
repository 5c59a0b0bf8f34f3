"""Exact Shapley attribution over modality slots."""

from __future__ import annotations

import itertools
from math import factorial

import numpy as np
import pytest
import torch
from torch import Tensor

from fusion.attribution import coalition_values, coalitions, shapley
from fusion.batch import WindowBatch
from fusion.model import FusionClassifier
from tests.factory import TINY_RATE, all_subsets, random_window, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_looking_model() -> FusionClassifier:
    torch.manual_seed(1)
    model = FusionClassifier(tiny_config()).eval()
    with torch.no_grad():  # larger weights so that modalities move the prediction visibly
        for p in model.encoder.parameters():
            p.mul_(3.0)
        model.classifier.weight.mul_(10.0)
    return model


def random_inputs(b: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, 3, 16, generator=g)
    present = torch.rand(b, 3, generator=g) < 0.6
    present[0] = True  # at least one full row and one empty row
    present[1] = False
    return tokens, present


def brute_force_shapley(value: dict[frozenset[int], float], m: int) -> list[float]:
    """Average marginal contribution over all m! orderings (independent of the subset formula)."""
    phi = [0.0] * m
    for order in itertools.permutations(range(m)):
        seen: frozenset[int] = frozenset()
        for i in order:
            phi[i] += value[seen | {i}] - value[seen]
            seen = seen | {i}
    return [p / factorial(m) for p in phi]


def test_efficiency_sum_equals_full_minus_empty() -> None:
    model = trained_looking_model()
    tokens, present = random_inputs()
    with torch.inference_mode():
        probs = model.fuse(tokens, present).softmax(dim=1)
        target = probs.argmax(dim=1)
        phi = shapley(model, tokens, present, target)
        empty = model.fuse(tokens, torch.zeros_like(present)).softmax(dim=1)
    p_full = probs.gather(1, target[:, None]).squeeze(1)
    p_empty = empty.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(phi.sum(dim=1), p_full - p_empty, rtol=0, atol=1e-5)
    assert phi[0].abs().sum() > 1e-3  # the full row does get non-trivial attribution


def test_absent_modality_gets_exactly_zero_and_is_a_null_player() -> None:
    model = trained_looking_model()
    tokens, present = random_inputs(seed=1)
    target = torch.zeros(len(tokens), dtype=torch.int64)
    with torch.inference_mode():
        phi = shapley(model, tokens, present, target)
        v = coalition_values(model, tokens, present, target)  # [2^M, B]
    assert torch.all(phi[~present] == 0.0)
    assert torch.all(phi[1] == 0.0)  # nothing present
    sets = coalitions(3)
    for s, i in itertools.product(range(8), range(3)):
        if not sets[s, i]:
            with_i = s | (1 << i)
            absent_rows = ~present[:, i]  # adding an absent slot changes nothing
            torch.testing.assert_close(v[with_i, absent_rows], v[s, absent_rows], rtol=0, atol=1e-6)


def test_matches_brute_force_permutation_shapley() -> None:
    model = trained_looking_model()
    tokens, present = random_inputs(b=6, seed=2)
    present[:] = True
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.inference_mode():
        phi = shapley(model, tokens, present, target)
        v = coalition_values(model, tokens, present, target).double()
    sets = coalitions(3)
    for b in range(6):
        value = {
            frozenset(int(i) for i in torch.nonzero(sets[s]).flatten()): float(v[s, b])
            for s in range(8)
        }
        expected = torch.tensor(brute_force_shapley(value, 3), dtype=torch.float32)
        torch.testing.assert_close(phi[b], expected, rtol=0, atol=1e-6)


class OnlySlot:
    """A fuse whose prediction depends only on whether slot `k` is attended."""

    def __init__(self, k: int):
        self.k = k

    def fuse(self, tokens: Tensor, present: Tensor) -> Tensor:
        on = present[:, self.k].float()  # [N]
        return torch.stack([2.0 * on, torch.zeros_like(on)], dim=1)  # [N, 2]


class Symmetric:
    """Class 0 logit = number of attended slots among {0, 1}; slot 2 is irrelevant."""

    def fuse(self, tokens: Tensor, present: Tensor) -> Tensor:
        n = present[:, :2].float().sum(dim=1)  # [N]
        return torch.stack([n, torch.zeros_like(n)], dim=1)  # [N, 2]


def test_a_fuse_that_reads_one_slot_gives_it_all_attribution() -> None:
    tokens, present = torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    target = torch.zeros(2, dtype=torch.int64)
    for k in range(3):
        phi = shapley(OnlySlot(k), tokens, present, target)
        expected_k = torch.sigmoid(torch.tensor(2.0)) - 0.5  # p(all) - p(none)
        torch.testing.assert_close(phi[:, k], expected_k.expand(2))
        others = [i for i in range(3) if i != k]
        assert torch.all(phi[:, others] == 0)


def test_symmetric_slots_get_equal_attribution() -> None:
    tokens, present = torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    phi = shapley(Symmetric(), tokens, present, torch.zeros(1, dtype=torch.int64))
    torch.testing.assert_close(phi[0, 0], phi[0, 1])
    assert phi[0, 0] > 0 and phi[0, 2].abs() < 1e-7


def test_predict_attributes_the_predicted_class_and_zero_for_missing() -> None:
    model = trained_looking_model()
    rng = np.random.default_rng(0)
    subsets = all_subsets()
    batch = WindowBatch.collate([random_window(rng, model.config, s) for s in subsets], TINY_RATE)
    pred = model.predict(batch)
    with torch.inference_mode():
        tokens, present = model.embed(batch)
        empty = model.fuse(tokens, torch.zeros_like(present)).softmax(dim=1)
    p_full = pred.probs.gather(1, pred.label_idx[:, None]).squeeze(1)
    p_empty = empty.gather(1, pred.label_idx[:, None]).squeeze(1)
    torch.testing.assert_close(pred.attribution.sum(dim=1), p_full - p_empty, rtol=0, atol=1e-5)
    for row, subset in enumerate(subsets):
        for slot, m in enumerate(model.modalities):
            if m not in subset:
                assert pred.attribution[row, slot] == 0.0
