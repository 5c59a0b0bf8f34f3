"""Helpers for tests against the real broker: produce records, read topics until a condition."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from kafka import KafkaConsumer, KafkaProducer

from pipeline.kafka.worker import KafkaWorker
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import WorkerThread
from tests.contract import Published
from tests.factory import TOPICS


def settings_for(
    bootstrap: str, names: object, *, fetcher: str = "kafka-python", **runtime: object
) -> Settings:
    """Settings pointing at a test's own topics (names: a TopicNames), the worker's input
    read by `fetcher`."""
    s = Settings()
    topics = replace(
        s.topics,
        **{
            f: getattr(names, f)
            for f in (
                "camera",
                "audio",
                "telemetry",
                "labels",
                "events",
                "deadletter",
                "incidents",
                "incident_state",
            )
        },
    )
    return replace(
        s,
        kafka=replace(
            s.kafka,
            bootstrap_servers=bootstrap,
            group_id=f"g-{names.camera}",  # type: ignore[attr-defined]
            fetcher=fetcher,
        ),
        topics=topics,
        windows=replace(s.windows, idle_timeout_ms=1500),
        runtime=replace(s.runtime, metrics_port=0, commit_interval_ms=200, **runtime),
    )


def worker_thread(settings: Settings, runner: ModelRunner) -> WorkerThread[KafkaWorker]:
    """A KafkaWorker with its own engine, running on a thread (stop it with `close`)."""
    return WorkerThread(KafkaWorker(settings, build_engine(settings, runner)))


def to_topics(records: Iterable[Record], names: object) -> list[Record]:
    """Map the default topic names of factory-made records to a test's own topics."""
    mapping = {
        TOPICS.camera: names.camera,
        TOPICS.audio: names.audio,  # type: ignore[attr-defined]
        TOPICS.telemetry: names.telemetry,
    }  # type: ignore[attr-defined]
    return [replace(r, topic=mapping.get(r.topic, r.topic)) for r in records]


def produce(bootstrap: str, records: Iterable[Record]) -> list[Record]:
    """Produce records (keyed, timestamped, with headers); returns them with real offsets."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_request_size=10 * 1024 * 1024 + 512 * 1024,
    )
    futures = [
        (
            r,
            producer.send(
                r.topic,
                key=r.key,
                value=r.value,
                headers=list(r.headers),
                timestamp_ms=r.timestamp_ms,
            ),
        )
        for r in records
    ]
    producer.flush()
    out = []
    for r, f in futures:
        md = f.get(timeout=30)
        out.append(replace(r, partition=md.partition, offset=md.offset))
    producer.close()
    return out


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


def read_until(
    bootstrap: str,
    topics: list[str],
    done: Callable[[list[Published]], bool],
    timeout_s: float = 60.0,
    isolation_level: str = "read_uncommitted",
    poll: Callable[[], None] | None = None,
) -> list[Published]:
    """Read topics from the beginning until `done(records)` holds or the deadline passes."""
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level=isolation_level,
        max_partition_fetch_bytes=11 * 1024 * 1024,
    )
    got: list[Published] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=200).values():
                got += [
                    Published(
                        m.topic,
                        m.key,
                        m.value,
                        tuple((k, v) for k, v in m.headers or ()),
                        m.timestamp,
                    )
                    for m in msgs
                ]
            if poll is not None:
                poll()
            if done(got):
                return got
    finally:
        consumer.close()
    raise AssertionError(f"condition not met within {timeout_s}s; read {len(got)} records")
