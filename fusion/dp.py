"""DP-SGD for the fusion model: per-example gradients by torch.func, clipping, noise and
accounting by Opacus.

    dp = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=32 / len(train))
    fusion.train.train(model, train, val, cfg, recipe=dp.recipe)
    dp.epsilon(delta=1e-5)   # spent so far, by Opacus's RDP accountant

Each step takes a Poisson sample of the training examples (Opacus's
UniformWithReplacementSampler: each example independently with probability `sample_rate`),
computes every example's own gradient, and hands them to Opacus's DPOptimizer, which clips
each to `max_grad_norm`, sums them, adds Gaussian noise of std `noise_multiplier *
max_grad_norm`, divides by the expected batch size and steps the wrapped AdamW. The
accountant counts every step.

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


@dataclass(kw_only=True)
class DPSGD:
    """The DP-SGD settings of one training run (or of one federated site, across all its
    rounds: the accountant keeps counting)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson sampling rate of a step
    seed: int = 0  # the noise generator's seed
    accountant: Any = None  # opacus RDPAccountant; None: a new one
    noise: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        from opacus.accountants import RDPAccountant

        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
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
        """A fusion.train.RecipeFactory."""
        return DPRecipe(self, step_module, optimizer, n)


class DPRecipe:
    """Poisson-sampled batches; a step of per-example gradients through Opacus's DPOptimizer."""

    def __init__(self, dp: DPSGD, step_module: TrainStep, optimizer: torch.optim.Optimizer, n: int):
        from opacus.optimizers import DPOptimizer

        check_dp_compatible(step_module.model)
        self.dp = dp
        self.module = step_module
        self.dense = DenseForward(step_module.model)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(dp.sample_rate * n)),
            generator=dp.noise,
        )
        self.optimizer.attach_step_hook(
            lambda _opt: dp.accountant.step(
                noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate
            )
        )

    def batches(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """Opacus's Poisson sampler: 1/sample_rate steps, each example in each step with
        probability sample_rate. An empty step (chance (1 - q)^n, ~e^-32 at the default
        batch size) is left out."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.dp.sample_rate, generator=generator
        )
        return [list(b) for b in sampler if len(b) > 0]

    def step(self, batch: WindowBatch, y: Tensor) -> float:
        model = self.module.model
        with torch.no_grad():
            inputs = dense_inputs(model, batch)  # {m: [B, ...]}
            _, present = _presence(model, batch)  # [B, M]
            present = drop_modalities(present, self.module.p_drop, self.module.generator)
        grads, losses = per_example_grads(self.dense, inputs, present, y)
        self.optimizer.zero_grad(set_to_none=True)
        for name, p in self.dense.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]  # type: ignore[attr-defined]  # [B, *p.shape]
        self.optimizer.step()
        return float(losses.mean().item())


def _presence(model: FusionClassifier, batch: WindowBatch) -> tuple[int, Tensor]:
    """(B, present [B, M] bool) of a batch, in the model's slot order."""
    device = model.cls_token.device
    present = torch.zeros(batch.size, len(model.modalities), dtype=torch.bool, device=device)
    for i, m in enumerate(model.modalities):
        if m in batch.raw and batch.raw[m].shape[0] > 0:
            present[batch.rows[m].to(device), i] = True
    return batch.size, present
