"""Records the Kafka client cannot parse, found so they can be dead-lettered and skipped.

kafka-python raises CorruptRecordError from `poll()` for a record it cannot parse (a header
key that is not UTF-8, which Java clients read with replacement characters; a malformed
record; a record batch that decompresses past the bound or in a codec we cannot read,
pipeline/kafka/decompress.py) without saying which partition it is on. The consumer's
position stays on that record, so every poll raises again, and a worker that stopped would
stop again after each restart. `find_unreadable` asks a group-less client to read,
partition by partition, the record at each position; the ones it cannot parse are the
culprits. A record batch that cannot be decompressed is skipped whole, with one dead letter
naming its offset range: reading its records one by one would decompress it again for
each, and a batch holding millions of tiny records would make millions of letters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from kafka import TopicPartition
from kafka.errors import CorruptRecordError

from pipeline.decode import RejectedRecord
from pipeline.decode.errors import Reason
from pipeline.kafka.decompress import BatchTooLarge, UnsupportedCompression
from pipeline.records import Record
from pipeline.stream.outputs import Output, dead_letter
from pipeline.stream.windows import Position

PROBE_TIMEOUT_S = 5.0  # per partition: how long a probe waits for its record


@dataclass(frozen=True)
class Unreadable:
    """Records `first`..`last` of a topic-partition that the client cannot parse, and why."""

    tp: TopicPartition
    first: int
    last: int
    error: CorruptRecordError

    @property
    def reason(self) -> Reason:
        if isinstance(self.error, BatchTooLarge):
            return Reason.BATCH_TOO_LARGE_DECOMPRESSED
        if isinstance(self.error, UnsupportedCompression):
            return Reason.UNSUPPORTED_COMPRESSION
        return Reason.UNREADABLE_RECORD

    @property
    def positions(self) -> tuple[Position, ...]:
        """What the dead letter holds: the first and the last record (the offset tracker
        needs no more to commit past them all)."""
        ends = dict.fromkeys((self.first, self.last))
        return tuple(Position(self.tp.topic, self.tp.partition, o) for o in ends)

    def dead_letter(self, topic: str, now_ms: int) -> Output:
        return unreadable_dead_letter(self, topic, now_ms)


def find_unreadable(probe: Any, positions: dict[TopicPartition, int]) -> list[Unreadable]:
    """The records at `positions` that `probe` (a group-less KafkaConsumer, left unassigned)
    cannot parse: with the rest of their batch when the batch cannot be decompressed."""
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
            except CorruptRecordError as exc:
                last = getattr(exc, "last", offset)
                found.append(Unreadable(tp, offset, max(last, offset), exc))
    finally:
        probe.assign([])
    return found


ADVICE = {
    Reason.UNREADABLE_RECORD: "Check the producer: header keys must be UTF-8",
    Reason.BATCH_TOO_LARGE_DECOMPRESSED: (
        "Check the producer: a record of the contract is at most 10 MiB, and no batch of "
        "them decompresses to that limit; a batch that does is a compression bomb"
    ),
    Reason.UNSUPPORTED_COMPRESSION: (
        "Have the producer compress with gzip or zstd (or install the codec's Python "
        "library for the worker: lz4, python-snappy)"
    ),
}


def unreadable_dead_letter(found: Unreadable, topic: str, now_ms: int) -> Output:
    """What can be said of records that cannot be read: where they are (offset, and
    `iotfuse.error.last_offset` when a whole batch is skipped), and why; no key, value or
    original timestamp (-1 in `iotfuse.error.timestamp`); stamped `now_ms`."""
    tp = found.tp
    record = Record(tp.topic, tp.partition, found.first, -1, None, b"", ())
    skipped = "it was" if found.first == found.last else "they were"
    rejected = RejectedRecord(
        "decode",
        found.reason,
        f"the Kafka client cannot parse this record ({found.error}); {skipped} skipped. "
        + ADVICE[found.reason],
    )
    letter = dead_letter(record, rejected, topic)
    headers = letter.headers
    if found.last != found.first:
        headers += (("iotfuse.error.last_offset", str(found.last).encode()),)
    return replace(letter, timestamp_ms=now_ms, headers=headers, holds=found.positions)
