"""Following a topic from its start, group-less: the demo's events, `iotfuse incidents`."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from kafka import KafkaConsumer

from pipeline.kafka.config import events_reader_config
from pipeline.settings import KafkaSettings


class TopicFollower:
    """Values of `topic`'s records in each partition's order, from the beginning."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._consumer = KafkaConsumer(topic, **events_reader_config(kafka))

    def poll(self, timeout_ms: int) -> list[bytes]:
        """The values that arrived within `timeout_ms` (null values left out)."""
        batches = self._consumer.poll(timeout_ms=timeout_ms).values()
        return [m.value for messages in batches for m in messages if m.value is not None]

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
