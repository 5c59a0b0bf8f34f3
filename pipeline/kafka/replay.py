"""Recording -> Kafka: the records again, with their keys, headers, timestamps, partition
numbers and per-partition order, at their original pace (scaled) or as fast as possible.

    scan = prepare(path, settings.kafka, options)      # reads the file once: partitions
    result = replay_to_kafka(path, settings.kafka, options, stop, scan=scan)

Timing follows the record timestamps: a record is sent `(ts - first_ts) / speed` after the
first one (`Pacer`, with an injected clock and sleep). A recorder writes partitions in
the order it fetched them, not in timestamp order, so the records are merged by timestamp
across (topic, partition) streams with a bounded look-ahead (`merge_by_time`), each
stream kept in file order. A record recorded with partition -1 (e.g. from the simulator)
is partitioned by Kafka (by key). Before anything is sent, every target topic must exist
with at least the partitions the recording uses.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kafka.errors as kafka_errors
from kafka import KafkaAdminClient, KafkaProducer

from pipeline.errors import UserError
from pipeline.kafka.producer import BoundedProducer
from pipeline.kafka.record import MAX_RECORD_FETCH_BYTES, Clock, Progress
from pipeline.recordings.file import RecordingError, open_recording
from pipeline.records import Record, record_size
from pipeline.settings import KafkaSettings

Sleep = Callable[[float], object]
Token = tuple[str, int, int]  # source topic, partition, offset of a sent record
_RECORD_OVERHEAD = 200  # bytes a buffered Record costs beyond its key, value and headers


class ReplayError(UserError):
    """The recording cannot be replayed to these topics, or the broker refused a record."""


class Pacer:
    """Spaces records by their timestamps divided by `speed` (None: no waiting).

    The first timestamped record anchors the schedule: a record stamped `ts` is due at
    `anchor_clock + (ts - anchor_ts) / 1000 / speed`. Waiting for the due time (never for
    a record already late, nor one without timestamp, -1) keeps time spent sending from
    adding up: the schedule does not drift."""

    def __init__(self, speed: float | None, clock: Clock, sleep: Sleep) -> None:
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number (None: max speed), got {speed}")
        self.speed = speed
        self.clock = clock
        self.sleep = sleep
        self._anchor: tuple[int, float] | None = None  # (timestamp_ms, clock seconds)
        self.slept_s = 0.0  # total asked of `sleep`

    def delay(self, timestamp_ms: int) -> float:
        """Seconds to wait now before sending a record stamped `timestamp_ms`."""
        if self.speed is None or timestamp_ms < 0:
            return 0.0
        now = self.clock()
        if self._anchor is None:
            self._anchor = (timestamp_ms, now)
            return 0.0
        anchor_ts, anchor_clock = self._anchor
        due = anchor_clock + (timestamp_ms - anchor_ts) / 1000.0 / self.speed
        return max(0.0, due - now)

    def wait(self, timestamp_ms: int) -> None:
        seconds = self.delay(timestamp_ms)
        if seconds > 0:
            self.slept_s += seconds
            self.sleep(seconds)


def merge_by_time(blocks: Iterable[list[Record]], lookahead_bytes: int) -> Iterator[Record]:
    """Records in timestamp order across (topic, partition) streams, each stream in its
    file order, holding at most ~`lookahead_bytes` of records (plus one block).

    Exact when streams are skewed by less than the look-ahead in the file; a record found
    later than that comes out late (its timestamp behind ones already sent)."""
    queues: dict[tuple[str, int], deque[tuple[Record, int]]] = {}  # (record, buffered bytes)
    heads: list[tuple[int, int, tuple[str, int]]] = []  # (head timestamp, tie-break, stream)
    tie = itertools.count()
    source = iter(blocks)
    buffered = 0
    exhausted = False
    while True:
        while not exhausted and buffered < lookahead_bytes:
            block = next(source, None)
            if block is None:
                exhausted = True
                break
            for rec in block:
                stream = (rec.topic, rec.partition)
                queue = queues.setdefault(stream, deque())
                if not queue:
                    heapq.heappush(heads, (rec.timestamp_ms, next(tie), stream))
                cost = record_size(rec) + _RECORD_OVERHEAD
                queue.append((rec, cost))
                buffered += cost
        if not heads:
            return
        _, _, stream = heapq.heappop(heads)
        queue = queues[stream]
        rec, cost = queue.popleft()
        buffered -= cost
        if queue:
            heapq.heappush(heads, (queue[0][0].timestamp_ms, next(tie), stream))
        yield rec


def parse_topic_map(items: Sequence[str]) -> dict[str, str]:
    """`["old=new", ...]` (`--topic-map`) -> {"old": "new"}."""
    mapping: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise ReplayError(f"--topic-map {item!r}: expected OLD=NEW, e.g. iot.camera=t.camera")
        if mapping.get(old, new) != new:
            raise ReplayError(f"--topic-map maps {old} twice ({mapping[old]} and {new})")
        mapping[old] = new
    return mapping


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    speed: float | None = 1.0  # None: as fast as possible
    topic_map: Mapping[str, str] = field(default_factory=dict)
    lookahead_bytes: int = 64 * 1024 * 1024  # records held to merge streams by timestamp

    def target(self, topic: str) -> str:
        return self.topic_map.get(topic, topic)


@dataclass(frozen=True, slots=True)
class RecordingScan:
    records: int
    partitions: dict[str, int]  # source topic -> highest partition number + 1 (0: only -1)
    truncated_at: int | None


@dataclass(frozen=True, slots=True)
class ReplayResult:
    records: int
    bytes: int  # key, value and header bytes sent
    elapsed_s: float
    slept_s: float  # total the pacer waited
    stopped: bool  # stopped early (signal) before the end of the recording
    truncated_at: int | None  # the recording is cut short here (a crash while recording)
    skipped: int = 0  # records with neither key nor value: kafka-python cannot send them


def scan_recording(source: str | os.PathLike[str]) -> RecordingScan:
    """One pass over the recording: record count and the partitions each topic uses."""
    partitions: dict[str, int] = {}
    records = 0
    try:
        with open_recording(source) as reader:
            for block in reader.iter_blocks():
                records += len(block)
                for rec in block:
                    partitions[rec.topic] = max(partitions.get(rec.topic, 0), rec.partition + 1)
            truncated_at = reader.truncated_at if reader.truncated else None
    except RecordingError as exc:
        raise ReplayError(f"cannot replay {os.fspath(source)}: {exc}") from exc
    return RecordingScan(records, partitions, truncated_at)


def required_partitions(scan: RecordingScan, options: ReplayOptions) -> dict[str, int]:
    """Target topic -> partitions it needs at least."""
    needed: dict[str, int] = {}
    for topic, count in scan.partitions.items():
        target = options.target(topic)
        needed[target] = max(needed.get(target, 0), count)
    return needed


def check_partitions(needed: Mapping[str, int], available: Mapping[str, int]) -> None:
    """Raise ReplayError unless every target topic exists with enough partitions."""
    missing = [t for t in needed if t not in available]
    short = [
        f"{t} has {available[t]} but the recording uses partitions 0..{n - 1}"
        for t, n in needed.items()
        if t in available and available[t] < n
    ]
    problems = []
    if missing:
        problems.append(f"topic(s) {', '.join(missing)} do not exist")
    problems += short
    if problems:
        raise ReplayError(
            "cannot replay: " + "; ".join(problems) + ". Create the target topics with at"
            " least as many partitions as the recording uses (`iotfuse topics`), or map the"
            " recording's topics to others with --topic-map OLD=NEW"
        )


def topic_partition_counts(kafka: KafkaSettings, topics: Iterable[str]) -> dict[str, int]:
    """Partition count of each existing topic among `topics`."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=kafka.bootstrap_servers.split(","), **kafka.client_config()
        )
    except kafka_errors.KafkaTimeoutError as exc:  # kafka-python: "Unable to bootstrap"
        raise ReplayError(
            f"cannot reach Kafka at {kafka.bootstrap_servers} ({exc}): check"
            " --bootstrap-servers and that the broker is running"
        ) from None
    try:
        counts: dict[str, int] = {}
        for desc in admin.describe_topics(list(topics)):
            if kafka_errors.for_code(int(desc["error_code"])) is kafka_errors.NoError:
                counts[str(desc["name"])] = len(desc["partitions"])
        return counts
    finally:
        admin.close()


