"""A Kafka producer with bounded in-flight data and acknowledgements handed to one thread.

kafka-python 3 no longer caps its own buffer memory, so every producer in iotfuse goes
through this: once `max_in_flight_bytes` are sent but not acknowledged, `send` waits for
the broker (flush) before taking more. Acknowledgements arrive on the client's I/O
thread; they are queued, with the wall-clock time they arrived, and handed out by
`completed()` on the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from kafka import KafkaProducer

from pipeline.clock import Clock, wall_clock_ms
from pipeline.records import Headers, payload_bytes

T = TypeVar("T")


class BoundedProducer(Generic[T]):
    def __init__(
        self, producer: KafkaProducer, max_in_flight_bytes: int, clock: Clock = wall_clock_ms
    ) -> None:
        self.producer = producer
        self.max_in_flight_bytes = max_in_flight_bytes
        self.clock = clock
        self._done: queue.SimpleQueue[tuple[T, BaseException | None, int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.peak_in_flight = 0

    @property
    def in_flight_bytes(self) -> int:
        with self._lock:
            return self._in_flight

    def send(
        self,
        token: T,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> None:
        size = payload_bytes(key, value, headers)
        if self.in_flight_bytes + size > self.max_in_flight_bytes and self.in_flight_bytes:
            self.producer.flush()  # wait for the broker instead of buffering without bound
        with self._lock:
            self._in_flight += size
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        future = self.producer.send(
            topic,
            value=value,
            key=key,
            headers=list(headers),
            timestamp_ms=timestamp_ms,
            partition=partition,
        )
        future.add_callback(self._on_done, token, size, None)
        future.add_errback(self._on_error, token, size)

    def _on_done(self, token: T, size: int, _err: None, _metadata: Any) -> None:
        self._finish(token, size, None)

    def _on_error(self, token: T, size: int, exc: BaseException) -> None:
        self._finish(token, size, exc)

    def _finish(self, token: T, size: int, exc: BaseException | None) -> None:
        with self._lock:
            self._in_flight -= size
        self._done.put((token, exc, self.clock()))

    def completed(self) -> Iterator[tuple[T, BaseException | None]]:
        """Acknowledged (error None) or failed sends since the last call."""
        for token, exc, _at_ms in self.completed_at():
            yield token, exc

    def completed_at(self) -> Iterator[tuple[T, BaseException | None, int]]:
        """As `completed`, with the wall-clock time (ms) each acknowledgement arrived."""
        while True:
            try:
                yield self._done.get_nowait()
            except queue.Empty:
                return

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)
