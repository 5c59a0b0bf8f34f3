"""Co-partitioned topics are merged in event time before windowing."""

from __future__ import annotations

from pipeline.align import Aligner
from pipeline.records import Record


def rec(topic: str, ts: int, partition: int = 0) -> Record:
    return Record(topic, partition, ts, ts, b"d", b"v")


def test_backlog_of_one_topic_waits_for_the_others_then_merges_by_time() -> None:
    a = Aligner(("cam", "tel"))
    for ts in (0, 100, 200, 300):
        a.push(rec("tel", ts))
    # the camera partition has not been read yet: nothing may pass
    assert a.pop_ready(lambda t, p: t != "cam") == []
    for ts in (50, 250):
        a.push(rec("cam", ts))
    out = a.pop_ready(lambda t, p: False)
    # releases while both topics have a head; stops when cam is empty and not caught up
    assert [(r.topic, r.timestamp_ms) for r in out] == [
        ("tel", 0), ("cam", 50), ("tel", 100), ("tel", 200), ("cam", 250)]
    assert [r.timestamp_ms for r in a.pop_ready(lambda t, p: True)] == [300]
    assert a.buffered == 0


def test_caught_up_topics_do_not_hold_records_back() -> None:
    a = Aligner(("cam", "aud", "tel"))
    a.push(rec("tel", 10))
    assert [r.timestamp_ms for r in a.pop_ready(lambda t, p: True)] == [10]


def test_partitions_are_aligned_independently_and_memory_is_bounded() -> None:
    a = Aligner(("cam", "tel"), limit=3)
    a.push(rec("tel", 5, partition=1))
    for ts in range(5):
        a.push(rec("tel", ts, partition=0))
    out = a.pop_ready(lambda t, p: False)
    # partition 0 exceeds the limit and releases down to it; partition 1 waits for cam
    assert [(r.partition, r.timestamp_ms) for r in out] == [(0, 0), (0, 1)]
    a.drop([("tel", 0)])
    assert a.buffered == 1
    assert [r.timestamp_ms for r in a.flush()] == [5]
