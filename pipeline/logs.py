"""Concise structured logging: one line per event, text or JSON, rate-limited where a
hostile or broken producer could otherwise flood the log.

- `setup_logging`: the root handler on stderr; kafka-python's per-task slowness warnings
  (a busy machine, not a fault) go to debug;
- `Throttle`: at most one line per class of event a period, with the count it held back;
- `capture_native_stderr`: what native libraries print on file descriptor 2 (libpng,
  libjpeg, OpenCV) becomes rate-limited log lines instead of raw text in the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts_ms": int(record.created * 1000),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is logged, not when it was created:
    a redirected or captured stderr that is later closed never breaks logging."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _SlowTaskToDebug(logging.Filter):
    """kafka-python warns whenever one of its I/O tasks ran over 0.1 s: on a busy machine
    that is every second, and says nothing an operator can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Task "):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at `level`; replaces an earlier call's handler and keeps all others."""
    handler = StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    selector = logging.getLogger("kafka.net.selector")
    if not any(isinstance(f, _SlowTaskToDebug) for f in selector.filters):
        selector.addFilter(_SlowTaskToDebug())


class Throttle:
    """At most one log line per key every `period_s`; the next one says how many were held
    back. Thread-safe; the clock is injectable (monotonic seconds)."""

    def __init__(
        self,
        logger: logging.Logger,
        period_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger, self.period_s, self.clock, self.max_keys = logger, period_s, clock, max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, held back since)
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged within the period; True if logged."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.period_s:
                self._last[key] = (last[0], last[1] + 1)
                return False
            if len(self._last) >= self.max_keys:  # bounded: forget the oldest keys
                for old in sorted(self._last, key=lambda k: self._last[k][0])[: self.max_keys // 2]:
                    del self._last[old]
            held = last[1] if last is not None else 0
            self._last[key] = (now, 0)
        suffix = f" ({held} more like it in the last {self.period_s:g} s)" if held else ""
        self.logger.log(level, msg + suffix, *args)
        return True


_NUMBERS = re.compile(r"\d+")
_native: threading.Thread | None = None


def native_class(line: str) -> str:
    """What makes two native messages the same class: the text, numbers left out."""
    return _NUMBERS.sub("N", line.strip())[:120]


def capture_native_stderr(throttle: Throttle | None = None) -> None:
    """Route what native code writes to file descriptor 2 into the log, one line per class
    of message a minute (`native_class`), and keep Python's own stderr on the original
    destination. Idempotent; meant for long-running commands (`run`)."""
    global _native
    if _native is not None:
        return
    log = logging.getLogger("iotfuse.native")
    limiter = throttle or Throttle(log)
    original = os.dup(2)
    sys.stderr.flush()
    sys.stderr = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                text = line.strip()
                if text:
                    limiter.log(logging.WARNING, native_class(text), "native library: %s", text)

    _native = threading.Thread(target=pump, name="native-stderr", daemon=True)
    _native.start()
