"""`iotfuse federate site`: one site of a federation. Its recordings never leave it.

    run_site(SiteOptions(server="fl.example:9091", data=(Path("site.iotrec"),)), settings)

The site connects to the server (Flower, gRPC; TLS with --tls-ca) and answers its rounds
(protocol.py): the statistics of its training windows, then each round the recipe of
`iotfuse train` (pipeline.learn.training: the same windows, validation split, augmentation
and training loop; DP-SGD when the server or the site asks for it) on the weights it gets,
returning only the new weights; and the confusion counts of those weights on its
validation windows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import pipeline.learn.federated  # noqa: F401  # Flower's telemetry off before flwr loads
from pipeline.errors import UserError
from pipeline.learn.dataset import LabelledWindow
from pipeline.learn.federated.protocol import (
    FIT,
    STATS,
    TASK,
    Config,
    Scalar,
    SiteRecipe,
    load_arrays,
    model_of,
    state_arrays,
)
from pipeline.learn.privacy import DPOptions
from pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SiteOptions:
    server: str  # HOST:PORT
    data: tuple[Path, ...]
    name: str = ""  # "" = this machine's host name
    device: str = "auto"
    tls_ca: Path | None = None  # the CA that signed the server's certificate; None: no TLS
    dp: DPOptions | None = None  # this site's own ceiling: it trains with DP-SGD at most this
    val_fraction: float = 0.2
    val_block_ms: int = 30_000
    connect_s: float = 120.0  # how long to keep trying to reach the server

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("no data: pass this site's recordings with --data")
        if ":" not in self.server:
            raise UserError(f"--server {self.server!r}: give HOST:PORT")

    @property
    def site_name(self) -> str:
        return self.name or socket.gethostname()


class Site:
    """The site's answers to the server (wrapped as a Flower NumPyClient by `client`)."""

    def __init__(self, options: SiteOptions, settings: Settings, stream: TextIO | None = None):
        from pipeline.stream.model_runner import resolve_device

        self.options = options
        self.settings = settings
        self.stream = stream
        self.device = resolve_device(options.device)
        self.windows: dict[Any, tuple[list[LabelledWindow], list[LabelledWindow]]] = {}
        self.dp: Any = None  # fusion.dp.DPSGD, across rounds: its accountant keeps counting
        self.rounds = 0

    # --- data ---------------------------------------------------------------------------

    def split(self, config: Any) -> tuple[list[LabelledWindow], list[LabelledWindow]]:
        """(training, validation) windows for a model config, built once per feature spec."""
        from pipeline.learn.dataset import recording_windows
        from pipeline.learn.training import split_windows
        from pipeline.stream.features import FeatureSpec

        spec = FeatureSpec.from_model_config(config)
        if spec not in self.windows:
            started = time.monotonic()
            per_file = recording_windows(self.options.data, self.settings, spec)
            windows = [w for got in per_file for w in got]
            sources = [i for i, got in enumerate(per_file) for _ in got]
            o = self.options
            self.windows[spec] = split_windows(windows, o.val_fraction, o.val_block_ms, sources)
            train, val = self.windows[spec]
            self.say(
                f"{len(windows)} windows ({len(train)} training, {len(val)} validation) in "
                f"{time.monotonic() - started:.0f} s"
            )
        return self.windows[spec]

    def examples(
        self, windows: list[LabelledWindow], classes: tuple[str, ...], what: str
    ) -> list[tuple[dict[Any, np.ndarray], int]]:
        from pipeline.learn.training import labelled_examples

        known = [w for w in windows if w.label in classes]
        if len(known) < len(windows):
            log.warning(
                "%d %s window(s) have labels the federation's model does not know (%s); "
                "they are left out",
                len(windows) - len(known),
                what,
                sorted({w.label for w in windows} - set(classes)),
            )
        return labelled_examples(known, classes)

    # --- the three tasks ----------------------------------------------------------------

    def fit(
        self, parameters: list[np.ndarray], config: Config
    ) -> tuple[list[np.ndarray], int, Config]:
        from fusion.config import ModelConfig

        model_cfg = ModelConfig.from_dict(model_of(config))
        if config.get(TASK) == STATS:
            return [], *self.stats(model_cfg)
        if config.get(TASK) != FIT:
            raise UserError(f"the server asked for task {config.get(TASK)!r}; update iotfuse")
        return self.train(model_cfg, parameters, SiteRecipe.from_config(config), config)

    def stats(self, model_cfg: Any) -> tuple[int, Config]:
        from pipeline.learn.federated.stats import site_stats

        train, _ = self.split(model_cfg)
        n_metrics = len(model_cfg.telemetry.metrics) if model_cfg.telemetry is not None else 0
        self.say(f"round 0: statistics of {len(train)} training windows sent (no values)")
        return len(train), {"site": self.options.site_name, **site_stats(train, n_metrics)}

    def train(
        self, model_cfg: Any, parameters: list[np.ndarray], recipe: SiteRecipe, config: Config
    ) -> tuple[list[np.ndarray], int, Config]:
        from fusion.model import FusionClassifier
        from fusion.train import TrainConfig
        from fusion.train import train as train_model
        from pipeline.learn import privacy
        from pipeline.learn.training import training_examples

        started = time.monotonic()
        dp_options = self.privacy_for(recipe)
        train_w, val_w = self.split(model_cfg)
        train_data = self.examples(train_w, model_cfg.classes, "training")
        val_data = self.examples(val_w, model_cfg.classes, "validation") or train_data[:1]
        if dp_options is not None and self.dp is None:
            self.dp = privacy.calibrate(
                dp_options,
                len(train_data),
                recipe.batch_size,
                recipe.rounds * recipe.local_epochs,
                recipe.seed,
                fine_tune=recipe.dp_fine_tune,
            )
            self.say(privacy.describe(self.dp, dp_options))
        model = FusionClassifier(model_cfg)
        load_arrays(model, parameters)
        if self.dp is not None:
            note = privacy.dp_layers(model)  # a BatchNorm model (--init's): statistics frozen
            if self.rounds == 0:
                self.say(note)
        fed_round = int(config.get("round", 1)) - 1  # round 1 was the statistics
        seed = recipe.seed * 1000 + fed_round
        cfg = TrainConfig(
            epochs=recipe.local_epochs,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            seed=seed,
            device=str(self.device),
            modality_dropout=None if recipe.modality_dropout < 0 else recipe.modality_dropout,
            keep_best=False,
        )
        examples = training_examples(train_data, model_cfg, recipe.augment, seed)
        result = train_model(
            model, examples, val_data, cfg, recipe=None if self.dp is None else self.dp.recipe
        )
        loss = result.history[-1].train_loss
        metrics: Config = {
            "site": self.options.site_name,
            "train_loss": loss,
        }
        note = ""
        if self.dp is not None and dp_options is not None:
            epsilon = self.dp.epsilon(dp_options.delta)
            metrics |= {
                "epsilon": epsilon,
                "dp_steps": self.dp.steps,
                "noise_multiplier": self.dp.noise_multiplier,
                "sample_rate": self.dp.sample_rate,
            }
            note = f", epsilon spent {epsilon:.3f}"
        self.rounds += 1
        self.say(
            f"round {fed_round}: {recipe.local_epochs} epoch(s) on {len(train_data)} windows, "
            f"loss {loss:.4f}{note} ({time.monotonic() - started:.0f} s); "
            "weights sent"
        )
        return state_arrays(model), len(train_data), metrics

    def evaluate(self, parameters: list[np.ndarray], config: Config) -> tuple[float, int, Config]:
        from fusion.config import ModelConfig
        from fusion.model import FusionClassifier
        from fusion.train import validation_counts

        model_cfg = ModelConfig.from_dict(model_of(config))
        model = FusionClassifier(model_cfg)
        load_arrays(model, parameters)
        model.to(self.device)
        _, val_w = self.split(model_cfg)
        val_data = self.examples(val_w, model_cfg.classes, "validation")
        loss_sum, cm = validation_counts(model, val_data, 64, self.device)
        n = max(len(val_data), 1)
        reply: Config = {"loss_sum": loss_sum, "cm": json.dumps(cm.tolist())}
        return loss_sum / n, len(val_data), reply

    # --- helpers ------------------------------------------------------------------------

    def privacy_for(self, recipe: SiteRecipe) -> DPOptions | None:
        """The DP options this round trains with: the server's, capped by this site's own
        --dp-epsilon. A site that asks for DP trains with it whatever the server asks (a
        BatchNorm model with its statistics frozen: encoders.base.FrozenBatchNorm)."""
        own = self.options.dp
        asked = (
            DPOptions(
                epsilon=recipe.dp_epsilon,
                delta=recipe.dp_delta,
                max_grad_norm=recipe.dp_max_grad_norm,
            )
            if recipe.dp_epsilon > 0
            else None
        )
        if own is None or asked is None:
            return asked or own
        return dataclasses.replace(
            asked, epsilon=min(own.epsilon, asked.epsilon), delta=min(own.delta, asked.delta)
        )

    def say(self, line: str) -> None:
        if self.stream is not None:
            self.stream.write(f"site {self.options.site_name}: {line}\n")
            self.stream.flush()


