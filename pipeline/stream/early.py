"""Early inference: classify complete windows before they close (the engine's spare time).

With `early_inference` (the Kafka worker's spare time only): a window is complete once
every active modality of its device sent a record past its end, but it closes only when
the device's watermark passes it, `allowed_lateness_ms` later (windows.py). Every device's
window ends on the same epoch boundary, so closing is a burst. `Engine.infer_early`
classifies complete windows in that gap (again if a record joins one after that); at close
the result is used as it is unless a record joined the window since (then the window is
classified with its batch). Events carry the same content either way; only the moment of
the work changes, and no output leaves before the window closes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pipeline.decode import RejectedRecord
from pipeline.metrics import Metrics
from pipeline.stream.outputs import Decision
from pipeline.stream.windows import Item, Window

WindowKey = tuple[str, int]  # (device id, window start)


@dataclass(frozen=True, slots=True)
class Classified:
    """A window's classification, and how many items the window had when classified."""

    added: int
    rejected: list[tuple[Item, RejectedRecord]]
    unknown_metrics: int
    decision: Decision


def window_key(window: Window) -> WindowKey:
    return window.device_id, window.start_ms


class EarlyResults:
    """Complete windows waiting for spare time, and the results of those classified early."""

    def __init__(self) -> None:
        self._complete: dict[WindowKey, Window] = {}  # open, end passed, not classified yet
        self._early: dict[WindowKey, Classified] = {}

    def note(self, completed: list[Window], joined: Window | None) -> None:
        """Windows a record completed, and the window it joined: classified early already,
        that one is classified again."""
        self._complete.update((window_key(w), w) for w in completed)
        if joined is not None and window_key(joined) in self._early:
            self._complete[window_key(joined)] = joined

    def take(self, most: int) -> list[Window]:
        """Up to `most` complete windows to classify now (not all of them)."""
        keys = list(itertools.islice(self._complete, most))
        return [self._complete.pop(k) for k in keys]

    def store(self, results: dict[WindowKey, Classified]) -> None:
        self._early |= results

    def valid(self, window: Window) -> bool:
        """The window was classified early and no record joined it since."""
        early = self._early.get(window_key(window))
        return early is not None and early.added == window.added

    def reuse(self, windows: list[Window], metrics: Metrics) -> dict[WindowKey, Classified]:
        """The early results of these closing windows that are still valid; every early
        result of them is counted, used or redone."""
        reused: dict[WindowKey, Classified] = {}
        for w in windows:
            self._complete.pop(window_key(w), None)
            valid = self.valid(w)
            early = self._early.pop(window_key(w), None)
            if early is None:
                continue
            metrics.labelled(metrics.early_windows, "used" if valid else "redone").inc()
            if valid:
                reused[window_key(w)] = early
        return reused

    def forget(self, window: Window) -> None:
        """A window dropped before it closed (its partition was revoked)."""
        self._complete.pop(window_key(window), None)
        self._early.pop(window_key(window), None)
