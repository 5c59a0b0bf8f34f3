"""The DP recipe of `iotfuse train --dp-epsilon E` and of the federated sites: DP-SGD
(fusion.dp, on Opacus) calibrated to a privacy budget.

    dp = calibrate(DPOptions(epsilon=8.0, delta=1e-5), n_train=2880, batch_size=32, epochs=30)
    fusion.train.train(..., recipe=dp.recipe)
    config = with_privacy(config, DPOptions(...), dp)      # what was spent, in the model

What changes against the plain recipe, and why:
- the CNN trunks use GroupNorm instead of BatchNorm (`dp_architecture`): BatchNorm
  normalises each window with statistics of the whole batch, so one window's gradient
  depends on the others and per-window clipping bounds nothing;
- each step is a Poisson sample of the training windows, 256 on average (a quarter of them
  on fewer than 1024: `dp_batch_size`) instead of the plain recipe's 32, each window's
  gradient is clipped to `max_grad_norm` and Gaussian noise is added;
- the step is AdamW's at lr 1e-2, without weight decay (fusion.dp.DPUpdate), not the plain
  recipe's (`--lr`). The noise on a step's summed gradient has the same size on each of the
  model's ~150k weights, its norm ~390x the clipping norm at noise multiplier 1, against at
  most one clipping norm a window: on 32-window steps it drowned the gradient and DP-SGD
  learnt nothing (docs/federated.md, Differential privacy, has what was tried);
- the noise multiplier is the smallest that keeps (epsilon, delta) after every step of the
  run (Opacus's get_noise_multiplier, RDP accountant); the spent epsilon is recorded in the
  model config (`privacy`) and so in every evaluation's metrics.json.

What the guarantee covers: the model weights, with respect to each training window. Not
covered (they are computed without noise, as in any DP-SGD recipe that does not say
otherwise): the telemetry normalisation statistics (per-metric mean/std, from counts, sums
and sums of squares of the training windows) and the scores on the validation windows.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import UserError

GROUP_NORM_NOTE = (
    "dp: the CNN trunks use GroupNorm instead of BatchNorm (BatchNorm mixes the windows of "
    "a batch, so DP-SGD could not bound each window's influence)"
)
FROZEN_NORM_NOTE = (
    "dp: the CNN trunks' BatchNorm statistics stay --init's model's (frozen; BatchNorm over "
    "a batch would mix the windows, so DP-SGD could not bound each window's influence); "
    "their scale and shift train"
)


@dataclass(frozen=True, kw_only=True)
class DPOptions:
    epsilon: float  # target: (epsilon, delta)-DP after the whole run
    delta: float = 1e-5  # keep it below 1 / training windows
    max_grad_norm: float = 1.0  # each window's gradient is clipped to this L2 norm
    expected_batch: int | None = None  # windows a step, on average; None: dp_batch_size(n)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise UserError(f"--dp-epsilon must be a number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise UserError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise UserError(f"--dp-max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.expected_batch is not None and self.expected_batch < 1:
            raise UserError(
                f"the DP batch must be >= 1 window, got {self.expected_batch}; leave it unset "
                "for the default"
            )


def dp_architecture(config: Any) -> Any:
    """The model config with GroupNorm in every CNN block (fusion ModelConfig)."""
    return dataclasses.replace(config, conv_norm="group")


def dp_layers(model: Any) -> str:
    """Make a model DP-SGD can train, in place, and say how: a new model is built with
    GroupNorm (`dp_architecture`); a trained one with BatchNorm (--init) keeps its
    statistics frozen (encoders.base.freeze_batchnorm). The saved model has BatchNorm
    again, with those statistics."""
    from encoders.base import freeze_batchnorm

    return FROZEN_NORM_NOTE if freeze_batchnorm(model) else GROUP_NORM_NOTE


DP_BATCH = 256  # windows a DP-SGD step takes on average, at most
DP_MIN_STEPS = 4  # Poisson steps an epoch, at least (the batch is smaller on little data)


def dp_batch_size(n_train: int) -> int:
    """The expected batch of a DP-SGD step: DP_BATCH windows, but no more than
    1 / DP_MIN_STEPS of the training windows."""
    return max(1, min(DP_BATCH, n_train // DP_MIN_STEPS))


def sample_rate(batch_size: int, n_train: int) -> float:
    return min(1.0, batch_size / max(n_train, 1))


DP_FINE_TUNE_LR = 5e-4  # AdamW's learning rate under DP-SGD from a trained model (--init)


def calibrate(
    options: DPOptions,
    n_train: int,
    batch_size: int,
    epochs: int,
    seed: int = 0,
    fine_tune: bool = False,
) -> Any:
    """A fusion.dp.DPSGD whose noise spends the budget over `epochs` passes (of 1 / rate
    Poisson steps each) over `n_train` windows. Each step samples `options.expected_batch`
    windows on average (default `dp_batch_size`); `batch_size` (the plain recipe's
    --batch-size) is how many of them go through the model at once (memory only).
    `fine_tune` (training starts from a trained model): AdamW at DP_FINE_TUNE_LR instead of
    fusion.dp.DPUpdate's 1e-2 for new weights, which moved a good model away from what it
    knew (docs/federated.md, Differential privacy)."""
    from opacus.accountants.utils import get_noise_multiplier

    from fusion.dp import DPSGD, DPUpdate

    expected = options.expected_batch or dp_batch_size(n_train)
    rate = sample_rate(expected, n_train)
    steps = epochs * int(1 / rate)
    try:
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha": the bound could be tighter, not looser
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=options.epsilon,
                target_delta=options.delta,
                sample_rate=rate,
                steps=steps,
                accountant="rdp",
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise UserError(
            f"--dp-epsilon {options.epsilon}: {exc} for {steps} steps at sampling rate "
            f"{rate:.3g}; allow a larger epsilon, or train fewer epochs"
        ) from exc
    return DPSGD(
        noise_multiplier=float(sigma),
        max_grad_norm=options.max_grad_norm,
        sample_rate=rate,
        seed=seed,
        physical_batch=max(1, batch_size),
        update=DPUpdate(lr=DP_FINE_TUNE_LR) if fine_tune else DPUpdate(),
    )


def delta_warning(options: DPOptions, n_train: int) -> str | None:
    """A line to show when delta is not below 1 / training windows (the usual rule)."""
    if options.delta * n_train < 1:
        return None
    return (
        f"dp: --dp-delta {options.delta:g} is not below 1/{n_train} (1 / training windows); "
        "a smaller delta is the usual choice"
    )


def privacy_record(
    options: DPOptions,
    dp: Any,
    scope: Literal["central", "per-site"] = "central",
    init_version: str = "",
) -> Any:
    """What was spent, as the model config's `privacy` section (fusion PrivacyConfig)."""
    from fusion.config import PrivacyConfig

    return PrivacyConfig(
        epsilon=dp.epsilon(options.delta),
        delta=options.delta,
        target_epsilon=options.epsilon,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=dp.sample_rate,
        steps=dp.steps,
        scope=scope,
        init_version=init_version,
    )


def describe(dp: Any, options: DPOptions) -> str:
    return (
        f"dp: DP-SGD to epsilon {options.epsilon:g} at delta {options.delta:g}: noise "
        f"multiplier {dp.noise_multiplier:.3f}, per-window clipping at "
        f"{dp.max_grad_norm:g}, sampling rate {dp.sample_rate:.4f} ({int(1 / dp.sample_rate)} "
        f"steps an epoch); {dp.update.describe()} (--lr does not apply)"
    )
