"""`iotfuse broker`, `iotfuse topics`, `iotfuse config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

from pipeline.commands.common import bootstrap_arg
from pipeline.commands.console import interrupt_on_signals, stop_on_signals
from pipeline.metrics import Metrics
from pipeline.settings import Settings, masked, settings_markdown


def broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, choices=(1, 3), default=1, help="1 node or 3 nodes")
    p.add_argument("--port", type=int, help="client port (of the first node); default: a free one")


def broker(args: argparse.Namespace, settings: Settings) -> int:
    return run_foreground(nodes=args.nodes, port=args.port)


def _say(line: str) -> None:
    print(line, flush=True)  # a script may be reading the bootstrap line through a pipe


def run_foreground(
    nodes: int = 1, port: int | None = None, out: Callable[[str], object] = _say
) -> int:
    """`iotfuse broker`: run a local Kafka until SIGINT/SIGTERM; 0 on a clean stop.

    Prints `bootstrap.servers=HOST:PORT[,...]` (one machine-readable line) once ready. A
    signal during startup stops the half-started cluster and returns 130.
    """
    from pipeline.kafka.local import runtime
    from pipeline.kafka.local.broker import LocalKafka
    from pipeline.kafka.local.runtime import KAFKA_VERSION

    if runtime.cached_classpath() is None:
        out(f"downloading Apache Kafka {KAFKA_VERSION} jars with Maven (first run only) ...")
    kafka = LocalKafka(nodes=nodes, port=port)
    try:
        with interrupt_on_signals():  # while starting, a signal abandons the start
            kafka.start()
    except KeyboardInterrupt:
        kafka.close()
        out("interrupted while starting; stopped")
        return 130
    try:
        with stop_on_signals(lambda _name: None) as stop:
            out(f"bootstrap.servers={kafka.bootstrap_servers}")
            out(
                f"Apache Kafka {KAFKA_VERSION}: {nodes} node(s) ready; logs: "
                f"{', '.join(map(str, kafka.log_files))}. Ctrl-C stops and deletes the data."
            )
            stop.wait()
            out("stopping ...")
    finally:
        kafka.close()
    return 0


def topics_args(p: argparse.ArgumentParser) -> None:
    bootstrap_arg(p)
    p.add_argument("--partitions", type=int, help="partitions per topic (default 3)")
    p.add_argument("--replication-factor", type=int, help="replication factor (default 1)")


def topics(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.admin import TopicNames, ensure_topics
    from pipeline.kafka.config import security_config

    t = settings.topics
    names = TopicNames.from_settings(t)
    ensure_topics(
        settings.kafka.bootstrap_servers,
        names,
        t.partitions,
        t.replication_factor,
        client_config=security_config(settings.kafka),
    )
    print(
        f"topics ready on {settings.kafka.bootstrap_servers}: "
        f"{', '.join(dataclasses.astuple(names))} ({t.partitions} partitions, "
        f"replication factor {t.replication_factor})"
    )
    return 0


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="print the settings reference")
    p.add_argument("--metrics", action="store_true", help="print the metrics reference")


def config(args: argparse.Namespace, settings: Settings) -> int:
    if args.metrics:
        print(Metrics().markdown())
    elif args.markdown:
        print(settings_markdown())
    else:
        print(json.dumps(masked(settings), indent=2))
    return 0
