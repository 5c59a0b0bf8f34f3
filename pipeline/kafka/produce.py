"""Simulated devices producing live: `iotfuse simulate --bootstrap-servers` and the demo.

The simulator's records go to the input and labels topics (Kafka partitions them by key),
paced by their timestamps divided by `speed` (`send_paced`, pipeline/clock.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.clock import Pacer, send_paced
from pipeline.errors import UserError
from pipeline.kafka.config import simulator_config
from pipeline.kafka.errors import explain, user_errors
from pipeline.kafka.producer import BoundedProducer
from pipeline.kafka.replay import topic_partition_counts
from pipeline.records import OnCounts, Record
from pipeline.settings import Settings


def simulate_to_kafka(
    records: Iterable[Record],
    settings: Settings,
    speed: float | None,
    stop: threading.Event,
    progress: OnCounts,
) -> tuple[int, int]:
    """Produce records (Kafka partitions them by key) paced by their timestamps / speed.

    First checks the connection, that the topics exist and that this client may write to
    them; Kafka errors a user can fix are UserErrors (`pipeline.kafka.errors`)."""
    t = settings.topics
    topics = [t.camera, t.audio, t.telemetry, t.labels]
    existing = topic_partition_counts(settings.kafka, topics, writable=True)
    missing = sorted(set(topics) - set(existing))
    if missing:
        raise UserError(
            f"topic(s) {', '.join(missing)} do not exist on "
            f"{settings.kafka.bootstrap_servers}; create them with `iotfuse topics`"
        )
    with user_errors(settings.kafka):
        return _produce(records, settings, speed, stop, progress)


def _produce(
    records: Iterable[Record],
    settings: Settings,
    speed: float | None,
    stop: threading.Event,
    progress: OnCounts,
) -> tuple[int, int]:
    out: BoundedProducer[int] = BoundedProducer(
        KafkaProducer(**simulator_config(settings.kafka)), settings.kafka.max_in_flight_bytes
    )
    sent = [0]

    def send(record: Record) -> None:
        out.send(
            sent[0],
            record.topic,
            record.key,
            record.value,
            record.headers,
            timestamp_ms=record.timestamp_ms,
        )
        sent[0] += 1
        _check_sent(out, settings)

    try:
        result = send_paced(records, send, Pacer(speed, time.monotonic, stop.wait), stop, progress)
        out.flush()
        _check_sent(out, settings)
    except KafkaError as exc:
        known = explain(exc, settings.kafka)
        raise UserError(
            known or f"producing to {settings.kafka.bootstrap_servers} failed: {exc!r}"
        ) from exc
    finally:
        out.close()
    return result


def _check_sent(out: BoundedProducer[int], settings: Settings) -> None:
    for index, exc in out.completed():
        if exc is not None:
            raise UserError(
                explain(exc, settings.kafka)
                or f"the broker refused simulated record #{index} ({exc!r}); check "
                "the topics' max.message.bytes and that the broker is healthy"
            )
