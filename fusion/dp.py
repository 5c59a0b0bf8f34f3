"""DP-SGD for the fusion model: per-example gradients by torch.func, clipping, noise and
accounting by Opacus.

    dp = DPSGD(noise_multiplier=1.3, max_grad_norm=1.0, sample_rate=256 / len(train))
    fusion.train.train(model, train, val, cfg, recipe=dp.recipe)
    dp.epsilon(delta=1e-5)   # spent so far, by Opacus's RDP accountant

Each step takes a Poisson sample of the training examples (Opacus's
UniformWithReplacementSampler: each example independently with probability `sample_rate`),
computes every example's own gradient (`physical_batch` windows at a time), and hands them
to Opacus's DPOptimizer, which clips each to `max_grad_norm`, sums them, adds Gaussian noise
of std `noise_multiplier * max_grad_norm`, divides by the expected batch size and steps
AdamW (`DPUpdate`: DP-SGD's own learning rate, not the plain recipe's). The accountant
counts every sampled step.

Why per-example gradients come from torch.func and not from Opacus's GradSampleModule: the
hooks of GradSampleModule take the leading dimension of each layer's input as the example
dimension, but here the camera CNN sees n*T frames, a trunk sees only the n_m windows that
have its modality, and the CLS token and modality embeddings are parameters of no layer.
`vmap(grad(loss of one window))` gives exact per-window gradients of the whole model instead.
For that every modality runs on every window of the batch (zeros where absent, multiplied
by the presence mask, which the attention mask ignores anyway), and the model needs
`conv_norm="group"`: BatchNorm mixes the examples of a batch (see encoders.base.use_group_norm).

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fusion.batch import WindowBatch
from fusion.model import FusionClassifier
from fusion.train import TrainConfig, TrainStep, drop_modalities


class DPIncompatible(ValueError):
    """The model has a layer DP-SGD cannot train. The message says what to change."""


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse layers whose output for one example depends on the others (BatchNorm)."""
    found = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
    )
    if found:
        raise DPIncompatible(
            f"the model has {found}: its statistics mix the examples of a batch, which "
            'DP-SGD cannot bound; build it with conv_norm="group" (GroupNorm)'
        )


class DenseForward(nn.Module):
    """The training forward of windows whose every modality was preprocessed for every row
    (zeros where absent): (inputs {m: [B, ...]}, present [B, M]) -> logits [B, C]. Under
    vmap B is 1 and each window is its own computation."""

    def __init__(self, model: FusionClassifier):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Tensor:
        model = self.model
        slots = []
        for i, m in enumerate(model.modalities):
            x = inputs.get(m.value)
            if x is None:  # no window of the batch has it
                slots.append(present.new_zeros(present.shape[0], model.config.fusion.dim).float())
                continue
            x = model.trunks[m.value](x)  # [B, ...] -> [B, E]
            x = model.postprocess[m.value](model.heads[m.value](x))  # [B, E] -> [B, D]
            slots.append(x * present[:, i : i + 1].to(x.dtype))  # absent -> 0, [B, D]
        tokens = torch.stack(slots, dim=1)  # M x [B, D] -> [B, M, D]
        logits: Tensor = model.fuse(tokens, present)  # [B, M, D] -> [B, C]
        return logits


def dense_inputs(model: FusionClassifier, batch: WindowBatch) -> dict[str, Tensor]:
    """Every modality some window of the batch has, preprocessed for all B rows (parameter
    free, so outside the per-example gradients): {m: [B, ...]}, zeros where absent."""
    out: dict[str, Tensor] = {}
    for m in model.modalities:
        if m not in batch.raw or batch.raw[m].shape[0] == 0:
            continue
        x = model.preprocess[m](batch.raw[m], batch.info)  # [n_m, ...]
        dense = x.new_zeros((batch.size, *x.shape[1:]))  # [B, ...]
        out[m.value] = dense.index_copy(0, batch.rows[m].to(x.device), x)  # [n_m,...] -> [B,...]
    return out


