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
from kafka.errors import KafkaError

from pipeline.stream.align import Aligner

LOG_END_TIMEOUT_MS = 5000  # a log-end query waits this long for an unreachable broker


class LogEnd:
    def __init__(
        self,
        consumer: Any,
        offsets: Any,
        aligner: Aligner,
        on_error: Callable[[str, KafkaError], None],
    ) -> None:
        """`consumer` gives positions and highwaters, `offsets` end offsets (kafka-python
        KafkaConsumers); `on_error` takes a broker error that trying later may fix."""
        self.consumer, self.offsets, self.aligner, self.on_error = (
            consumer,
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
        was once taken as caught up without asking)."""
        if tp not in self.owned:
            return True
        position = self.consumer.position(tp)
        if position < (self.consumer.highwater(tp) or 0):
            return False
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
        self, partitions: list[TopicPartition], call: str = "log_end"
    ) -> dict[TopicPartition, int]:
        """End offsets; none while the broker cannot be reached (not caught up: the aligner
        keeps what it holds until it can tell); `call` names the query to `on_error`."""
        try:
            try:
                return dict(self.offsets.end_offsets(partitions, LOG_END_TIMEOUT_MS))
            except KeyError:  # kafka-python: a partition the offsets client has no metadata
                return dict(self.consumer.end_offsets(partitions, LOG_END_TIMEOUT_MS))  # yet
        except KafkaError as exc:
            self.on_error(call, exc)
            return {}
