"""Which offsets are safe to commit.

Every consumed record is *tracked* in poll order. It is *released* once nothing more
depends on it: its window's event (or its dead letter) was acknowledged by the broker,
or it was late, or it needs no output at all. The committable offset of a partition is
the lowest offset still held (or one past the last tracked offset when none is held),
so a commit never passes a record that sits in an open window or an unacknowledged
output. Pure logic; the Kafka worker calls it from one thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.stream.windows import Position

TopicPartitionKey = tuple[str, int]


@dataclass(slots=True)
class _Partition:
    pending: deque[int] = field(default_factory=deque)  # tracked offsets, increasing
    released: set[int] = field(default_factory=set)  # released but not yet at the front
    next_offset: int | None = None  # one past the last tracked offset


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartitionKey, _Partition] = {}

    def track(self, pos: Position) -> bool:
        """Start holding a consumed record; False if it was seen before (re-delivered)."""
        part = self._parts.setdefault((pos.topic, pos.partition), _Partition())
        if part.next_offset is not None and pos.offset < part.next_offset:
            return False
        part.pending.append(pos.offset)
        part.next_offset = pos.offset + 1
        return True

    def release(self, positions: Iterable[Position]) -> None:
        for pos in positions:
            part = self._parts.get((pos.topic, pos.partition))
            if part is None:
                continue  # partition was revoked meanwhile; its records will be re-read
            part.released.add(pos.offset)
            while part.pending and part.pending[0] in part.released:
                part.released.discard(part.pending.popleft())

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Offset to commit per partition (the next record to read after a restart)."""
        out: dict[TopicPartitionKey, int] = {}
        for key, part in self._parts.items():
            if part.pending:
                out[key] = part.pending[0]
            elif part.next_offset is not None:
                out[key] = part.next_offset
        return out

    def held(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())

    def forget(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """Partitions revoked: stop tracking them (their uncommitted records are re-read)."""
        for key in partitions:
            self._parts.pop(key, None)
