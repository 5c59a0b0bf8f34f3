"""The aligner's question to the Kafka worker: is this topic-partition read to its end now?

The aligner (pipeline/stream/align.py) holds a partition's records back until every input topic
of that partition has a record buffered or nothing more to read. "Nothing more to read" is
answered here, once per poll and topic-partition, from the consumer's position and the
broker's end offsets, asked on a client of its own (on the consumer's connection the
request queued behind the fetch in flight, 60 ms a call while draining a backlog).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.errors import IllegalStateError, KafkaError

from pipeline.stream.align import Aligner

LOG_END_TIMEOUT_MS = 5000  # a log-end query waits this long for an unreachable broker
READ_THROUGH_TIMEOUT_MS = 1000  # and ReadThrough's, asked more often, this long


class LogEnd:
    def __init__(
        self,
        fetch: Any,
        offsets: Any,
        aligner: Aligner,
        on_error: Callable[[str, KafkaError], None],
    ) -> None:
        """`fetch` gives positions and highwaters (pipeline/kafka/fetch.py), `offsets` end
        offsets (a kafka-python KafkaConsumer); `on_error` takes a broker error that trying
        later may fix."""
        self.fetch, self.offsets, self.aligner, self.on_error = (
            fetch,
            offsets,
            aligner,
            on_error,
        )
        self.owned: set[TopicPartition] = set()
        self._end_offsets: dict[TopicPartition, int] = {}  # asked this poll
        self._caught: dict[tuple[str, int], bool] = {}  # per poll: consumer.position is slow

    def new_poll(self, owned: set[TopicPartition]) -> None:
        """A poll returned: forget this poll's answers; `owned` is the assignment now."""
        self.owned = owned
        self._end_offsets.clear()
        self._caught.clear()

    def caught_up(self, topic: str, partition: int) -> bool:
        """Nothing more to read now (asked once per poll: the aligner asks per record)."""
        key = (topic, partition)
        caught = self._caught.get(key)
        if caught is None:
            caught = self._caught[key] = self.at_log_end(TopicPartition(topic, partition))
        return caught

    def at_log_end(self, tp: TopicPartition) -> bool:
        """The position is at the partition's end offset as the broker reports it now.

        The highwater of the last fetch is not enough: a partition whose records were still
        buffered from an older fetch keeps that fetch's highwater, and trusting it released
        other topics' newer records ahead of its unfetched ones, which then arrived late
        (a sixth of the frames at 100 live devices). So the broker is asked, once per poll
        and partition, with every owned partition with nothing buffered here at that moment;
        a partition whose buffered records ran out later in the same poll is asked then (it
        was once taken as caught up without asking). A fetcher that learns the log end with
        every fetch answer (librdkafka: `Fetch.fetched_end`) is not asked: that round trip
        each poll held the main thread while a fleet's windows closed (docs/performance.md)."""
        if tp not in self.owned:
            return True
        try:
            position = self.fetch.position(tp)
        except IllegalStateError:  # revoked meanwhile: its records are dropped next step
            return True
        if position < (self.fetch.highwater(tp) or 0):
            return False
        fetched = self.fetch.fetched_end(tp)
        if fetched is not None:
            return bool(position >= fetched)
        if tp not in self._end_offsets:
            idle = {
                p
                for p in self.owned
                if p not in self._end_offsets and not self.aligner.queued(p.topic, p.partition)
            }
            self._end_offsets.update(self.end_offsets(sorted(idle | {tp})))
        end = self._end_offsets.get(tp)
        return end is not None and bool(position >= end)

    def end_offsets(
        self,
        partitions: list[TopicPartition],
        call: str = "log_end",
        timeout_ms: int = LOG_END_TIMEOUT_MS,
    ) -> dict[TopicPartition, int]:
        """End offsets; none while the broker cannot be reached (not caught up: the aligner
        keeps what it holds until it can tell); `call` names the query to `on_error`."""
        try:
            try:
                return dict(self.offsets.end_offsets(partitions, timeout_ms))
            except KeyError:  # kafka-python: a partition the offsets client has no metadata
                return dict(self.fetch.end_offsets(partitions, timeout_ms))  # yet
        except KafkaError as exc:
            self.on_error(call, exc)
            return {}


class ReadThrough:
    """The wall time up to which the worker has read every input partition it owns: the
    clock of idle timeouts (`Engine.tick`).

    A device is silent when nothing of it is in the log, not when nothing of it was read:
    while the broker is away, or a partition lags, records sit unread. Timed by the wall
    clock alone, an 8 s broker outage closed every device's open window (idle timeout 5 s)
    without the records still unread in the log, and each event counted only part of its
    window. So the broker's end offset of each owned partition is asked (at most every
    `every_ms`), and once the position reaches it, the partition is read through the moment
    it was asked. While the broker cannot answer, or the worker lags, this clock stands.
    An unanswered query is tried again `retry_ms` later.
    """

    def __init__(
        self, log_end: LogEnd, clock: Callable[[], int], every_ms: int = 250, retry_ms: int = 2000
    ) -> None:
        self.log_end, self.clock = log_end, clock
        self.every_ms, self.retry_ms = every_ms, retry_ms
        self._asked: dict[TopicPartition, tuple[int, int]] = {}  # end offset, wall ms asked
        self._through: dict[TopicPartition, int] = {}  # wall ms read through
        self._next_ask = clock()

    def __call__(self, owned: set[TopicPartition]) -> int | None:
        """Wall ms up to which every partition in `owned` is read; None: not known yet."""
        for tp in set(self._asked) | set(self._through):
            if tp not in owned:
                self._asked.pop(tp, None)
                self._through.pop(tp, None)
        self._reached()
        now = self.clock()
        unasked = sorted(tp for tp in owned if tp not in self._asked)
        if unasked and now >= self._next_ask:
            ends = self.log_end.end_offsets(unasked, "read_through", READ_THROUGH_TIMEOUT_MS)
            self._next_ask = now + self.every_ms if ends else self.clock() + self.retry_ms
            self._asked.update({tp: (end, now) for tp, end in ends.items()})
            self._reached()
        if not owned or any(tp not in self._through for tp in owned):
            return None
        return min(self._through[tp] for tp in owned)

    def _reached(self) -> None:
        """Partitions whose position reached the end offset asked: read through then."""
        for tp, (end, asked) in list(self._asked.items()):
            try:
                position = self.log_end.fetch.position(tp)
            except IllegalStateError:  # revoked meanwhile (kafka-python rebalances on its
                del self._asked[tp]  # own thread): the next assignment decides
                self._through.pop(tp, None)
                continue
            if position >= end:
                self._through[tp] = asked
                del self._asked[tp]
