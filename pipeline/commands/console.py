"""What every command shows a person and how it stops: progress lines and signals.

- `ProgressLine`: records, bytes, rate (and events) on one updating line, rate-limited;
- `stop_on_signals`: SIGINT/SIGTERM set an event the command's loop watches;
- `interrupt_on_signals`: SIGINT/SIGTERM interrupt a start that should be abandoned.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO


class ProgressLine:
    """Records, bytes and rate (and events, if given) on `stream`: one updating line on a
    terminal, else a line every `interval_s` (default 5 s). Call it with running totals;
    it rate-limits itself."""

    def __init__(
        self,
        verb: str,
        stream: TextIO,
        *,
        total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float | None = None,
    ) -> None:
        self.verb = verb
        self.stream = stream
        self.total = total
        self.clock = clock
        self.tty = stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.25 if self.tty else 5.0)
        self._start = self._last = clock()
        self._last_counts = (0, 0)

    def __call__(self, records: int, nbytes: int, events: int | None = None) -> None:
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        seconds = now - self._last
        last_records, last_bytes = self._last_counts
        rate = ((records - last_records) / seconds, (nbytes - last_bytes) / seconds)
        self._last, self._last_counts = now, (records, nbytes)
        self._show(self._text(records, nbytes, rate, now - self._start, events), final=False)

    def finish(self, records: int, nbytes: int, events: int | None = None) -> None:
        elapsed = max(self.clock() - self._start, 1e-9)
        rate = (records / elapsed, nbytes / elapsed)
        self._show(self._text(records, nbytes, rate, elapsed, events), final=True)

    def _text(
        self,
        records: int,
        nbytes: int,
        rate: tuple[float, float],
        elapsed: float,
        events: int | None,
    ) -> str:
        share = f" of {self.total:,}" if self.total is not None else ""
        made = f", {events:,} events" if events is not None else ""
        return (
            f"{self.verb}: {records:,}{share} records, {nbytes / 1e6:,.1f} MB,"
            f" {rate[0]:,.0f} records/s, {rate[1] / 1e6:,.1f} MB/s{made}, {elapsed:,.1f} s"
        )

    def _show(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


@contextmanager
def stop_on_signals(
    say: Callable[[str], object] | None = None, *, abort_on_second: bool = True
) -> Iterator[threading.Event]:
    """An event set by the first SIGINT/SIGTERM; `say` gets the signal's name (default: a
    line on stderr). A second signal interrupts at once unless `abort_on_second` is off."""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set() and abort_on_second:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if say is None:
            print(f"\n{name}: finishing the current block; again to abort", file=sys.stderr)
        else:
            say(name)
        # from another thread: Event.set here could deadlock with a stop.wait() it interrupts
        threading.Thread(target=stop.set, daemon=True).start()

    with _handlers(handle):
        yield stop


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (a start to abandon)."""
    with _handlers(signal.default_int_handler):
        yield


@contextmanager
def _handlers(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
