"""`iotfuse broker`, `iotfuse topics`, `iotfuse config`."""

from __future__ import annotations

import argparse
import dataclasses
import json

from pipeline.commands.common import bootstrap_arg
from pipeline.metrics import Metrics
from pipeline.settings import Settings, settings_markdown


def broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, choices=(1, 3), default=1, help="1 node or 3 nodes")
    p.add_argument("--port", type=int, help="client port (of the first node); default: a free one")


def broker(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.broker import run_foreground

    return run_foreground(nodes=args.nodes, port=args.port)


def topics_args(p: argparse.ArgumentParser) -> None:
    bootstrap_arg(p)
    p.add_argument("--partitions", type=int, help="partitions per topic (default 3)")
    p.add_argument("--replication-factor", type=int, help="replication factor (default 1)")


def topics(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.admin import TopicNames, ensure_topics

    t = settings.topics
    names = TopicNames.from_settings(t)
    ensure_topics(
        settings.kafka.bootstrap_servers, names, t.partitions, t.replication_factor,
        client_config=settings.kafka.client_config(),
    )
    print(f"topics ready on {settings.kafka.bootstrap_servers}: "
          f"{', '.join(dataclasses.astuple(names))} ({t.partitions} partitions, "
          f"replication factor {t.replication_factor})")
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
        print(json.dumps(dataclasses.asdict(settings), indent=2))
    return 0
