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

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import kafka.errors as kafka_errors
from kafka import KafkaProducer

from pipeline.clock import Pacer, Seconds, Sleep
from pipeline.errors import UserError
from pipeline.kafka.access import check_topic_access
from pipeline.kafka.admin import open_admin
from pipeline.kafka.config import replayer_config, security_config
from pipeline.kafka.errors import user_errors
from pipeline.kafka.producer import BoundedProducer
from pipeline.recordings.file import RecordingError, open_recording
from pipeline.recordings.merge import merge_by_time
from pipeline.records import OnCounts, Record, record_size
from pipeline.settings import KafkaSettings

Token = tuple[str, int, int]  # source topic, partition, offset of a sent record


class ReplayError(UserError):
    """The recording cannot be replayed to these topics, or the broker refused a record."""


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


def topic_partition_counts(
    kafka: KafkaSettings, topics: Iterable[str], *, writable: bool = False
) -> dict[str, int]:
    """Partition count of each existing topic among `topics`. With `writable`, first check
    that this client may write to them (UserError naming the ACLs it lacks)."""
    wanted = list(topics)
    with user_errors(kafka), open_admin(kafka) as admin:
        if writable:
            check_topic_access(admin, dict.fromkeys(wanted, "WRITE"), security_config(kafka))
        counts: dict[str, int] = {}
        for desc in admin.describe_topics(wanted):
            if kafka_errors.for_code(int(desc["error_code"])) is kafka_errors.NoError:
                counts[str(desc["name"])] = len(desc["partitions"])
        return counts


def prepare(
    source: str | os.PathLike[str], kafka: KafkaSettings, options: ReplayOptions
) -> RecordingScan:
    """Scan the recording and check the target topics; raises ReplayError before any send."""
    scan = scan_recording(source)
    needed = required_partitions(scan, options)
    check_partitions(needed, topic_partition_counts(kafka, needed, writable=True))
    return scan


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
    progress: OnCounts | None = None,
    clock: Seconds = time.monotonic,
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
    progress: OnCounts | None = None,
    *,
    scan: RecordingScan | None = None,
    clock: Seconds = time.monotonic,
    sleep: Sleep | None = None,
) -> ReplayResult:
    """`prepare` (unless `scan` is given), then replay through a bounded producer.

    `sleep` defaults to waiting on `stop`, so a stop request ends a wait at once."""
    if scan is None:
        prepare(source, kafka, options)
    with user_errors(kafka):  # e.g. an ACL revoked since `prepare`
        producer = KafkaProducer(**replayer_config(kafka))
        out: BoundedProducer[Token] = BoundedProducer(producer, kafka.max_in_flight_bytes)
        pacer = Pacer(options.speed, clock, sleep if sleep is not None else stop.wait)
        try:
            return replay(source, out, options, pacer, stop, progress, clock)
        finally:
            out.close()
