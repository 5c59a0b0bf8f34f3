"""A sink's bounded retry queue and the thread that empties it.

    queue = SinkQueue("webhook", target, Limits(...), metrics)   # starts its thread
    queue.offer(record)      # never blocks: appended, or past the limit the oldest dropped
    queue.close()            # at shutdown: a few seconds to deliver what is queued

Records go out in order, one at a time; a failed delivery is tried again after a delay that
doubles from `retry_initial_ms` up to `retry_max_ms`, until it succeeds or the record is
older than `max_age_ms`. The queue holds at most `max_queued` records: past that an
offer drops the oldest *update* (the open and close of an incident matter more), or the
oldest record when none is an update. Every drop is counted
(`iotfuse_sink_dropped_total{sink,reason}`) and logged (at most once a minute per reason).
The pipeline only ever calls `offer`: a slow or dead target never slows it down.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pipeline.clock import Clock, wall_clock_ms
from pipeline.incidents.records import IncidentRecord
from pipeline.logs import Throttle
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)


class SinkError(Exception):
    """A delivery failed; the queue tries it again later. The message says why."""


class Target(Protocol):
    """Where a sink delivers: raises SinkError when a record could not be delivered."""

    def deliver(self, record: IncidentRecord) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_queued: int = 10000
    max_age_ms: int = 3_600_000
    retry_initial_ms: int = 500
    retry_max_ms: int = 30000


@dataclass(slots=True)
class _Queued:
    record: IncidentRecord
    queued_at_ms: int


class SinkQueue:
    def __init__(
        self,
        name: str,
        target: Target,
        limits: Limits,
        metrics: Metrics,
        clock: Clock = wall_clock_ms,
        *,
        start: bool = True,
    ) -> None:
        self.name = name
        self.target = target
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self._queue: deque[_Queued] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._retry_at_ms = 0  # the head's next try
        self._delay_ms = 0  # the delay after the next failure (0: the first)
        self._said = Throttle(log)
        self._queued = metrics.labelled(metrics.sink_queued, name)
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"iotfuse-sink-{name}")
            self._thread.daemon = True
            self._thread.start()

    # -- the pipeline's side ------------------------------------------------------------
    def offer(self, record: IncidentRecord) -> None:
        """Queue a record for delivery; O(1) unless the queue is full."""
        with self._cond:
            if len(self._queue) >= self.limits.max_queued:
                self._drop_one()
            self._queue.append(_Queued(record, self.clock()))
            self._queued.set(len(self._queue))
            self._cond.notify()

    def _drop_one(self) -> None:
        victim = next((q for q in self._queue if q.record.change == "update"), self._queue[0])
        self._queue.remove(victim)
        self._dropped(
            "queue_full",
            victim.record,
            f"{self.limits.max_queued} records queued (sinks.max_queued)",
        )

    def _dropped(self, reason: str, record: IncidentRecord, why: str) -> None:
        self.metrics.sink_dropped.labels(sink=self.name, reason=reason).inc()
        self._said.log(
            logging.WARNING,
            reason,
            "%s sink: dropped %s of incident %s (%s): %s",
            self.name,
            record.change,
            record.incident_id,
            reason,
            why,
        )

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- the sink's thread --------------------------------------------------------------
    def step(self) -> float | None:
        """Try the head of the queue once if it is due. Returns how many seconds to wait
        before the next step (None: the queue is empty). The thread loops on it; tests
        call it directly with a fake clock."""
        with self._cond:
            if not self._queue:
                return None
            now = self.clock()
            head = self._queue[0]
            if now - head.queued_at_ms > self.limits.max_age_ms:
                self._queue.popleft()
                self._queued.set(len(self._queue))
                self._dropped(
                    "too_old", head.record, f"not delivered in {self.limits.max_age_ms} ms"
                )
                self._retry_at_ms = self._delay_ms = 0
                return 0.0
            if now < self._retry_at_ms:
                return (self._retry_at_ms - now) / 1000
        try:
            self.target.deliver(head.record)  # without the lock: offers go on meanwhile
        except SinkError as exc:
            return self._failed(head, exc)
        with self._cond:
            if self._queue and self._queue[0] is head:
                self._queue.popleft()
            self._queued.set(len(self._queue))
            self._retry_at_ms = self._delay_ms = 0
        self.metrics.labelled(self.metrics.sink_sent, self.name).inc()
        return 0.0

    def _failed(self, head: _Queued, exc: SinkError) -> float:
        self.metrics.labelled(self.metrics.sink_retries, self.name).inc()
        lim = self.limits
        self._delay_ms = min(max(self._delay_ms * 2, lim.retry_initial_ms), lim.retry_max_ms)
        self._retry_at_ms = self.clock() + self._delay_ms
        self._said.log(
            logging.WARNING,
            "failed",
            "%s sink: delivery failed (%s); %d records queued, retrying in %.1f s",
            self.name,
            exc,
            self.queued,
            self._delay_ms / 1000,
        )
        return self._delay_ms / 1000

    def _run(self) -> None:
        while True:
            wait = self.step()
            with self._cond:
                if self._stopping:
                    return
                if wait is None:
                    self._cond.wait()
                elif wait > 0:
                    self._cond.wait(wait)

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued within `timeout_s` (the target willing), then stop; what
        is left is dropped, counted and logged."""
        deadline = self.clock() + int(timeout_s * 1000)
        if self._thread is not None:
            with self._cond:
                self._cond.notify()
            while self.queued and self.clock() < deadline and self._thread.is_alive():
                with self._cond:
                    self._cond.wait(0.05)
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join(timeout=max(0.0, (deadline - self.clock()) / 1000) + 1.0)
        with self._cond:
            left, self._queue = list(self._queue), deque()
            self._queued.set(0)
        for q in left:
            self._dropped("stopped", q.record, "still queued when the worker stopped")
        self.target.close()
