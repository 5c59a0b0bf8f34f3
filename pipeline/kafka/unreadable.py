"""Records the Kafka client cannot parse, found so they can be dead-lettered and skipped.

kafka-python raises CorruptRecordError from `poll()` for a record it cannot parse (a header
key that is not UTF-8, which Java clients read with replacement characters; a malformed
record) without saying which partition it is on. The consumer's position stays on that
record, so every poll raises again, and a worker that stopped would stop again after each
restart. `find_unreadable` asks a group-less client to read, partition by partition, the
record at each position; the ones it cannot parse are the culprits.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from kafka import TopicPartition
from kafka.errors import CorruptRecordError

from pipeline.decode import RejectedRecord
from pipeline.decode.errors import Reason
from pipeline.records import Record
from pipeline.stream.outputs import Output, dead_letter

PROBE_TIMEOUT_S = 5.0  # per partition: how long a probe waits for its record


def find_unreadable(
    probe: Any, positions: dict[TopicPartition, int]
) -> list[tuple[TopicPartition, int]]:
    """The (partition, offset) of each position whose record `probe` (a group-less
    KafkaConsumer, left unassigned) cannot parse."""
    ends = probe.end_offsets(list(positions))
    found = []
    try:
        for tp, offset in positions.items():
            if offset >= ends.get(tp, offset):
                continue  # nothing there to read
            probe.assign([tp])
            probe.seek(tp, offset)
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            try:
                while not probe.poll(timeout_ms=200, max_records=1) and time.monotonic() < deadline:
                    pass  # fetching: poll waits up to 200 ms for the record
            except CorruptRecordError:
                found.append((tp, offset))
    finally:
        probe.assign([])
    return found


def unreadable_dead_letter(
    tp: TopicPartition, offset: int, error: Exception, topic: str, now_ms: int
) -> Output:
    """What can be said of a record that cannot be read: where it is, and why; no key,
    value or original timestamp (-1 in `iotfuse.error.timestamp`); stamped `now_ms`."""
    record = Record(tp.topic, tp.partition, offset, -1, None, b"", ())
    rejected = RejectedRecord(
        "decode",
        Reason.UNREADABLE_RECORD,
        f"the Kafka client cannot parse this record ({error}); it was skipped. Check the "
        "producer: header keys must be UTF-8",
    )
    return replace(dead_letter(record, rejected, topic), timestamp_ms=now_ms)