def per_example_grads(
    dense: DenseForward, inputs: dict[str, Tensor], present: Tensor, y: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """({parameter name: [B, *shape]} gradient of each window's own loss, losses [B])."""
    params = {k: p.detach() for k, p in dense.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in dense.named_parameters() if not p.requires_grad}
    buffers = {k: b.detach() for k, b in dense.named_buffers()}

    def loss_one(
        p: dict[str, Tensor], x: dict[str, Tensor], mask: Tensor, label: Tensor
    ) -> tuple[Tensor, Tensor]:
        one = {k: v.unsqueeze(0) for k, v in x.items()}  # [...] -> [1, ...]
        state = {**p, **frozen, **buffers}
        logits = functional_call(dense, state, (one, mask.unsqueeze(0)))  # [1, C]
        loss = F.cross_entropy(logits, label.unsqueeze(0))  # [1, C], [1] -> scalar
        return loss, loss.detach()

    with warnings.catch_warnings():
        # vmap runs attention's fused CPU kernel window by window (correct, a little slower:
        # there are only 1+M tokens); torch would warn about it at every step
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        grads, losses = vmap(
            grad(loss_one, has_aux=True), in_dims=(None, 0, 0, 0), randomness="different"
        )(params, inputs, present, y)
    return grads, losses


@dataclass(frozen=True, kw_only=True)
class DPUpdate:
    """How each step's noisy mean of clipped per-window gradients moves the weights: AdamW
    at 10x the plain recipe's learning rate, without weight decay.

    Every step's gradient carries Gaussian noise of one size on every weight, and AdamW
    divides each weight's step by its gradient's running scale, which that noise sets: a
    step moves each weight by about lr whatever the noise, the signal getting through in
    proportion to its share. At the noise of a 256-window step at epsilon 8, lr 1e-2 learnt
    as far as SGD with momentum 0.9 at its best learning rate (0.2 per unit of clipping
    norm); 1e-3, 3e-3, 5e-3 and 2e-2 learnt less (docs/federated.md, Differential privacy).
    The plain recipe's 1e-3 on 32-window steps, where the noise is 8x larger against the
    gradient, learnt nothing."""

    lr: float = 1e-2
    weight_decay: float = 0.0  # on matrices and kernels only, as the plain recipe's

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )

    def describe(self) -> str:
        return f"AdamW at lr {self.lr:g}" + (
            f", weight decay {self.weight_decay:g}" if self.weight_decay else ""
        )

    def build(self, model: nn.Module) -> torch.optim.AdamW:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.lr)


@dataclass(kw_only=True)
class DPSGD:
    """The DP-SGD settings of one training run (or of one federated site, across all its
    rounds: the accountant keeps counting)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson sampling rate of a step
    seed: int = 0  # the noise generator's seed
    update: DPUpdate = field(default_factory=DPUpdate)
    physical_batch: int = 64  # windows per per-window-gradient pass (memory only)
    accountant: Any = None  # opacus RDPAccountant; None: a new one
    noise: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        from opacus.accountants import RDPAccountant

        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.physical_batch < 1:
            raise ValueError(f"physical_batch must be >= 1, got {self.physical_batch}")
        if self.accountant is None:
            self.accountant = RDPAccountant()
        self.noise = torch.Generator().manual_seed(self.seed)

    @property
    def steps(self) -> int:
        return int(sum(n for _, _, n in self.accountant.history))

    def epsilon(self, delta: float) -> float:
        """Spent so far (0 before the first step): an upper bound, by the RDP accountant."""
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha": the bound could be tighter, not looser
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(self.accountant.get_epsilon(delta))

    def recipe(
        self, step_module: TrainStep, optimizer: torch.optim.Optimizer, cfg: TrainConfig, n: int
    ) -> DPRecipe:
        """A fusion.train.RecipeFactory. The plain recipe's optimizer (and so cfg.lr and
        cfg.weight_decay) is not used: the update is `self.update`'s."""
        return DPRecipe(self, step_module, n)


