"""The librdkafka fetcher's log end (pipeline/kafka/fetch.py `RdKafkaFetch.fetched_end`).

librdkafka's cached end of a partition is as new as asking the broker only while librdkafka
is fetching it. Trusted after a seek or resume, after a pause, or with the partition's
leader away, it would tell the aligner "read to the end" over records still unread, and
the aligner would let the other topics' records run ahead of them. The fakes stand in for
librdkafka's consumer and the group's; the path through a real broker is in
test_pipeline_kafka.py (every fetcher).
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition as RdTopicPartition
from kafka import TopicPartition

from pipeline.kafka.fetch import FRESH_S, RdKafkaFetch
from pipeline.settings import Settings
from pipeline.testing import FakeSeconds

CAM = TopicPartition("cam", 0)


class Message:
    def __init__(self, tp: TopicPartition, offset: int) -> None:
        self.tp, self._offset = tp, offset

    def topic(self) -> str:
        return str(self.tp.topic)

    def partition(self) -> int:
        return int(self.tp.partition)

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000)

    def key(self) -> bytes:
        return b"dev-0"

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> list[tuple[str, bytes]]:
        return []


class Librdkafka:
    """What librdkafka fetched (`fetched`, handed out by consume) and the end offset of its
    last fetch answer per partition (`high`)."""

    def __init__(self) -> None:
        self.fetched: list[Message] = []
        self.high: dict[tuple[str, int], int] = {}

    def consume(self, n: int, timeout: float) -> list[Message]:
        got, self.fetched = self.fetched[:n], self.fetched[n:]
        return got

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return 0, self.high[(tp.topic, tp.partition)]

    def position(self, tps: list[Any]) -> list[Any]:
        return [RdTopicPartition(tp.topic, tp.partition, -1001) for tp in tps]

    def incremental_assign(self, tps: list[Any]) -> None: ...
    def seek(self, tp: Any) -> None: ...
    def pause(self, tps: list[Any]) -> None: ...
    def resume(self, tps: list[Any]) -> None: ...


class Group:
    """The group's kafka-python consumer: owns CAM, fetches nothing itself."""

    def poll(self, timeout_ms: int) -> dict[Any, Any]:
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {CAM}

    def paused(self) -> set[TopicPartition]:
        return {CAM}

    def pause(self, *tps: TopicPartition) -> None: ...


def test_librdkafka_log_end_counts_only_while_it_is_fetching_the_partition() -> None:
    rd, clock = Librdkafka(), FakeSeconds()
    fetch = RdKafkaFetch(Settings(), Group(), rd, clock)
    fetch.seek(CAM, 10)
    rd.high[("cam", 0)] = 10  # from an earlier fetch: the log may have grown since
    assert fetch.fetched_end(CAM) is None  # nothing handed out since the seek: ask
    rd.fetched = [Message(CAM, 10), Message(CAM, 11)]
    rd.high[("cam", 0)] = 12
    assert len(fetch.poll(100)) == 2
    assert fetch.fetched_end(CAM) == 12  # fetching it: its end is librdkafka's
    clock.now += FRESH_S + 0.1  # nothing since (a quiet partition, or its leader away)
    assert fetch.fetched_end(CAM) is None
    rd.fetched = [Message(CAM, 12)]
    rd.high[("cam", 0)] = 13
    fetch.poll(100)
    assert fetch.fetched_end(CAM) == 13
    fetch.pause(CAM)
    assert fetch.fetched_end(CAM) is None  # no fetch of it waits at the broker
    fetch.resume(CAM)
    assert fetch.fetched_end(CAM) is None  # its end is as old as the pause
    rd.fetched = [Message(CAM, 13)]
    rd.high[("cam", 0)] = 14
    fetch.poll(100)
    assert fetch.fetched_end(CAM) == 14
    fetch.seek(CAM, 5)  # read again from 5 (e.g. regained after a rebalance)
    assert fetch.fetched_end(CAM) is None