def prepare(
    source: str | os.PathLike[str], kafka: KafkaSettings, options: ReplayOptions
) -> RecordingScan:
    """Scan the recording and check the target topics; raises ReplayError before any send."""
    scan = scan_recording(source)
    needed = required_partitions(scan, options)
    check_partitions(needed, topic_partition_counts(kafka, needed))
    return scan


def producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    return {
        "bootstrap_servers": kafka.bootstrap_servers.split(","),
        "client_id": f"{kafka.client_id}-replayer",
        "acks": "all",
        "enable_idempotence": True,  # retries keep per-partition order, no duplicates
        "linger_ms": 10,
        "batch_size": 1024 * 1024,  # images are tens of KB: batch many per request
        "max_request_size": MAX_RECORD_FETCH_BYTES,
        **kafka.client_config(),
    }


def _raise_failures(out: BoundedProducer[Token], sent: int) -> None:
    for (topic, partition, offset), exc in out.completed():
        if exc is not None:
            raise ReplayError(
                f"the broker refused record {topic}/{partition}@{offset} ({exc!r}); {sent}"
                " records were sent, the last ones possibly not all stored. Fix the cause"
                " (topic config such as max.message.bytes, ACLs) and replay to fresh topics"
            ) from exc


def _send(out: BoundedProducer[Token], rec: Record, topic: str) -> None:
    try:
        out.send(
            (rec.topic, rec.partition, rec.offset),
            topic,
            rec.key,
            rec.value,
            rec.headers,
            timestamp_ms=rec.timestamp_ms if rec.timestamp_ms >= 0 else None,
            partition=rec.partition if rec.partition >= 0 else None,
        )
    except kafka_errors.KafkaError as exc:  # e.g. larger than the producer's request limit
        raise ReplayError(
            f"cannot send record {rec.topic}/{rec.partition}@{rec.offset} to {topic}: {exc!r}"
        ) from exc


