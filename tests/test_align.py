"""Co-partitioned topics are merged in event time before windowing."""

from __future__ import annotations

from pipeline.records import Record
from pipeline.stream.align import Aligner


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
        ("tel", 0),
        ("cam", 50),
        ("tel", 100),
        ("tel", 200),
        ("cam", 250),
    ]
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


def big(topic: str, ts: int, partition: int, nbytes: int) -> Record:
    return Record(topic, partition, ts, ts, None, b"x" * nbytes)


def test_a_backlog_of_large_records_is_bounded_in_bytes_largest_partition_first() -> None:
    # far under the record limit, over the byte budget: 100-byte values, budget 1,000 bytes
    a = Aligner(("cam", "tel"), max_bytes=1000)
    for ts in range(6):
        a.push(big("cam", ts, partition=0, nbytes=100))
    for ts in range(8):
        a.push(big("cam", ts, partition=1, nbytes=100))
    assert (a.buffered, a.buffered_bytes) == (14, 1400)
    out = a.pop_ready(lambda t, p: False)  # tel never read yet: only the budget releases
    # partition 1 holds more: its oldest records go until the whole is back within budget
    assert [(r.partition, r.timestamp_ms) for r in out] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert (a.buffered, a.buffered_bytes) == (10, 1000)
    assert a.pop_ready(lambda t, p: False) == []  # within budget: waits for tel again
    a.push(big("cam", 6, partition=0, nbytes=100))
    # over again: partition 0, now the larger (700 bytes against 400), gives its oldest
    assert [(r.partition, r.timestamp_ms) for r in a.pop_ready(lambda t, p: False)] == [(0, 0)]
    a.push(big("tel", 3, partition=0, nbytes=50))
    # over by 50 bytes; partition 0 has both topics now and merges them in event time
    out = a.pop_ready(lambda t, p: False)
    assert [(r.topic, r.timestamp_ms) for r in out] == [
        ("cam", 1),
        ("cam", 2),
        ("cam", 3),
        ("tel", 3),
    ]
    assert (a.buffered, a.buffered_bytes) == (7, 700)


def test_dropped_partitions_give_their_bytes_back() -> None:
    a = Aligner(("cam", "tel"), max_bytes=1000)
    for ts in range(3):
        a.push(big("cam", ts, partition=0, nbytes=100))
    a.push(big("tel", 0, partition=1, nbytes=10))
    a.drop([("cam", 0)])
    assert (a.buffered, a.buffered_bytes) == (1, 10)


def test_over_the_byte_budget_the_worker_releases_nothing_early_and_pauses_what_waits() -> None:
    """Issue 19.3: the byte budget is shared. Two partitions of 600 bytes each, budget 1,000:
    released without waiting, partition 0's camera went ahead of its telemetry, which was
    still unread, although the bytes came from both. A pausable aligner (the Kafka worker)
    releases nothing out of order; it names what to stop reading instead, never the
    telemetry it waits for, and merges in order once that arrives."""
    released = Aligner(("cam", "tel"), max_bytes=1000)
    paused = Aligner(("cam", "tel"), max_bytes=1000, pausable=True)
    for a in (released, paused):
        for ts in range(6):
            a.push(big("cam", 10 + ts, partition=0, nbytes=100))
            a.push(big("cam", 10 + ts, partition=1, nbytes=100))
    assert [r.timestamp_ms for r in released.pop_ready(lambda t, p: False)] == [10, 11]
    assert paused.pop_ready(lambda t, p: False) == []
    assert paused.pause == {("cam", 0), ("cam", 1)}
    paused.push(big("tel", 12, partition=0, nbytes=10))
    out = paused.pop_ready(lambda t, p: False)
    assert [(r.topic, r.timestamp_ms) for r in out] == [
        ("cam", 10),
        ("cam", 11),
        ("cam", 12),
        ("tel", 12),
    ]
    assert paused.pause == frozenset()  # 910 bytes left: under the budget, read on


def test_over_the_record_limit_the_worker_pauses_the_flooding_topic_not_the_late_one() -> None:
    """One device floods telemetry while its partition's camera is still being read: the
    telemetry is paused, the camera read on, and the merge stays in event-time order."""
    a = Aligner(("cam", "tel"), limit=3, pausable=True)
    for ts in range(10):
        a.push(rec("tel", ts))
    assert a.pop_ready(lambda t, p: t == "tel") == []
    assert a.pause == {("tel", 0)}
    a.push(rec("cam", 4))
    assert [(r.topic, r.timestamp_ms) for r in a.pop_ready(lambda t, p: t == "tel")] == [
        ("tel", 0),
        ("tel", 1),
        ("tel", 2),
        ("tel", 3),
        ("cam", 4),
    ]
    assert a.pause == {("tel", 0)}  # 6 held, still over: the camera goes on being read
    a.push(rec("cam", 20))
    assert len(a.pop_ready(lambda t, p: False)) == 6
    assert a.pause == frozenset() and a.buffered == 1  # the camera record waits for tel


def test_a_revoked_partition_is_no_longer_paused() -> None:
    a = Aligner(("cam", "tel"), limit=1, pausable=True)
    for ts in range(3):
        a.push(rec("tel", ts, partition=2))
    a.pop_ready(lambda t, p: False)
    assert a.pause == {("tel", 2)}
    a.drop([("tel", 2)])
    assert a.pause == frozenset()
