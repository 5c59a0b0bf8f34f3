"""The federated rounds (`Federation`): what each round asks of the sites and what the
server makes of their replies, given to Flower as a FedAvg strategy.

Round 1 (stats): the untrained model config goes out; the sites' statistics come back and
become the model's classes and telemetry mean/std; the server makes the first weights (or
takes --init's). Rounds 2..N+1: the model config and weights go out with the recipe; the
sites' weights come back and are averaged, weighted by training windows (FedAvg); the
average goes out for scoring and the sites' confusion counts come back; their sum scores
the round, and the best round is written as the model directory.

A reply that does not hold what protocol.py says is left out with a warning; a round that
leaves nothing usable stops the federation with that reason (`error`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import pipeline.learn.federated  # noqa: F401  # Flower's telemetry off before flwr loads
from pipeline.errors import UserError
from pipeline.learn.federated.protocol import (
    BadReply,
    SiteRecipe,
    fit_config,
    matrix,
    stats_config,
)
from pipeline.learn.privacy import DPOptions
from pipeline.learn.training import DEFAULT_METRICS, TrainOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    rounds: int
    min_sites: int
    out: Path
    init: Path | None = None  # start from this model (its classes and normalisation)
    address: str = "0.0.0.0:9091"
    modalities: tuple[Any, ...] = ()  # () = all three
    metrics: tuple[str, ...] = DEFAULT_METRICS
    window_ms: int = 2000
    name: str = ""
    recipe: SiteRecipe = field(default_factory=SiteRecipe)
    dp: DPOptions | None = None  # every site trains with DP-SGD to this budget
    conv_norm: str = "batch"  # the CNN trunks' norm of a new model (DP-SGD: always group)
    tls: tuple[Path, Path, Path] | None = None  # CA, server certificate, server key (PEM)
    round_timeout_s: float | None = None  # a site slower than this is left out of a round
    wait_s: float = 600.0  # how long a round waits for --min-sites sites to be connected
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_sites < 1:
            raise UserError("--rounds and --min-sites must be >= 1")

    def architecture(self) -> TrainOptions:
        """The architecture options as `iotfuse train` takes them (model_config reads them;
        the data stay at the sites)."""
        kw: dict[str, Any] = {"modalities": self.modalities} if self.modalities else {}
        return TrainOptions(
            data=(Path("at-the-sites"),),
            out=self.out,
            metrics=self.metrics,
            window_ms=self.window_ms,
            name=self.name or "federated",
            overwrite=self.overwrite,
            **kw,
        )


@dataclass(frozen=True)
class RoundResult:
    round: int  # 1-based federated averaging round
    sites: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    epsilon: float | None  # the most any site has spent so far (DP only)
    seconds: float


def choose_classes(labels: dict[str, int]) -> tuple[str, ...]:
    from pipeline.simulate import CLASSES

    return tuple(CLASSES) if set(labels) <= set(CLASSES) else tuple(sorted(labels))


def number(metrics: dict[str, Any], key: str, default: float) -> float:
    """A site's scalar metric as a finite float (`default` when absent or not a number)."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return float(value)


