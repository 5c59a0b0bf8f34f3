"""Commits never pass a held record; released records let the commit advance."""

from __future__ import annotations

from pipeline.stream.offsets import OffsetTracker
from pipeline.stream.windows import Position


def pos(offset: int, partition: int = 0, topic: str = "t") -> Position:
    return Position(topic, partition, offset)


def test_commit_stops_at_the_lowest_held_offset() -> None:
    t = OffsetTracker()
    for o in range(10, 15):
        t.track(pos(o))
    assert t.committable() == {("t", 0): 10}
    t.release([pos(11), pos(12)])
    assert t.committable() == {("t", 0): 10}  # 10 still held (its window is open)
    t.release([pos(10)])
    assert t.committable() == {("t", 0): 13}
    t.release([pos(14), pos(13)])
    assert t.committable() == {("t", 0): 15}
    assert t.held() == 0


def test_partitions_are_independent() -> None:
    t = OffsetTracker()
    t.track(pos(0, 0))
    t.track(pos(0, 1))
    t.track(pos(1, 1))
    t.release([pos(0, 1), pos(1, 1)])
    assert t.committable() == {("t", 0): 0, ("t", 1): 2}


def test_redelivered_offsets_are_tracked_once_and_forget_drops_a_partition() -> None:
    t = OffsetTracker()
    assert t.track(pos(5))
    assert not t.track(pos(5))
    t.release([pos(5)])
    assert t.committable() == {("t", 0): 6}
    t.track(pos(6))
    t.forget([("t", 0)])
    t.release([pos(6)])  # released after revocation: ignored
    assert t.committable() == {}
