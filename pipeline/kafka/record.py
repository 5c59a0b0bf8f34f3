"""Kafka -> recording: every partition of some topics into one recording file.

    with KafkaConsumer(**recorder_config(settings.kafka)) as consumer:  # no group, no commits
        result = record(consumer, writer, RecordOptions(("iot.camera",), until_end=True), stop)

Partitions are assigned manually (no consumer group, nothing committed), so recording
never disturbs the pipeline's consumers. Records keep topic, partition, offset,
timestamp, key, headers and value, in the order they were fetched (per partition: offset
order). The writer is flushed every `flush_interval_s`, so a crash loses little; a stop
(`stop` set, e.g. by SIGINT/SIGTERM) ends the loop after the current poll and the caller
closes the writer, which writes the last block.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError

from pipeline.clock import Seconds
from pipeline.errors import UserError
from pipeline.kafka.access import Operation, check_topic_access
from pipeline.kafka.admin import open_admin
from pipeline.kafka.config import recorder_config, security_config
from pipeline.kafka.errors import user_errors
from pipeline.kafka.messages import to_record
from pipeline.recordings.file import RecordingWriter
from pipeline.records import OnCounts, record_size
from pipeline.settings import KafkaSettings

StartAt = Literal["earliest", "latest"] | int  # int: a timestamp, epoch milliseconds
StopReason = Literal["end", "duration", "stopped"]


class RecordError(UserError):
    """Recording cannot start or go on (unknown topic, bad start position...)."""


@dataclass(frozen=True, slots=True)
class RecordOptions:
    topics: tuple[str, ...]
    start: StartAt = "earliest"
    duration_s: float | None = None  # stop after this much wall-clock time
    until_end: bool = False  # stop once every partition reached its end offset at start
    flush_interval_s: float = 2.0
    poll_timeout_ms: int = 200


@dataclass(frozen=True, slots=True)
class RecordResult:
    records: int
    bytes: int  # key, value and header bytes of the recorded records
    partitions: int
    elapsed_s: float
    stop_reason: StopReason


def parse_start(text: str) -> StartAt:
    """`earliest`, `latest` or a timestamp in epoch milliseconds (`--from`)."""
    if text == "earliest":
        return "earliest"
    if text == "latest":
        return "latest"
    try:
        value = int(text)
    except ValueError:
        raise RecordError(
            f"--from {text!r}: expected earliest, latest or a timestamp in epoch milliseconds"
            " (e.g. 1767225600000)"
        ) from None
    if value < 0:
        raise RecordError(f"--from {value}: a timestamp must be >= 0 epoch milliseconds")
    return value


def assign_partitions(consumer: KafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Assign every partition of `topics` to the consumer (no group); unknown topic: error."""
    tps: list[TopicPartition] = []
    missing: list[str] = []
    for topic in dict.fromkeys(topics):
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            missing.append(topic)
        tps += [TopicPartition(topic, p) for p in sorted(partitions)]
    if missing:
        raise RecordError(
            f"topic(s) {', '.join(missing)} do not exist on the broker: check the names"
            " (`kafka-topics --list`) or create them first"
        )
    consumer.assign(tps)
    return tps


def seek_start(consumer: KafkaConsumer, tps: list[TopicPartition], start: StartAt) -> None:
    """Position every partition at `start`; a timestamp after a partition's last record
    positions it at its end."""
    if start == "earliest":
        consumer.seek_to_beginning(*tps)
    elif start == "latest":
        consumer.seek_to_end(*tps)
    else:
        found = consumer.offsets_for_times({tp: start for tp in tps})
        ends = consumer.end_offsets(tps)
        for tp in tps:
            hit = found.get(tp)
            consumer.seek(tp, hit.offset if hit is not None else ends[tp])


def _unfinished(
    consumer: KafkaConsumer, ends: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    return {tp: end for tp, end in ends.items() if consumer.position(tp) < end}


def _pause_done(
    consumer: KafkaConsumer, before: dict[TopicPartition, int], now: dict[TopicPartition, int]
) -> None:
    """Stop fetching partitions that reached their end (no records past it are needed)."""
    done = [tp for tp in before if tp not in now]
    if done:
        consumer.pause(*done)


def record(
    consumer: KafkaConsumer,
    writer: RecordingWriter,
    options: RecordOptions,
    stop: threading.Event,
    progress: OnCounts | None = None,
    clock: Seconds = time.monotonic,
) -> RecordResult:
    """Record `options.topics` from the consumer into the writer until end, duration or stop.

    The caller closes the writer (its last block is written then)."""
    tps = assign_partitions(consumer, options.topics)
    seek_start(consumer, tps, options.start)
    ends: dict[TopicPartition, int] = {}  # --until-end: record offsets below these only
    remaining: dict[TopicPartition, int] = {}
    if options.until_end:
        ends = consumer.end_offsets(tps)
        remaining = _unfinished(consumer, ends)
        _pause_done(consumer, ends, remaining)
    started = last_flush = clock()
    records = size = 0
    reason: StopReason = "stopped"
    while not stop.is_set():
        if options.until_end and not remaining:
            reason = "end"
            break
        now = clock()
        if options.duration_s is not None and now - started >= options.duration_s:
            reason = "duration"
            break
        for tp, messages in consumer.poll(timeout_ms=options.poll_timeout_ms).items():
            end = ends.get(tp)
            for msg in messages:
                if end is not None and msg.offset >= end:
                    break  # produced after the recording started
                rec = to_record(msg)
                writer.write(rec)
                records += 1
                size += record_size(rec)
        if options.until_end:
            still = _unfinished(consumer, remaining)
            _pause_done(consumer, remaining, still)
            remaining = still
        if now - last_flush >= options.flush_interval_s:
            writer.flush()
            last_flush = now
        if progress is not None:
            progress(records, size)
    return RecordResult(records, size, len(tps), clock() - started, reason)


def open_consumer(kafka: KafkaSettings) -> KafkaConsumer:
    try:
        return KafkaConsumer(**recorder_config(kafka))
    except KafkaTimeoutError as exc:  # kafka-python: "Unable to bootstrap from ..."
        raise RecordError(
            f"cannot reach Kafka at {kafka.bootstrap_servers} ({exc}): check"
            " --bootstrap-servers and that the broker is running"
        ) from None


def record_to_file(
    kafka: KafkaSettings,
    options: RecordOptions,
    out: str | os.PathLike[str],
    stop: threading.Event,
    progress: OnCounts | None = None,
    *,
    overwrite: bool = False,
) -> RecordResult:
    """Record into a new file at `out` (an existing one is an error unless `overwrite`).

    First the connection and this client's Read ACLs on the topics are checked (a topic it
    may not read looks to a consumer like one that does not exist); Kafka errors a user
    can fix are UserErrors (`pipeline.kafka.errors`)."""
    if os.path.exists(out) and not overwrite:
        raise RecordError(
            f"{os.fspath(out)} already exists: choose another --out or delete it first"
        )
    with user_errors(kafka):
        with open_admin(kafka) as admin:
            readable: dict[str, Operation] = dict.fromkeys(options.topics, "READ")
            check_topic_access(admin, readable, security_config(kafka))
        consumer = open_consumer(kafka)
        try:
            with RecordingWriter(out, overwrite=overwrite) as writer:
                return record(consumer, writer, options, stop, progress)
        finally:
            consumer.close()
