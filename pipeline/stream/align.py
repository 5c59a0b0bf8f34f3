"""Merge the co-partitioned input topics into one event-time ordered stream per partition.

A consumer with a backlog fetches one topic-partition in large batches before the next,
so without alignment telemetry could run seconds ahead of the camera frames of the same
devices; the device watermark would then pass windows whose frames are still unread and
those frames would arrive late. The aligner holds records per (topic, partition) and
releases, per partition number, the record with the smallest timestamp as long as every
input topic of that partition either has a record buffered or is caught up (nothing more
to read right now). Live streams are caught up almost always, so records pass straight
through; a backlog, a replay or a recording is processed as if it arrived in real time.
Memory is bounded: a partition holding more than `limit` records, or any partition while
all of them together hold more than `max_bytes` (the one holding most bytes first),
releases its oldest records without waiting. A topic that stays silent must not hold the
others back forever, and a backlog of large frames must not fill the memory: 5,000
8 MiB images would be 40 GB. Records released that way may be late for their windows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from pipeline.records import Record, record_size

CaughtUp = Callable[[str, int], bool]  # (topic, partition) -> nothing more to read now


class Aligner:
    def __init__(
        self, topics: Iterable[str], limit: int = 5000, max_bytes: int = 128 * 1024 * 1024
    ) -> None:
        self.topics = tuple(topics)
        self.limit = limit  # records per partition number
        self.max_bytes = max_bytes  # bytes over all partitions
        self._queues: dict[tuple[str, int], deque[Record]] = {}
        self._held: dict[int, int] = {}  # partition -> records held
        self._held_bytes: dict[int, int] = {}  # partition -> bytes held
        self.buffered = 0
        self.buffered_bytes = 0

    def push(self, record: Record) -> None:
        self._queues.setdefault((record.topic, record.partition), deque()).append(record)
        self._count(record, 1)

    def queued(self, topic: str, partition: int) -> int:
        q = self._queues.get((topic, partition))
        return len(q) if q else 0

    def pop_ready(self, caught_up: CaughtUp) -> list[Record]:
        """Records that can go to the windows now, in event-time order per partition."""
        out: list[Record] = []
        # the partition holding most bytes first: it is the one to release when over budget
        for partition in sorted(self._held, key=lambda p: (-self._held_bytes[p], p)):
            out += self._release(partition, caught_up)
        return out

    def drop(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget buffered records of revoked partitions (the new owner re-reads them)."""
        for key in partitions:
            for record in self._queues.pop(key, ()):
                self._count(record, -1)

    def flush(self) -> list[Record]:
        """Everything buffered, merged by event time (end of a finite stream)."""
        return self.pop_ready(lambda _t, _p: True)

    def _count(self, record: Record, sign: int) -> None:
        nbytes = sign * record_size(record)
        p = record.partition
        self._held[p] = self._held.get(p, 0) + sign
        self._held_bytes[p] = self._held_bytes.get(p, 0) + nbytes
        self.buffered += sign
        self.buffered_bytes += nbytes
        if not self._held[p]:
            del self._held[p], self._held_bytes[p]

    def _over(self, partition: int) -> bool:
        """Past a limit: release the oldest records without waiting for the other topics."""
        return self._held.get(partition, 0) > self.limit or self.buffered_bytes > self.max_bytes

    def _release(self, partition: int, caught_up: CaughtUp) -> list[Record]:
        queues = [self._queues.get((t, partition)) for t in self.topics]
        out: list[Record] = []
        while True:
            heads = []
            for topic, q in zip(self.topics, queues, strict=True):
                if q:
                    heads.append((q[0].timestamp_ms, topic, q))
                elif not self._over(partition) and not caught_up(topic, partition):
                    return out  # this topic may still hold earlier records: wait for it
            if not heads:
                return out
            _, _, q = min(heads, key=lambda h: (h[0], h[1]))
            out.append(q.popleft())
            self._count(out[-1], -1)