def client(site: Site) -> Any:
    """The site as a Flower client."""
    from flwr.client import NumPyClient

    class SiteClient(NumPyClient):
        def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
            return []  # the server makes the first weights (round 1)

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Scalar]
        ) -> tuple[list[np.ndarray], int, Config]:
            return site.fit(parameters, config)

        def evaluate(
            self, parameters: list[np.ndarray], config: dict[str, Scalar]
        ) -> tuple[float, int, Config]:
            return site.evaluate(parameters, config)

    return SiteClient().to_client()


def run_site(options: SiteOptions, settings: Settings, stream: TextIO | None = None) -> int:
    """Take part until the server ends the federation; returns the rounds trained."""
    from pipeline.learn.federated.server import quiet_flower

    quiet_flower(settings)  # before flwr loads: its imports log
    from flwr.client import start_client

    missing = [str(p) for p in options.data if not p.is_file()]
    if missing:
        raise UserError(f"--data: no such recording(s) {missing}")
    ca = None
    if options.tls_ca is not None:
        try:
            ca = options.tls_ca.read_bytes()
        except OSError as exc:
            raise UserError(f"--tls-ca {options.tls_ca}: {exc}") from exc
    site = Site(options, settings, stream)
    site.say(f"joining {options.server} ({'TLS' if ca is not None else 'no TLS'})")
    start_client(
        server_address=options.server,
        client=client(site),
        root_certificates=ca,
        insecure=ca is None,
        max_wait_time=options.connect_s,
    )
    if site.rounds == 0 and not site.windows:
        raise UserError(
            f"could not take part in a federation at {options.server} within "
            f"{options.connect_s:.0f} s: is the server running there"
            + (" with TLS (--tls-cert/--tls-key) and this CA?" if ca is not None else "?")
        )
    return site.rounds