class DPRecipe:
    """Poisson-sampled batches; a step of per-example gradients through Opacus's DPOptimizer."""

    def __init__(self, dp: DPSGD, step_module: TrainStep, n: int):
        from opacus.optimizers import DPOptimizer

        check_dp_compatible(step_module.model)
        self.dp = dp
        self.module = step_module
        self.dense = DenseForward(step_module.model)
        self.optimizer = DPOptimizer(
            dp.update.build(step_module.model),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(dp.sample_rate * n)),
            generator=dp.noise,
        )
        # sampled steps with no window, taken as steps of noise alone in their place: how
        # many come before each step of this epoch's, after its last, and carried over from
        # an epoch with no window at all
        self.empty_before: list[int] = []
        self.empty_after = 0
        self.empty_carried = 0
        self.taken = 0  # steps taken in this epoch

    def batches(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """Opacus's Poisson sampler: 1/sample_rate steps, each example in each step with
        probability sample_rate, every one counted by the accountant here. A step that
        sampled no window (chance (1 - q)^n) is still taken, in its place, as a step of
        noise alone: the accountant's analysis is of every sampled step releasing its noisy
        sum, an empty one too (the training loop has no empty batches, so `step` takes it
        with the step before or after it)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.dp.sample_rate, generator=generator
        )
        steps = [list(b) for b in sampler]
        for _ in steps:
            self.dp.accountant.step(
                noise_multiplier=self.dp.noise_multiplier, sample_rate=self.dp.sample_rate
            )
        self.empty_before, empty = [], self.empty_carried
        for s in steps:
            if s:
                self.empty_before.append(empty)
                empty = 0
            else:
                empty += 1
        self.empty_after = empty if self.empty_before else 0
        self.empty_carried = 0 if self.empty_before else empty
        self.taken = 0
        return [s for s in steps if s]

    def step(self, batch: WindowBatch, y: Tensor) -> float:
        plan = self.empty_before
        for _ in range(plan[self.taken] if self.taken < len(plan) else 0):
            self._noise_only_step()
        self.taken += 1
        last = self.taken == len(plan)
        model = self.module.model
        with torch.no_grad():
            inputs = dense_inputs(model, batch)  # {m: [B, ...]}
            _, present = _presence(model, batch)  # [B, M]
            present = drop_modalities(present, self.module.p_drop, self.module.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        size = self.dp.physical_batch
        for start in range(0, batch.size, size):
            rows = slice(start, start + size)
            chunk = {m: x[rows] for m, x in inputs.items()}  # {m: [b, ...]}
            grads, loss = per_example_grads(self.dense, chunk, present[rows], y[rows])
            for name, p in self.dense.named_parameters():
                if p.requires_grad:
                    p.grad_sample = grads[name]  # type: ignore[attr-defined]  # [b, *p.shape]
            # clip and sum this chunk; the step (noise, update) comes with the last one
            self.optimizer.signal_skip_step(do_skip=start + size < batch.size)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
        for _ in range(self.empty_after if last else 0):
            self._noise_only_step()
        return float(torch.cat(losses).mean().item())

    def _noise_only_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.dense.parameters():
            if p.requires_grad:
                p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _presence(model: FusionClassifier, batch: WindowBatch) -> tuple[int, Tensor]:
    """(B, present [B, M] bool) of a batch, in the model's slot order."""
    device = model.cls_token.device
    present = torch.zeros(batch.size, len(model.modalities), dtype=torch.bool, device=device)
    for i, m in enumerate(model.modalities):
        if m in batch.raw and batch.raw[m].shape[0] > 0:
            present[batch.rows[m].to(device), i] = True
    return batch.size, present
