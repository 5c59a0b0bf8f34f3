"""`iotfuse run`: the streaming pipeline, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import threading

from pipeline.commands.common import bootstrap_arg
from pipeline.commands.console import stop_on_signals
from pipeline.logs import capture_native_stderr
from pipeline.settings import Settings

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
    log.info("iotfuse run: starting; loading the model")
    from pipeline.kafka.incident_state import build_live_engine
    from pipeline.kafka.worker import KafkaWorker
    from pipeline.metrics import Metrics
    from pipeline.stream.model_runner import ModelRunner

    runner = ModelRunner.load(settings.runtime.model or None, settings.runtime.device)
    metrics = Metrics()
    if settings.runtime.metrics_port:
        metrics.serve(settings.runtime.metrics_port, settings.runtime.metrics_host)
    engine = build_live_engine(settings, runner, metrics)  # incidents go on after a restart
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
    worker.run(stop)
    emitted = int(metrics.value("iotfuse_windows_emitted_total"))
    log.info("stopped cleanly: %d windows emitted", emitted)
    return 0
