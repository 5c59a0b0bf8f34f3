"""Clocks, injectable: the wall clock in milliseconds (idle timeouts, batching delays,
latency), monotonic seconds for durations and pacing, and the `Pacer` that spaces records
by their timestamps.

Event time always comes from the records; code that needs a clock takes one so tests
advance time instead of sleeping (pipeline/testing.py has the fakes).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable

from pipeline.records import OnCounts, Record, record_size

Clock = Callable[[], int]  # wall-clock milliseconds
Seconds = Callable[[], float]  # monotonic seconds (time.monotonic)
Sleep = Callable[[float], object]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Pacer:
    """Spaces records by their timestamps divided by `speed` (None: no waiting).

    The first timestamped record anchors the schedule: a record stamped `ts` is due at
    `anchor_clock + (ts - anchor_ts) / 1000 / speed`. Waiting for the due time (never for
    a record already late, nor one without timestamp, -1) keeps time spent sending from
    adding up: the schedule does not drift."""

    def __init__(self, speed: float | None, clock: Seconds, sleep: Sleep) -> None:
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number (None: max speed), got {speed}")
        self.speed = speed
        self.clock = clock
        self.sleep = sleep
        self._anchor: tuple[int, float] | None = None  # (timestamp_ms, clock seconds)
        self.slept_s = 0.0  # total asked of `sleep`

    def delay(self, timestamp_ms: int) -> float:
        """Seconds to wait now before sending a record stamped `timestamp_ms`."""
        if self.speed is None or timestamp_ms < 0:
            return 0.0
        now = self.clock()
        if self._anchor is None:
            self._anchor = (timestamp_ms, now)
            return 0.0
        anchor_ts, anchor_clock = self._anchor
        due = anchor_clock + (timestamp_ms - anchor_ts) / 1000.0 / self.speed
        return max(0.0, due - now)

    def wait(self, timestamp_ms: int) -> None:
        seconds = self.delay(timestamp_ms)
        if seconds > 0:
            self.slept_s += seconds
            self.sleep(seconds)


def send_paced(
    records: Iterable[Record],
    send: Callable[[Record], None],
    pacer: Pacer,
    stop: threading.Event,
    progress: OnCounts,
) -> tuple[int, int]:
    """Hand each record to `send` once the pacer says it is due; stops when `stop` is set.
    Returns (records, bytes) sent."""
    n = size = 0
    for record in records:
        pacer.wait(record.timestamp_ms)
        if stop.is_set():
            break
        send(record)
        n, size = n + 1, size + record_size(record)
        progress(n, size)
    return n, size