def replay(
    source: str | os.PathLike[str],
    out: BoundedProducer[Token],
    options: ReplayOptions,
    pacer: Pacer,
    stop: threading.Event,
    progress: Progress | None = None,
    clock: Clock = time.monotonic,
) -> ReplayResult:
    """Send the recording's records through `out`, paced; flushes before returning."""
    started = clock()
    sent = size = skipped = 0
    stopped = False
    with open_recording(source) as reader:
        for rec in merge_by_time(reader.iter_blocks(), options.lookahead_bytes):
            if rec.key is None and rec.value is None:
                skipped += 1
                continue
            pacer.wait(rec.timestamp_ms)
            if stop.is_set():
                stopped = True
                break
            _send(out, rec, options.target(rec.topic))
            sent += 1
            size += record_size(rec)
            _raise_failures(out, sent)
            if progress is not None:
                progress(sent, size)
        truncated_at = reader.truncated_at if reader.truncated else None
    out.flush()
    _raise_failures(out, sent)
    return ReplayResult(
        sent, size, clock() - started, pacer.slept_s, stopped, truncated_at, skipped
    )


def replay_to_kafka(
    source: str | os.PathLike[str],
    kafka: KafkaSettings,
    options: ReplayOptions,
    stop: threading.Event,
    progress: Progress | None = None,
    *,
    scan: RecordingScan | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep | None = None,
) -> ReplayResult:
    """`prepare` (unless `scan` is given), then replay through a bounded producer.

    `sleep` defaults to waiting on `stop`, so a stop request ends a wait at once."""
    if scan is None:
        prepare(source, kafka, options)
    try:
        producer = KafkaProducer(**producer_config(kafka))
    except kafka_errors.KafkaTimeoutError as exc:
        raise ReplayError(f"cannot reach Kafka at {kafka.bootstrap_servers} ({exc})") from None
    out: BoundedProducer[Token] = BoundedProducer(producer, kafka.max_in_flight_bytes)
    pacer = Pacer(options.speed, clock, sleep if sleep is not None else stop.wait)
    try:
        return replay(source, out, options, pacer, stop, progress, clock)
    finally:
        out.close()
