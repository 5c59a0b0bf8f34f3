"""`iotfuse broker`, `iotfuse topics`, `iotfuse config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.commands.common import bootstrap_arg
from pipeline.commands.console import interrupt_on_signals, stop_on_signals
from pipeline.metrics import Metrics
from pipeline.settings import Settings, masked, settings_markdown

if TYPE_CHECKING:
    from pipeline.kafka.local.broker import LocalKafka


def broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, choices=(1, 3), default=1, help="1 node or 3 nodes")
    p.add_argument("--port", type=int, help="client port (of the first node); default: a free one")
    p.add_argument(
        "--secure",
        action="store_true",
        help="TLS (a generated CA), SCRAM-SHA-512 users and ACLs; writes a --config file for "
        "clients",
    )


def broker(args: argparse.Namespace, settings: Settings) -> int:
    return run_foreground(nodes=args.nodes, port=args.port, secure=args.secure, settings=settings)


def _say(line: str) -> None:
    print(line, flush=True)  # a script may be reading the bootstrap line through a pipe


def run_foreground(
    nodes: int = 1,
    port: int | None = None,
    out: Callable[[str], object] = _say,
    *,
    secure: bool = False,
    settings: Settings | None = None,
) -> int:
    """`iotfuse broker`: run a local Kafka until SIGINT/SIGTERM; 0 on a clean stop.

    Prints `bootstrap.servers=HOST:PORT[,...]` (one machine-readable line) once ready. A
    signal during startup stops the half-started cluster and returns 130. `secure`: a
    secured cluster with a user `iotfuse` allowed every command on the topics of
    `settings`, its client settings in a --config file (never printed: it holds the
    password).
    """
    from pipeline.kafka.local import runtime
    from pipeline.kafka.local.broker import LocalKafka
    from pipeline.kafka.local.runtime import KAFKA_VERSION
    from pipeline.kafka.local.security import SecurityConfig, new_password

    if runtime.cached_classpath() is None:
        out(f"downloading Apache Kafka {KAFKA_VERSION} jars with Maven (first run only) ...")
    security = SecurityConfig(users={"iotfuse": new_password()}) if secure else None
    kafka = LocalKafka(nodes=nodes, port=port, security=security)
    try:
        with interrupt_on_signals():  # while starting, a signal abandons the start
            kafka.start()
            if secure:
                out(_secure_clients(kafka, settings or Settings()))
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


def _secure_clients(kafka: LocalKafka, settings: Settings) -> str:
    """Allow user `iotfuse` every command on `settings`' topics and write its settings."""
    from pipeline.kafka.access import every_command_grants
    from pipeline.kafka.config import transactional_id

    fields = kafka.client_settings("iotfuse")
    live = dataclasses.replace(settings, kafka=dataclasses.replace(settings.kafka, **fields))
    kafka.allow("iotfuse", every_command_grants(live, transactional_id(live.kafka)))
    path = kafka.data_dir / "client.toml"
    path.touch(mode=0o600)
    path.write_text("[kafka]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    return (
        f"secured: TLS (CA {kafka.ca_file}) and SCRAM-SHA-512; user iotfuse may run every "
        f"command on the configured topics: iotfuse COMMAND --config {path}"
    )


def topics_args(p: argparse.ArgumentParser) -> None:
    bootstrap_arg(p)
    p.add_argument("--partitions", type=int, help="partitions per topic (default 3)")
    p.add_argument("--replication-factor", type=int, help="replication factor (default 1)")


def topics(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.admin import TopicNames, ensure_topics
    from pipeline.kafka.config import security_config
    from pipeline.kafka.errors import user_errors

    t = settings.topics
    names = TopicNames.from_settings(t)
    with user_errors(settings.kafka):
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
