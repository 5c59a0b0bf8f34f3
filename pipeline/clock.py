"""The wall clock, injectable: used only for idle timeouts, batching delays and latency.

Event time always comes from the records; code that needs the wall clock takes a `Clock`
so tests advance time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], int]  # wall-clock milliseconds


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
