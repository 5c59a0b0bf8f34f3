"""The "read to the log end?" answer (pipeline/kafka/log_end.py) the aligner asks per partition,
and the wall time up to which the input is read (`ReadThrough`, the idle timeouts' clock).

Pure logic: the consumer's position and highwater and the broker's end offsets are given
as the clients would report them (the path through a real broker is in
test_pipeline_kafka.py and test_offline_equals_live.py).
"""

from __future__ import annotations

from kafka import TopicPartition
from kafka.errors import IllegalStateError, KafkaConnectionError, KafkaError

from pipeline.kafka.log_end import LogEnd, ReadThrough
from pipeline.stream.align import Aligner
from pipeline.testing import FakeClock
from tests.factory import T0, record

CAM, TEL = TopicPartition("cam", 0), TopicPartition("tel", 0)


class Clients:
    """position/highwater as the consumer saw them; end_offsets as the broker has them."""

    def __init__(
        self, position: dict, highwater: dict, log_end: dict, fetched: dict | None = None
    ) -> None:
        self.pos, self.high, self.log_end = position, highwater, log_end
        self.fetched = fetched or {}  # what the fetcher knows of the log end without asking
        self.asked: list[list[TopicPartition]] = []
        self.down = False  # the broker cannot be reached

    def position(self, tp: TopicPartition) -> int:
        if tp not in self.pos:
            raise IllegalStateError("Partition is not assigned")
        return self.pos[tp]

    def highwater(self, tp: TopicPartition) -> int:
        return self.high[tp]

    def fetched_end(self, tp: TopicPartition) -> int | None:
        return self.fetched.get(tp)

    def end_offsets(
        self, partitions: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        self.asked.append(list(partitions))
        if self.down:
            raise KafkaConnectionError("socket disconnected")
        return {tp: self.log_end[tp] for tp in partitions}


def log_end_with(clients: Clients, aligner: Aligner) -> LogEnd:
    def no_broker_errors(call: str, exc: Exception) -> None:
        raise AssertionError(f"{call}: {exc!r}")

    log_end = LogEnd(clients, clients, aligner, no_broker_errors)
    log_end.new_poll({CAM, TEL})
    return log_end


def test_a_partition_drained_later_in_a_poll_is_checked_against_the_log_end() -> None:
    # telemetry: everything fetched so far (20) is buffered in the aligner, but the broker
    # holds 5 more; camera: read to its end
    clients = Clients({CAM: 10, TEL: 20}, {CAM: 10, TEL: 20}, {CAM: 10, TEL: 25})
    aligner = Aligner(("cam", "tel"))
    aligner.push(record("tel", "d", T0, b"{}"))
    log_end = log_end_with(clients, aligner)
    assert log_end.at_log_end(CAM)
    assert clients.asked == [[CAM]]  # telemetry had records buffered: not asked then
    aligner.pop_ready(lambda _t, _p: True)  # its buffer runs out within the same poll
    assert not log_end.at_log_end(TEL)  # 5 records still to fetch: not caught up
    assert clients.asked == [[CAM], [TEL]]
    assert log_end.at_log_end(CAM)  # asked once per poll and partition
    assert len(clients.asked) == 2


def test_the_fetched_highwater_alone_decides_when_records_are_still_unread() -> None:
    clients = Clients({CAM: 4, TEL: 20}, {CAM: 10, TEL: 20}, {CAM: 10, TEL: 20})
    log_end = log_end_with(clients, Aligner(("cam", "tel")))
    assert not log_end.at_log_end(CAM) and clients.asked == []
    assert log_end.at_log_end(TEL) and clients.asked == [[CAM, TEL]]  # every idle one


def test_a_fetcher_that_knows_the_log_end_is_not_asked_again() -> None:
    """librdkafka keeps a fetch of each partition waiting at the broker and takes the log end
    from every answer: a round trip per poll to ask the same held the worker's main thread.
    A partition it does not fetch (paused) is asked."""
    clients = Clients({CAM: 10, TEL: 20}, {CAM: 10, TEL: 20}, {CAM: 10, TEL: 25}, {CAM: 10})
    log_end = log_end_with(clients, Aligner(("cam", "tel")))
    assert log_end.at_log_end(CAM) and clients.asked == []
    assert not log_end.at_log_end(TEL)  # no fetch of it waits (paused): the broker is asked
    assert clients.asked == [[CAM, TEL]]  # (with every partition idle here, as always)
    clients.fetched[TEL] = 25  # fetched now: 5 records to hand out
    log_end.new_poll({CAM, TEL})
    assert not log_end.at_log_end(TEL) and len(clients.asked) == 1


def read_through_with(clients: Clients, clock: FakeClock) -> tuple[ReadThrough, list[str]]:
    errors: list[str] = []

    def broker_error(call: str, exc: KafkaError) -> None:
        errors.append(call)

    log_end = LogEnd(clients, clients, Aligner(("cam", "tel")), broker_error)
    return ReadThrough(log_end, clock, every_ms=250, retry_ms=2000), errors


def test_the_input_is_read_through_when_asked_once_the_position_reaches_that_end() -> None:
    clock = FakeClock(10_000)
    clients = Clients({CAM: 10, TEL: 20}, {}, {CAM: 10, TEL: 25})
    through, _ = read_through_with(clients, clock)
    assert through({CAM, TEL}) is None  # telemetry: 5 records to read
    clients.log_end[TEL] = 40  # the devices go on producing while the worker reads
    clock.now += 300
    clients.pos[TEL] = 25
    assert through({CAM, TEL}) == 10_000  # read through what the broker held at 10_000
    clock.now += 300
    clients.pos[TEL] = 40
    assert through({CAM, TEL}) == 10_600  # reached what was asked at 10_300; asked again
    clients.log_end[TEL] = 50
    clock.now += 300
    assert through({CAM, TEL}) == 10_600  # telemetry lags again
    assert through({CAM}) == 10_900  # a partition lost counts no more


def test_while_the_broker_is_away_the_read_through_time_stands() -> None:
    clock = FakeClock(10_000)
    clients = Clients({CAM: 10, TEL: 20}, {}, {CAM: 10, TEL: 20})
    through, errors = read_through_with(clients, clock)
    assert through({CAM, TEL}) == 10_000
    clients.down = True
    for _ in range(40):  # 20 s without an answer: the idle timeout (5 s) must not pass
        clock.now += 500
        assert through({CAM, TEL}) == 10_000
    assert len(errors) == 10  # asked again every retry_ms, each failure counted
    clients.down = False
    clients.log_end[TEL] = 30  # what the devices sent meanwhile
    clock.now += 2000
    assert through({CAM, TEL}) == 10_000  # not read yet
    clients.pos[TEL] = 30
    assert through({CAM, TEL}) == clock.now


def test_a_partition_revoked_under_the_worker_is_not_waited_for() -> None:
    """kafka-python rebalances on its own thread: a partition the worker still counts as its
    own may be gone when its position is asked."""
    clock = FakeClock(10_000)
    clients = Clients({CAM: 10, TEL: 20}, {}, {CAM: 10, TEL: 25})
    through, _ = read_through_with(clients, clock)
    assert through({CAM, TEL}) is None
    del clients.pos[TEL]  # revoked
    clock.now += 300
    assert through({CAM, TEL}) is None  # not known this step: no idle close
    assert through({CAM}) == 10_300  # the next step's assignment
