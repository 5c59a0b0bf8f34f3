"""What travels between the federated server and its sites, on Flower's messages.

Server -> site (a Flower FitIns/EvaluateIns config: scalars only, JSON where a list is due):

    round 1, task "stats":  model   the untrained model config (what windows to build)
    round r, task "fit":    model   the model config (classes, telemetry mean/std) + weights
                            recipe  local_epochs, batch_size, lr, seed, modality_dropout,
                                    augment; dp_epsilon/dp_delta/dp_max_grad_norm; rounds
    evaluate:               model   + the averaged weights

Site -> server (a Flower FitRes/EvaluateRes: parameter arrays, a count, scalar metrics):

    stats:     no arrays; windows (int); count, sum, sumsq: per telemetry metric of its
               training windows (JSON lists of M numbers); labels: {label: windows} (JSON)
    fit:       the model's weights (state_dict order and shapes); training windows; train_loss;
               epsilon and dp_steps (DP only)
    evaluate:  validation windows; loss_sum; cm: the C x C confusion counts (JSON)

Nothing else: no record, frame, audio chunk or telemetry value (tests/test_federated.py
inspects every message the server receives).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.errors import UserError

Scalar = bool | bytes | float | int | str
Config = dict[str, Scalar]

TASK, STATS, FIT = "task", "stats", "fit"


class BadReply(ValueError):
    """A site's reply does not hold what the protocol says; the server leaves it out."""


@dataclass(frozen=True, kw_only=True)
class SiteRecipe:
    """How every site trains in a round: `iotfuse train`'s recipe, set by the server."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    modality_dropout: float = -1.0  # < 0: the model config's default
    augment: bool = True
    rounds: int = 1  # federated averaging rounds in all (DP calibrates its noise to them)
    dp_epsilon: float = 0.0  # 0: no DP
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_fine_tune: bool = False  # the federation starts from a trained model (--init)

    def to_config(self) -> Config:
        return {f"recipe.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Scalar]) -> SiteRecipe:
        fields = {k[len("recipe.") :]: v for k, v in config.items() if k.startswith("recipe.")}
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except TypeError as exc:
            raise UserError(f"the server sent a recipe this site does not know: {exc}") from exc


def stats_config(model: Mapping[str, Any]) -> Config:
    return {TASK: STATS, "model": json.dumps(model)}


def fit_config(model: Mapping[str, Any], recipe: SiteRecipe, server_round: int) -> Config:
    return {TASK: FIT, "model": json.dumps(model), "round": server_round, **recipe.to_config()}


def model_of(config: Mapping[str, Scalar]) -> dict[str, Any]:
    text = config.get("model")
    if not isinstance(text, str):
        raise UserError("the server sent no model config; is it an iotfuse federate server?")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise UserError("the server's model config is not a JSON object")
    return data


def numbers(metrics: Mapping[str, Scalar], key: str, length: int | None = None) -> np.ndarray:
    """The JSON list of finite numbers under `key` (of `length` when given)."""
    try:
        raw = metrics[key]
        values = json.loads(raw) if isinstance(raw, str) else None
        array = np.asarray(values, dtype=np.float64)
    except (KeyError, ValueError, TypeError) as exc:
        raise BadReply(f"{key}: {exc}") from None
    if array.ndim != 1 or not np.isfinite(array).all():
        raise BadReply(f"{key} is not a list of finite numbers")
    if length is not None and array.shape != (length,):
        raise BadReply(f"{key} has {array.shape[0]} values, expected {length}")
    return array


def counts(metrics: Mapping[str, Scalar], key: str) -> dict[str, int]:
    """The JSON object {name: count >= 0} under `key`."""
    try:
        raw = metrics[key]
        data = json.loads(raw) if isinstance(raw, str) else None
    except (KeyError, ValueError) as exc:
        raise BadReply(f"{key}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in data.items()
    ):
        raise BadReply(f"{key} is not an object of counts")
    return data


def matrix(metrics: Mapping[str, Scalar], key: str, n: int) -> np.ndarray:
    """The JSON n x n matrix of counts >= 0 under `key`."""
    try:
        raw = metrics[key]
        array = np.asarray(json.loads(raw) if isinstance(raw, str) else None)
    except (KeyError, ValueError) as exc:
        raise BadReply(f"{key}: {exc}") from None
    if array.shape != (n, n) or array.dtype.kind not in "iu" or (array < 0).any():
        raise BadReply(f"{key} is not a {n} x {n} matrix of counts")
    return array.astype(np.int64)


def state_arrays(model: Any) -> list[np.ndarray]:
    """A model's weights as Flower sends them: its state_dict's tensors, in order."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def load_arrays(model: Any, arrays: list[np.ndarray]) -> None:
    """Set a model's weights from `state_arrays` of a model of the same config."""
    import torch

    state = model.state_dict()
    shapes = [tuple(v.shape) for v in state.values()]
    got = [tuple(a.shape) for a in arrays]
    if got != shapes:
        raise BadReply(f"weights of {len(got)} arrays do not fit the model's {len(shapes)}")
    model.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(a)).to(v.dtype)
            for (k, v), a in zip(state.items(), arrays, strict=True)
        }
    )
