"""Reading the incidents topic from its start, group-less (`iotfuse incidents`, the demo).

read_committed, so a reader of an `--exactly-once` worker's incidents never sees those of
an aborted transaction; `caught_up` tells when what was there at the start has been read.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from kafka import KafkaConsumer, TopicPartition

from pipeline.errors import UserError
from pipeline.kafka.config import recorder_config
from pipeline.settings import KafkaSettings


class IncidentLog:
    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._consumer = KafkaConsumer(**recorder_config(kafka))  # no group, no commits
        try:
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                raise UserError(
                    f"topic {topic} does not exist on {kafka.bootstrap_servers}: create the "
                    "contract's topics with `iotfuse topics`, or check topics.incidents"
                )
            self._tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            self._consumer.assign(self._tps)
            self._consumer.seek_to_beginning(*self._tps)
            self._end = self._consumer.end_offsets(self._tps)
        except BaseException:
            self._consumer.close()
            raise

    def poll(self, timeout_ms: int) -> list[bytes]:
        """The values that arrived within `timeout_ms`, in each partition's order."""
        batches = self._consumer.poll(timeout_ms=timeout_ms).values()
        return [m.value for messages in batches for m in messages if m.value is not None]

    def caught_up(self) -> bool:
        """Whether everything the topic held when this reader started has been read."""
        return all(self._consumer.position(tp) >= self._end[tp] for tp in self._tps)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
