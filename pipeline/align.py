"""Merge the co-partitioned input topics into one event-time ordered stream per partition.

A consumer with a backlog fetches one topic-partition in large batches before the next,
so without alignment telemetry could run seconds ahead of the camera frames of the same
devices; the device watermark would then pass windows whose frames are still unread and
those frames would arrive late. The aligner holds records per (topic, partition) and
releases, per partition number, the record with the smallest timestamp as long as every
input topic of that partition either has a record buffered or is caught up (nothing more
to read right now). Live streams are caught up almost always, so records pass straight
through; a backlog, a replay or a recording is processed as if it arrived in real time.
Memory is bounded: a partition holding more than `limit` records releases its oldest
without waiting (a topic that stays silent must not hold the others back forever).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from pipeline.records import Record

CaughtUp = Callable[[str, int], bool]  # (topic, partition) -> nothing more to read now


class Aligner:
    def __init__(self, topics: Iterable[str], limit: int = 5000) -> None:
        self.topics = tuple(topics)
        self.limit = limit
        self._queues: dict[tuple[str, int], deque[Record]] = {}
        self.buffered = 0

    def push(self, record: Record) -> None:
        self._queues.setdefault((record.topic, record.partition), deque()).append(record)
        self.buffered += 1

    def queued(self, topic: str, partition: int) -> int:
        q = self._queues.get((topic, partition))
        return len(q) if q else 0

    def pop_ready(self, caught_up: CaughtUp) -> list[Record]:
        """Records that can go to the windows now, in event-time order per partition."""
        out: list[Record] = []
        for partition in sorted({p for _, p in self._queues}):
            out += self._release(partition, caught_up)
        self.buffered -= len(out)
        return out

    def drop(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget buffered records of revoked partitions (the new owner re-reads them)."""
        for key in partitions:
            q = self._queues.pop(key, None)
            self.buffered -= len(q) if q else 0

    def flush(self) -> list[Record]:
        """Everything buffered, merged by event time (end of a finite stream)."""
        return self.pop_ready(lambda _t, _p: True)

    def _release(self, partition: int, caught_up: CaughtUp) -> list[Record]:
        queues = [self._queues.get((t, partition)) for t in self.topics]
        out: list[Record] = []
        held = sum(len(q) for q in queues if q)
        while True:
            heads = []
            for topic, q in zip(self.topics, queues, strict=True):
                if q:
                    heads.append((q[0].timestamp_ms, topic, q))
                elif held - len(out) <= self.limit and not caught_up(topic, partition):
                    return out  # this topic may still hold earlier records: wait for it
            if not heads:
                return out
            _, _, q = min(heads, key=lambda h: (h[0], h[1]))
            out.append(q.popleft())

