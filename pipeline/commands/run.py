"""`iotfuse run`: the streaming pipeline, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import threading
from typing import TYPE_CHECKING

from pipeline.commands.common import bootstrap_arg
from pipeline.commands.console import stop_on_signals
from pipeline.logs import capture_native_stderr
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.kafka.worker import KafkaWorker

log = logging.getLogger("iotfuse.run")


def run_args(p: argparse.ArgumentParser) -> None:
    bootstrap_arg(p)
    p.add_argument("--model", metavar="DIR", help="model directory (default: the shipped model)")
    p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:N")
    p.add_argument("--group-id", help="consumer group (workers with one id share partitions)")
    p.add_argument(
        "--exactly-once",
        action="store_true",
        default=None,
        help="publish events and commit offsets in Kafka transactions",
    )
    p.add_argument("--transactional-id", help="stable, unique per worker (exactly-once)")
    p.add_argument("--metrics-port", type=int, help="Prometheus endpoint port; 0 = off")
    p.add_argument("--max-batch", type=int, help="windows per inference batch at most")
    p.add_argument("--idle-timeout-ms", type=int, help="close a silent device's windows after")


def _announce(name: str) -> None:
    log.info("received %s: finishing closed windows, committing, exiting", name)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # first: a stop while starting up still exits cleanly
    with stop_on_signals(_announce, abort_on_second=False) as stop:
        return _run(settings, stop)


def _run(settings: Settings, stop: threading.Event) -> int:
    from pipeline.kafka.errors import user_errors
    from pipeline.kafka.incident_state import build_live_engine
    from pipeline.kafka.worker import KafkaWorker
    from pipeline.metrics import Metrics
    from pipeline.stream.heap import freeze_start_up
    from pipeline.stream.model_runner import ModelRunner

    metrics = Metrics()
    if settings.runtime.metrics_port:  # first: a port taken says so before the model loads
        metrics.serve(settings.runtime.metrics_port, settings.runtime.metrics_host)
    log.info("iotfuse run: starting; loading the model")
    runner = ModelRunner.load(settings.runtime.model or None, settings.runtime.device)
    engine = build_live_engine(settings, runner, metrics)  # incidents go on after a restart
    with user_errors(settings.kafka):  # a refused login or ACL: one line, pipeline/kafka/errors
        worker = KafkaWorker(settings, engine)
    log.info(
        "iotfuse run: model %s %s on %s; consuming %s from %s as group %s%s; metrics %s",
        runner.model_id.name,
        runner.model_id.version[:19],
        runner.device,
        ", ".join((settings.topics.camera, settings.topics.audio, settings.topics.telemetry)),
        settings.kafka.bootstrap_servers,
        settings.kafka.group_id,
        " (exactly-once)" if settings.kafka.exactly_once else "",
        f":{settings.runtime.metrics_port}/metrics" if settings.runtime.metrics_port else "off",
    )
    capture_native_stderr()  # from now on libpng/libjpeg/OpenCV complaints are log lines
    freeze_start_up()  # full collections walk only what the stream makes
    with user_errors(settings.kafka):  # e.g. an ACL revoked while running: one line
        if not work(worker, stop):
            return 1
    emitted = int(metrics.value("iotfuse_windows_emitted_total"))
    log.info("stopped cleanly: %d windows emitted", emitted)
    return 0


def work(worker: KafkaWorker, stop: threading.Event) -> bool:
    """Run the worker until `stop`; False when it stopped itself because a restart is what
    helps (out of its group for good, the broker refused an output, or the model hung):
    said in one line."""
    from pipeline.kafka.liveness import GroupStalledError
    from pipeline.kafka.transaction import DeliveryError
    from pipeline.stream.lane import ModelStalledError

    try:
        worker.run(stop)
    except (GroupStalledError, DeliveryError, ModelStalledError) as exc:
        log.error("stopped: %s", exc)
        return False
    return True