def weighted_average(results: Sequence[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg: the arrays averaged weighted by training windows, in float64, each back in
    its own dtype (integer buffers rounded)."""
    total = sum(n for _, n in results)
    out = []
    for i, first in enumerate(results[0][0]):
        acc = sum(np.asarray(arrays[i], dtype=np.float64) * (n / total) for arrays, n in results)
        acc = np.asarray(acc)
        out.append(
            acc.round().astype(first.dtype) if first.dtype.kind in "iu" else acc.astype(first.dtype)
        )
    return out


class Federation:
    """The federated rounds: what each round asks of the sites and what the server makes of
    their replies. `strategy()` gives it to Flower as a FedAvg subclass."""

    def __init__(self, options: ServerOptions, stream: TextIO | None):
        from pipeline.learn.training import model_config

        self.options = options
        self.stream = stream
        if options.init is not None:  # its architecture, metrics and windows
            from fusion.modelfile import load_model

            self.untrained = load_model(options.init).config
        else:
            self.untrained = model_config(options.architecture(), ("a", "b"))
        self.config: Any = None  # the ModelConfig once round 1 is done
        self.current: list[np.ndarray] = []
        self.best: list[np.ndarray] = []
        self.best_round, self.best_f1 = 0, -math.inf
        self.version = ""
        self.error: str | None = None
        self.history: list[RoundResult] = []
        self.sites: list[str] = []
        self.labels: dict[str, int] = {}
        self.site_labels: dict[str, dict[str, int]] = {}  # each site's class mix
        self.privacy: Any = None
        self.init_version = ""  # --init's model's version (recorded with a DP budget)
        self.round_loss: float = math.nan
        self.started = time.monotonic()

    # --- round 1: statistics, first weights -------------------------------------------------

    def first_weights(self, replies: list[dict[str, Any]]) -> list[np.ndarray]:
        import dataclasses

        import torch

        from fusion.model import FusionClassifier
        from fusion.modelfile import load_model
        from pipeline.learn.federated.protocol import state_arrays
        from pipeline.learn.federated.stats import combine

        tel = self.untrained.telemetry
        good = []
        for reply in replies:
            try:
                one = combine([reply], len(tel.metrics) if tel is not None else 0)
                self.site_labels[str(reply.get("site", "?"))] = one.labels
                good.append(reply)
            except BadReply as exc:
                log.warning(
                    "site %s sent statistics that do not fit (%s); left out", reply.get("site"), exc
                )
        if not good:
            raise UserError("no site sent usable statistics")
        combined = combine(good, len(tel.metrics) if tel is not None else 0)
        self.sites = sorted(str(r.get("site", "?")) for r in good)
        self.labels = combined.labels
        if self.options.init is not None:
            loaded = load_model(self.options.init)
            unknown = sorted(set(combined.labels) - set(loaded.config.classes))
            if unknown:
                raise UserError(
                    f"the sites have labels {unknown} that --init's model does not know"
                )
            # what DP spent on --init's model does not describe this federation
            self.config = dataclasses.replace(
                loaded.config, privacy=None, name=self.options.name or loaded.config.name
            )
            self.init_version = loaded.version
            model = loaded.model
        else:
            from pipeline.learn.training import model_config

            config = model_config(self.options.architecture(), choose_classes(combined.labels))
            if config.telemetry is not None:
                telemetry = dataclasses.replace(
                    config.telemetry, mean=combined.mean, std=combined.std
                )
                config = dataclasses.replace(config, telemetry=telemetry)
            if self.options.dp is not None or self.options.conv_norm == "group":
                from pipeline.learn.privacy import dp_architecture

                config = dp_architecture(config)  # GroupNorm
            torch.manual_seed(self.options.recipe.seed)
            model = FusionClassifier(config)
            self.config = model.config
        self.say(
            f"round 0: {len(good)} site(s) {self.sites}: {combined.windows} training windows, "
            f"classes {list(self.config.classes)}, labels {combined.labels}"
        )
        return state_arrays(model)

    # --- rounds 2..: averaging, scoring ---------------------------------------------------

    def average(
        self, replies: list[tuple[list[np.ndarray], int, dict[str, Any]]]
    ) -> list[np.ndarray]:
        shapes = [a.shape for a in self.current]
        good = [
            (arrays, n, m)
            for arrays, n, m in replies
            if [a.shape for a in arrays] == shapes
            and n > 0
            and all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")
        ]
        if len(good) < len(replies):
            log.warning(
                "%d site(s) sent weights that do not fit the model (shapes, or values not "
                "finite); left out",
                len(replies) - len(good),
            )
        if not good:
            raise UserError("no site sent usable weights")
        losses = [(number(m, "train_loss", math.nan), n) for _, n, m in good]
        losses = [(loss, n) for loss, n in losses if math.isfinite(loss)]
        windows = sum(n for _, n in losses)
        self.round_loss = sum(x * n for x, n in losses) / windows if windows else math.nan
        spent = [m for _, _, m in good if number(m, "epsilon", -1.0) >= 0]
        if spent and self.options.dp is not None:
            from fusion.config import PrivacyConfig

            worst = max(spent, key=lambda m: number(m, "epsilon", 0.0))
            self.privacy = PrivacyConfig(
                epsilon=number(worst, "epsilon", 0.0),
                delta=self.options.dp.delta,
                target_epsilon=self.options.dp.epsilon,
                noise_multiplier=max(0.0, number(worst, "noise_multiplier", 0.0)),
                max_grad_norm=self.options.dp.max_grad_norm,
                sample_rate=number(worst, "sample_rate", 0.0),
                steps=int(number(worst, "dp_steps", 0.0)),
                scope="per-site",
                init_version=self.init_version,
            )
        return weighted_average([(a, n) for a, n, _ in good])

    def score(self, server_round: int, replies: list[tuple[int, dict[str, Any]]]) -> float:
        from fusion.metrics import classification_report

        n = len(self.config.classes)
        cm = np.zeros((n, n), dtype=np.int64)
        loss_sum, used = 0.0, 0
        for _, metrics in replies:
            try:
                cm += matrix(metrics, "cm", n)
                loss_sum += number(metrics, "loss_sum", 0.0)
                used += 1
            except BadReply as exc:
                log.warning("a site sent validation counts that do not fit (%s); left out", exc)
        report = classification_report(cm, self.config.classes)
        fed_round = server_round - 1
        result = RoundResult(
            round=fed_round,
            sites=used,
            train_loss=self.round_loss,
            val_loss=loss_sum / max(int(cm.sum()), 1),
            val_accuracy=report["accuracy"],
            val_macro_f1=report["macro_f1"],
            epsilon=None if self.privacy is None else self.privacy.epsilon,
            seconds=time.monotonic() - self.started,
        )
        self.history.append(result)
        best = result.val_macro_f1 > self.best_f1
        if best:
            self.best_round, self.best_f1 = fed_round, result.val_macro_f1
            self.best = self.current
            self.save()
        eps = "" if result.epsilon is None else f" | epsilon {result.epsilon:.3f}"
        self.say(
            f"round {fed_round:>3}/{self.options.rounds}: {used} site(s), loss "
            f"{result.train_loss:.4f} | val loss {result.val_loss:.4f} acc "
            f"{result.val_accuracy:.3f} macro-F1 {result.val_macro_f1:.3f}"
            f"{' *' if best else '  '}{eps} | at {result.seconds:.0f} s"
        )
        return result.val_loss

    def save(self) -> None:
        """Write the best round's weights (a checkpoint, like train's best epoch)."""
        import dataclasses

        from fusion.model import FusionClassifier
        from fusion.modelfile import save_model
        from pipeline.learn.federated.protocol import load_arrays

        config = (
            self.config
            if self.privacy is None
            else dataclasses.replace(self.config, privacy=self.privacy)
        )
        model = FusionClassifier(config)
        load_arrays(model, self.best)
        self.version = save_model(model, self.options.out)

    def say(self, line: str) -> None:
        if self.stream is not None:
            self.stream.write(f"federate: {line}\n")
            self.stream.flush()

    # --- Flower ---------------------------------------------------------------------------

    def recipe(self) -> SiteRecipe:
        import dataclasses

        r = dataclasses.replace(self.options.recipe, rounds=self.options.rounds)
        dp = self.options.dp
        if dp is None:
            return r
        return dataclasses.replace(
            r,
            dp_epsilon=dp.epsilon,
            dp_delta=dp.delta,
            dp_max_grad_norm=dp.max_grad_norm,
            dp_fine_tune=self.options.init is not None,
        )

    def strategy(self) -> Any:
        from flwr.common import (
            EvaluateIns,
            FitIns,
            Parameters,
            ndarrays_to_parameters,
            parameters_to_ndarrays,
        )
        from flwr.server.strategy import FedAvg

        fed = self
        k = self.options.min_sites

        class Strategy(FedAvg):
            def initialize_parameters(self, client_manager: Any) -> Any:
                return Parameters(tensors=[], tensor_type="numpy.ndarray")  # made in round 1

            def evaluate(self, server_round: int, parameters: Any) -> Any:
                return None  # the server holds no data: scores come from the sites

            def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
                if fed.error is not None:
                    return []
                size, least = self.num_fit_clients(client_manager.num_available())
                clients = client_manager.sample(num_clients=size, min_num_clients=least)
                if server_round == 1:
                    ins = FitIns(parameters, stats_config(fed.untrained.to_dict()))
                else:
                    ins = FitIns(
                        parameters, fit_config(fed.config.to_dict(), fed.recipe(), server_round)
                    )
                return [(c, ins) for c in clients]

            def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
                if fed.error is not None:
                    return None, {}
                try:
                    if server_round == 1:
                        fed.current = fed.first_weights([dict(r.metrics) for _, r in results])
                    else:
                        replies = [
                            (parameters_to_ndarrays(r.parameters), r.num_examples, dict(r.metrics))
                            for _, r in sorted(
                                results, key=lambda cr: str(cr[1].metrics.get("site"))
                            )
                        ]
                        fed.current = fed.average(replies)
                except UserError as exc:
                    what = "statistics" if server_round == 1 else f"round {server_round - 1}"
                    fed.error = f"{what}: {exc}" + (
                        f" ({len(failures)} site(s) failed: see their output)" if failures else ""
                    )
                    return None, {}
                return ndarrays_to_parameters(fed.current), {}

            def configure_evaluate(
                self, server_round: int, parameters: Any, client_manager: Any
            ) -> Any:
                if fed.error is not None or server_round == 1:
                    return []
                size, least = self.num_evaluation_clients(client_manager.num_available())
                clients = client_manager.sample(num_clients=size, min_num_clients=least)
                ins = EvaluateIns(parameters, {"model": json.dumps(fed.config.to_dict())})
                return [(c, ins) for c in clients]

            def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
                if fed.error is not None or not results:
                    return None, {}
                replies = [(r.num_examples, dict(r.metrics)) for _, r in results]
                return fed.score(server_round, replies), {}

        return Strategy(
            min_fit_clients=k,
            min_evaluate_clients=k,
            min_available_clients=k,
            accept_failures=True,
        )
