"""Fakes shared by the tests and the benchmarks: clocks that move only when told, and a
worker running on a thread.

Nothing here imports kafka-python: `WorkerThread` runs anything with `run(stop)` (the
Kafka worker is built by the caller).
"""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar


class FakeClock:
    """A `pipeline.clock.Clock` (wall-clock milliseconds) that moves only when told to."""

    def __init__(self, now: int = 1_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class FakeSeconds:
    """A `pipeline.clock.Seconds` (monotonic seconds) with its `Sleep`: sleeping is
    recorded in `sleeps` and moves the clock, nothing waits."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Runs(Protocol):
    """What `WorkerThread` runs: a loop that returns once `stop` is set (KafkaWorker.run)."""

    def run(self, stop: threading.Event) -> None: ...


W = TypeVar("W", bound=Runs)


class WorkerThread(Generic[W]):
    """`worker.run(stop)` on a daemon thread, started at once and stopped as SIGTERM would
    stop it (the `stop` event). What the worker raised is kept in `error`; `check` raises it."""

    def __init__(self, worker: W) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as exc:  # surfaced by check()
            self.error = exc

    def check(self) -> None:
        """Raise what the worker raised, if it did."""
        if self.error is not None:
            raise self.error

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the worker and wait for it; raises what it raised."""
        self.stop.set()
        self.thread.join(timeout=timeout_s)
        if self.thread.is_alive():
            raise AssertionError("worker did not stop")
        self.check()
