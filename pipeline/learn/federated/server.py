"""`iotfuse federate server`: federated averaging over sites that keep their recordings.

    summary = run_server(ServerOptions(rounds=10, min_sites=4, out=Path("model")), settings)

A Flower server (gRPC; TLS with --tls-ca/--tls-cert/--tls-key) runs `rounds + 1` rounds
with the `Federation` strategy (FedAvg's sampling, our aggregation): round 1 gathers the
statistics and makes the first weights (or takes them from --init), each later round
averages the sites' weights (weighted by their training windows) and scores the average
on the sites' validation windows. Like `iotfuse train`, the model directory is rewritten
each time the validation macro-F1 improves, so it ends holding the best round.

Why Flower's gRPC server (`start_server`/`start_client`) and not its SuperLink/SuperNode
deployment: the sites and the server here are one command each, with no app bundle to
build and ship; start_server is deprecated in Flower 1.42 but works, and is pinned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pipeline.learn.federated  # noqa: F401  # Flower's telemetry off before flwr loads
from pipeline.errors import UserError
from pipeline.learn.federated.federation import Federation, RoundResult, ServerOptions
from pipeline.settings import Settings

log = logging.getLogger(__name__)
_CLEAR = "no TLS: weights travel in clear"


@dataclass(frozen=True)
class FederationSummary:
    out: Path
    version: str
    classes: tuple[str, ...]
    sites: list[str]
    label_windows: dict[str, int]  # training windows per label over all sites
    site_labels: dict[str, dict[str, int]]  # ... and at each site
    best_round: int
    best_val_macro_f1: float
    epsilon: float | None
    rounds: list[RoundResult]
    seconds: float


def quiet_flower(settings: Settings) -> None:
    """Flower's log lines go through iotfuse's logging (not Flower's own colored console
    handler), only from WARNING on unless --log-level DEBUG, and without its deprecation
    notices of start_server/start_client (chosen knowingly) or tracebacks of our one-line
    errors. Call before anything else imports flwr: its imports log (alembic)."""
    debug = settings.runtime.log_level.upper() == "DEBUG"
    logging.getLogger("alembic").setLevel(logging.DEBUG if debug else logging.WARNING)
    import flwr  # noqa: F401  # sets up the "flwr" logger, which we then adjust

    flwr_log = logging.getLogger("flwr")
    for handler in list(flwr_log.handlers):
        if type(handler).__name__ == "ConsoleHandler":
            flwr_log.removeHandler(handler)
    flwr_log.setLevel(logging.DEBUG if debug else logging.WARNING)
    if _shown not in flwr_log.filters:
        flwr_log.addFilter(_shown)


def _shown(record: logging.LogRecord) -> bool:
    """Not Flower's deprecation notices, nor its tracebacks of our UserErrors: the command
    prints those in one line."""
    if "DEPRECATED FEATURE" in str(record.msg):
        return False
    return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def site_manager(fed: Federation, wait_s: float, abort: Callable[[], str | None] | None) -> Any:
    """Flower's client manager, but a round waits for the sites at most `wait_s` (then the
    federation stops, saying how many came) and stops at once when `abort()` names a reason."""
    from flwr.server import SimpleClientManager

    class Sites(SimpleClientManager):
        def wait_for(self, num_clients: int, timeout: int = 0) -> bool:
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                reason = abort() if abort is not None else None
                if reason is not None:
                    fed.error = fed.error or reason
                    return False
                with self._cv:
                    if self._cv.wait_for(lambda: len(self.clients) >= num_clients, timeout=0.5):
                        return True
            fed.error = fed.error or (
                f"{len(self.clients)} of the {num_clients} site(s) needed joined within "
                f"{wait_s:.0f} s"
            )
            return False

    return Sites()


def run_server(
    options: ServerOptions,
    settings: Settings,
    stream: TextIO | None = None,
    wrap: Callable[[Any], Any] | None = None,
    abort: Callable[[], str | None] | None = None,
) -> FederationSummary:
    """Run the federation to its end; `wrap(strategy)` may put a strategy around ours (tests
    record what the sites send); `abort()` returning a reason stops it."""
    _check_out(options)
    _check_init(options)
    quiet_flower(settings)  # before flwr loads: its imports log
    from flwr.server import ServerConfig, start_server

    certificates = None
    if options.tls is not None:
        try:
            certificates = tuple(p.read_bytes() for p in options.tls)
        except OSError as exc:
            raise UserError(f"TLS files: {exc}") from exc
    fed = Federation(options, stream)
    strategy = fed.strategy()
    fed.say(
        f"listening on {options.address} ({'TLS' if certificates else _CLEAR}); "
        f"waiting for {options.min_sites} site(s); {options.rounds} round(s)"
        + ("" if options.dp is None else f"; DP-SGD at each site to epsilon {options.dp.epsilon:g}")
    )
    start_server(
        server_address=options.address,
        config=ServerConfig(num_rounds=options.rounds + 1, round_timeout=options.round_timeout_s),
        strategy=strategy if wrap is None else wrap(strategy),
        client_manager=site_manager(fed, options.wait_s, abort),
        certificates=certificates,  # type: ignore[arg-type]
    )
    if fed.error is not None:
        raise UserError(f"the federation stopped: {fed.error}")
    if not fed.history:
        raise UserError("the federation ended before any round was scored")
    if fed.privacy is not None:  # the best round's weights, with what the whole run spent
        fed.save()
    return FederationSummary(
        out=options.out,
        version=fed.version,
        classes=tuple(fed.config.classes),
        sites=fed.sites,
        label_windows=fed.labels,
        site_labels=fed.site_labels,
        best_round=fed.best_round,
        best_val_macro_f1=fed.best_f1,
        epsilon=None if fed.privacy is None else fed.privacy.epsilon,
        rounds=fed.history,
        seconds=time.monotonic() - fed.started,
    )


def _check_init(options: ServerOptions) -> None:
    """--init's model loads (one line saying why when it does not)."""
    if options.init is None:
        return
    from fusion.modelfile import load_model

    try:
        load_model(options.init)
    except (ValueError, OSError) as exc:  # ModelFileError, ModelConfigError: which and why
        raise UserError(f"--init {options.init}: {exc}") from exc


def _check_out(options: ServerOptions) -> None:
    out = options.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the model")
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise UserError(f"--out {out} is not empty; choose a new directory or pass --overwrite")
