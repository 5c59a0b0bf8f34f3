"""What a window's records cost the worker's interpreter before the model (issue 14), in one run.

    .venv/bin/python bench/client_bench.py                    # starts a local broker
    .venv/bin/python bench/client_bench.py --devices 64 --seconds 20 --repeat 3

The exported model runs without Python's lock, so what bounds the exported worker is the
Python work of every record: the Kafka client's fetching and parsing, then the engine's
ingest and windows. This measures both on the records of bench/fleet.py's devices (5 fps
640x480 JPEG, 0.5 s WAV chunks, 10 Hz telemetry: 34 records a window), CPU per record and
per window:

1. kafka-python, the worker's client, with the worker's consumer settings
   (pipeline/kafka/config.py `consumer_config`), reading every record of the three input
   topics and touching each field: the whole process's CPU (its I/O thread parses too) and
   its main thread's;
2. confluent-kafka (librdkafka: fetching, decompression and parsing in C, off the lock), if
   it is installed (`pip install confluent-kafka`; iotfuse does not use it), the same way;
3. the engine: `Engine.process` of every record (ingest, windows, frame prefetch), no
   Kafka and no model calls, its thread's CPU.

Alternated `--repeat` times; the best of each is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fleet import make_media, produced, settings_for, stream
from kafka import KafkaConsumer

from pipeline.clock import wall_clock_ms
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.config import consumer_config
from pipeline.kafka.local.broker import LocalKafka
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.model_runner import ModelRunner

Cost = tuple[float, float, float, int]  # process CPU s, main thread CPU s, wall s, records
fields: list[object] = []  # every field read, as the worker reads them (then dropped)


def timed(job: Callable[[], int]) -> Cost:
    """The cost of `job`, which returns how many records it handled."""
    cpu, main, wall = time.process_time(), time.thread_time(), time.perf_counter()
    n = job()
    return time.process_time() - cpu, time.thread_time() - main, time.perf_counter() - wall, n


def kafka_python(bootstrap: str, names: TopicNames, n: int) -> Cost:
    base = Settings()
    kafka = dataclasses.replace(
        base.kafka, bootstrap_servers=bootstrap, group_id=f"client-bench-{time.time_ns()}"
    )
    config = consumer_config(dataclasses.replace(base, kafka=kafka))
    consumer = KafkaConsumer(names.camera, names.audio, names.telemetry, **config)
    got = [sum(len(b) for b in consumer.poll(timeout_ms=5000).values())]  # joined: first fetch
    first = got[0]  # not measured: the group join and the first fetch

    def drain() -> int:
        while got[0] < n:
            for batch in consumer.poll(timeout_ms=5000).values():
                for m in batch:
                    fields.append((m.topic, m.partition, m.offset, m.timestamp, m.key, m.value))
                    fields.append(m.headers)
                    got[0] += 1
                fields.clear()
        return got[0] - first

    try:
        return timed(drain)
    finally:
        consumer.close()


def confluent(bootstrap: str, names: TopicNames, n: int) -> Cost | None:
    try:
        from confluent_kafka import Consumer  # type: ignore[import-not-found]
    except ImportError:
        return None
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"client-bench-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.max.bytes": Settings().kafka.fetch_max_bytes,
        }
    )
    consumer.subscribe([names.camera, names.audio, names.telemetry])
    got = [0]
    while not got[0]:  # joined: first fetch
        got[0] = sum(m.error() is None for m in consumer.consume(500, 5.0))
    first = got[0]

    def drain() -> int:
        while got[0] < n:
            for m in consumer.consume(500, 0.1):
                if m.error() is None:
                    fields.append((m.topic(), m.partition(), m.offset(), m.timestamp()))
                    fields.append((m.key(), m.value(), m.headers()))
                    got[0] += 1
            fields.clear()
        return got[0] - first

    try:
        return timed(drain)
    finally:
        consumer.close()


def engine_cost(records: Sequence[Record], runner: ModelRunner) -> Cost:
    engine = build_engine(settings_for("127.0.0.1:9", None), runner)
    try:
        return timed(lambda: len([engine.process(r) for r in records]))
    finally:
        engine.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", type=Path, help="default: the shipped model (not called)")
    a = p.parse_args()
    media = make_media()
    t0 = (wall_clock_ms() // 2000) * 2000 - a.seconds * 1000 - 60_000
    records = stream(a.devices, t0, a.seconds, media)
    n, windows = len(records), a.devices * a.seconds // 2
    runner = ModelRunner.load(a.model, "cpu")
    best: dict[str, Cost] = {}

    def keep(name: str, cost: Cost | None) -> None:
        if cost is not None and (name not in best or cost[0] < best[name][0]):
            best[name] = cost

    with LocalKafka() as kafka:
        names = produced(kafka.bootstrap_servers, records)
        for i in range(a.repeat):
            print(f"round {i + 1} of {a.repeat} ...", file=sys.stderr, flush=True)
            keep("kafka-python (the worker's)", kafka_python(kafka.bootstrap_servers, names, n))
            keep("confluent-kafka", confluent(kafka.bootstrap_servers, names, n))
            keep("Engine.process", engine_cost(records, runner))
    print(
        f"{a.devices} devices x {a.seconds} s: {n} records, {windows} windows; "
        f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}; best of {a.repeat}"
    )
    print(f"{'':<28}{'process CPU':>24}{'main thread CPU':>24}{'wall':>10}")
    for name, (cpu, main_cpu, wall, count) in best.items():
        if not count:
            print(f"{name:<28}every record came with the first fetch: use more --devices")
            continue
        done = count * windows / n  # windows their records make (34 records a window)
        per = [f"{1e6 * c / count:.1f} us ({1e3 * c / done:.2f} ms/w)" for c in (cpu, main_cpu)]
        print(f"{name:<28}{per[0]:>24}{per[1]:>24}{wall:>9.2f}s")
    if "confluent-kafka" not in best:
        print("confluent-kafka: not installed (pip install confluent-kafka to compare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
