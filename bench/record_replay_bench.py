"""Record and replay throughput next to raw kafka-python on the same records, same run.

    .venv/bin/python bench/record_replay_bench.py                 # starts a local broker
    .venv/bin/python bench/record_replay_bench.py --records 5000 --bootstrap-servers HOST:PORT

The records are produced once to a source topic (3 partitions), then, each `--repeat`
times and alternating with its baseline:
- raw consume: a KafkaConsumer (the recorder's settings) reads the source topic, doing
  nothing with the records -- the baseline for record;
- record: `record_to_file(..., until_end=True)` of the source topic into a file;
- raw produce: a KafkaProducer (the replayer's settings) sends the records to a fresh
  topic -- the baseline for replay;
- replay: `prepare` (one scan of the file, topic check) + `replay_to_kafka` at max speed
  to a fresh topic, through the bounded producer.
Values are incompressible (like JPEG frames), keyed by 16 device ids, with a content-type
header. Throughput counts key + value + header bytes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from pipeline.kafka.config import recorder_config, replayer_config
from pipeline.kafka.local.broker import LocalKafka
from pipeline.kafka.record import RecordOptions, record_to_file
from pipeline.kafka.replay import RecordingScan, ReplayOptions, prepare, replay_to_kafka
from pipeline.records import Record, record_size
from pipeline.settings import KafkaSettings

PARTITIONS = 3


@dataclass(frozen=True)
class Step:
    name: str
    seconds: float
    records: int
    nbytes: int

    @property
    def mb_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    @property
    def records_s(self) -> float:
        return self.records / self.seconds


def make_records(n: int, size: int, topic: str) -> Iterator[Record]:
    """n records of `size` incompressible bytes, 16 devices, 40 ms apart, ending now (older
    ones would be deleted by the broker's 7-day time retention while the bench runs)."""
    t0 = time.time_ns() // 1_000_000 - 40 * n
    rng = random.Random(1)
    pool = [rng.randbytes(size) for _ in range(64)]
    for i in range(n):
        value = i.to_bytes(8, "little") + pool[i % len(pool)][8:]
        yield Record(
            topic,
            -1,
            -1,
            t0 + 40 * i,
            f"cell-{i % 16:02d}".encode(),
            value,
            (("content-type", b"image/jpeg"),),
        )


def timed(name: str, fn: Callable[[], tuple[int, int]]) -> Step:
    start = time.perf_counter()
    records, nbytes = fn()
    step = Step(name, time.perf_counter() - start, records, nbytes)
    print(f"  {name}: {step.seconds:.2f} s", file=sys.stderr)
    return step


def raw_produce(kafka: KafkaSettings, records: Iterator[Record]) -> tuple[int, int]:
    producer = KafkaProducer(**replayer_config(kafka))
    count = nbytes = 0
    for r in records:
        producer.send(
            r.topic, key=r.key, value=r.value, headers=list(r.headers), timestamp_ms=r.timestamp_ms
        )
        count += 1
        nbytes += record_size(r)
    producer.flush()
    producer.close()
    return count, nbytes


def raw_consume(kafka: KafkaSettings, topic: str, expected: int) -> tuple[int, int]:
    consumer = KafkaConsumer(**recorder_config(kafka))
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    consumer.seek_to_beginning()
    count = nbytes = 0
    deadline = time.monotonic() + 600
    while count < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            for m in batch:
                count += 1
                nbytes += len(m.key or b"") + len(m.value or b"")
                nbytes += sum(len(k) + len(v or b"") for k, v in m.headers or ())
    consumer.close()
    return count, nbytes


def record_once(kafka: KafkaSettings, topic: str, path: Path) -> tuple[int, int]:
    path.unlink(missing_ok=True)
    result = record_to_file(kafka, RecordOptions((topic,), until_end=True), path, threading.Event())
    return result.records, result.bytes


def replay_once(
    kafka: KafkaSettings, path: Path, options: ReplayOptions, scan: RecordingScan
) -> tuple[int, int]:
    result = replay_to_kafka(path, kafka, options, threading.Event(), scan=scan)
    return result.records, result.bytes


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
    admin.wait_for_topics(names, timeout_ms=30000)
    admin.close()


def best(steps: list[Step]) -> Step:
    return min(steps, key=lambda s: s.seconds)


def run(bootstrap: str, n: int, size: int, repeat: int, workdir: Path) -> list[Step]:
    """Each step `repeat` times, alternating with its baseline (the broker slows down as
    its disk fills, so that neither side gets the fresh broker); the best of each is kept."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    base = f"bench-{uuid.uuid4().hex[:8]}"
    src = f"{base}-src"
    raw_targets = [f"{base}-raw{i}" for i in range(repeat)]
    replay_targets = [f"{base}-replay{i}" for i in range(repeat)]
    create_topics(bootstrap, [src, *raw_targets, *replay_targets])
    print(
        f"  filling {src}: {raw_produce(kafka, make_records(n, size, src))[0]} records",
        file=sys.stderr,
    )
    produce, consume, record, scan, send = [], [], [], [], []
    path = workdir / "bench.iotrec"
    for _ in range(repeat):
        consume.append(timed("raw consume", partial(raw_consume, kafka, src, n)))
        record.append(timed("record", partial(record_once, kafka, src, path)))
    for raw_target, target in zip(raw_targets, replay_targets, strict=True):
        produce.append(
            timed("raw produce", partial(raw_produce, kafka, make_records(n, size, raw_target)))
        )
        options = ReplayOptions(speed=None, topic_map={src: target})
        start = time.perf_counter()
        checked = prepare(path, kafka, options)
        scan.append(
            Step(
                "replay: scan + topic check",
                time.perf_counter() - start,
                checked.records,
                path.stat().st_size,
            )
        )
        send.append(timed("replay: send", partial(replay_once, kafka, path, options, checked)))
    print(f"  recording file: {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    total = Step(
        "replay (scan + send)",
        best(scan).seconds + best(send).seconds,
        best(send).records,
        best(send).nbytes,
    )
    return [best(produce), best(consume), best(record), best(scan), best(send), total]


def report(steps: list[Step], n: int, size: int, repeat: int) -> str:
    by = {s.name: s for s in steps}
    baseline = {
        "record": "raw consume",
        "replay: send": "raw produce",
        "replay (scan + send)": "raw produce",
    }
    lines = [
        f"{n} records of ~{size / 1000:.0f} KB, {PARTITIONS} partitions, one broker;"
        f" best of {repeat} runs per step (scan: MB/s of the file)",
        "",
        f"{'step':<28}{'s':>8}{'MB/s':>9}{'records/s':>11}  vs raw (MB/s ratio)",
    ]
    for s in steps:
        ratio = ""
        if s.name in baseline:
            base = by[baseline[s.name]]
            ratio = f"{s.mb_s / base.mb_s:.2f} x {base.name}"
        lines.append(f"{s.name:<28}{s.seconds:>8.2f}{s.mb_s:>9.1f}{s.records_s:>11,.0f}  {ratio}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--size", type=int, default=20_000, help="value bytes per record")
    p.add_argument("--repeat", type=int, default=3, help="runs per step; the best is shown")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--workdir", type=Path, help="where the recording goes (default: a temp dir)")
    args = p.parse_args()
    with ExitStack() as stack:
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            print("starting a local Kafka ...", file=sys.stderr)
            bootstrap = stack.enter_context(LocalKafka(nodes=1)).bootstrap_servers
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        os.makedirs(workdir, exist_ok=True)
        steps = run(bootstrap, args.records, args.size, args.repeat, workdir)
    print(report(steps, args.records, args.size, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
