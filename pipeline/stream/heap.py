"""Give the heap's free memory back to the operating system (glibc's `malloc_trim`).

A worker frees almost everything it allocates (records, frames, audio, batches), but glibc
keeps freed memory in its arenas, one per thread that allocates (Kafka clients, frame
decoding, the model), each up to its own high-water mark, and returns little of it on its
own: a worker's RSS grows for minutes after it starts before it settles, and a container's
memory limit counts every byte of it. `HeapTrim` returns the free pages every few seconds
(a few milliseconds of CPU). Where the C library has no `malloc_trim` (musl, macOS) it does
nothing.

`freeze_start_up` keeps Python's collector off what start-up made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

from pipeline.clock import Clock

TRIM_EVERY_MS = 10_000


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrim:
    """Call on every loop step: trims at most once every `every_ms`."""

    def __init__(self, clock: Clock, every_ms: int = TRIM_EVERY_MS) -> None:
        self.clock = clock
        self.every_ms = every_ms
        self._trim = _malloc_trim()
        self._last_ms = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def __call__(self) -> None:
        now = self.clock()
        if self._trim is None or now - self._last_ms < self.every_ms:
            return
        self._last_ms = now
        self._trim(0)
        self.trims += 1


def freeze_start_up() -> None:
    """Move every object start-up made (modules, the model, the clients) out of the cycle
    collector's reach. A full collection walks every object it tracks, modules and model
    included, and stops the main thread meanwhile, while windows wait to close
    (docs/performance.md). What start-up made lives as long as the process; its garbage is
    collected first."""
    gc.collect()
    gc.freeze()
