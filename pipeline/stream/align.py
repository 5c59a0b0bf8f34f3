"""Merge the co-partitioned input topics into one event-time ordered stream per partition.

A consumer with a backlog fetches one topic-partition in large batches before the next,
so without alignment telemetry could run seconds ahead of the camera frames of the same
devices; the device watermark would then pass windows whose frames are still unread and
those frames would arrive late. The aligner holds records per (topic, partition) and
releases, per partition number, the record with the smallest timestamp as long as every
input topic of that partition either has a record buffered or is caught up (nothing more
to read right now). Live streams are caught up almost always, so records pass straight
through; a backlog, a replay or a recording is processed as if it arrived in real time.

Memory is bounded: `limit` records a partition, `max_bytes` over all partitions (5,000
8 MiB images would be 40 GB). What happens past a limit depends on whether the reader can
stop reading a topic-partition:

- `pausable` (the Kafka worker): nothing is released out of order. `pause` names the
  topic-partitions to stop reading: those holding records in a partition that is over a
  limit (or any, while all of them together are over `max_bytes`) and waits on another
  topic. The topic it waits on is never paused, so it delivers or catches up, and the
  merge goes on. Held records of a waiting partition cannot be released anyway, so
  pausing them delays nothing.
- otherwise (a recording, a finite stream read in one order): a partition over its
  limit, or any partition while all of them together hold more than `max_bytes` (the one
  holding most bytes first), releases its oldest records without waiting. Records
  released that way may be late for their windows.

Why not release without waiting in the worker (issue 19, part 3): records released ahead
of their partition's other topics are ahead for every device of that partition, and the
byte budget is shared: one device's flood or large frames pushed well-behaved devices'
camera and audio past the telemetry still unread, and that telemetry was late.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from pipeline.records import Record, record_size

CaughtUp = Callable[[str, int], bool]  # (topic, partition) -> nothing more to read now


class Aligner:
    def __init__(
        self,
        topics: Iterable[str],
        limit: int = 5000,
        max_bytes: int = 128 * 1024 * 1024,
        *,
        pausable: bool = False,
    ) -> None:
        self.topics = tuple(topics)
        self.limit = limit  # records per partition number
        self.max_bytes = max_bytes  # bytes over all partitions
        self.pausable = pausable  # the reader stops reading what `pause` names
        self._queues: dict[tuple[str, int], deque[Record]] = {}
        self._held: dict[int, int] = {}  # partition -> records held
        self._held_bytes: dict[int, int] = {}  # partition -> bytes held
        self.buffered = 0
        self.buffered_bytes = 0
        self.pause: frozenset[tuple[str, int]] = frozenset()  # after pop_ready, if pausable

    def push(self, record: Record) -> None:
        self._queues.setdefault((record.topic, record.partition), deque()).append(record)
        self._count(record, 1)

    def queued(self, topic: str, partition: int) -> int:
        q = self._queues.get((topic, partition))
        return len(q) if q else 0

    def pop_ready(self, caught_up: CaughtUp) -> list[Record]:
        """Records that can go to the windows now, in event-time order per partition (and,
        when `pausable`, what to stop reading in `pause`)."""
        out: list[Record] = []
        # the partition holding most bytes first: it is the one to release when over budget
        for partition in sorted(self._held, key=lambda p: (-self._held_bytes[p], p)):
            out += self._release(partition, caught_up)
        if self.pausable:
            self.pause = self._to_pause()
        return out

    def drop(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget buffered records of revoked partitions (the new owner re-reads them)."""
        for key in partitions:
            for record in self._queues.pop(key, ()):
                self._count(record, -1)
        self.pause = frozenset(k for k in self.pause if self.queued(*k))

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
        """Past a limit."""
        return self._held.get(partition, 0) > self.limit or self.buffered_bytes > self.max_bytes

    def _to_pause(self) -> frozenset[tuple[str, int]]:
        """After a release, every partition still holding records waits on a topic: the
        topic-partitions holding them, in partitions over a limit."""
        return frozenset(key for key, q in self._queues.items() if q and self._over(key[1]))

    def _release(self, partition: int, caught_up: CaughtUp) -> list[Record]:
        queues = [self._queues.get((t, partition)) for t in self.topics]
        out: list[Record] = []
        while True:
            heads = []
            for topic, q in zip(self.topics, queues, strict=True):
                if q:
                    heads.append((q[0].timestamp_ms, topic, q))
                elif (self.pausable or not self._over(partition)) and not caught_up(
                    topic, partition
                ):
                    return out  # this topic may still hold earlier records: wait for it
            if not heads:
                return out
            _, _, q = min(heads, key=lambda h: (h[0], h[1]))
            out.append(q.popleft())
            self._count(out[-1], -1)
