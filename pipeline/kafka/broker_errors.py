"""Broker errors the Kafka worker waits out instead of stopping.

A commit (and the flush before it), a log-end or a lag query that fails with a retriable
error is counted (`iotfuse_broker_errors_total`, by call), said at most every 10 s, and
tried again later by its caller; any other error is raised.
"""

from __future__ import annotations

import logging

from kafka.errors import KafkaError

from pipeline.clock import Clock
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)


class BrokerErrors:
    """The `on_error` of the worker's broker calls (see the module docstring)."""

    def __init__(self, metrics: Metrics, clock: Clock, bootstrap_servers: str) -> None:
        self.metrics, self.clock, self.bootstrap_servers = metrics, clock, bootstrap_servers
        self._last_warning_ms = -10_000

    def __call__(self, call: str, exc: KafkaError) -> None:
        """A retriable broker error where trying again later is safe: count it, and say so
        at most every 10 s; anything else is raised."""
        if not exc.retriable:
            raise exc
        self.metrics.labelled(self.metrics.broker_errors, call).inc()
        now = self.clock()
        if now - self._last_warning_ms >= 10_000:
            self._last_warning_ms = now
            log.warning(
                "%s failed (%r); retrying. Is the broker reachable at %s? Nothing is "
                "lost: uncommitted input is read again after a restart",
                call,
                exc,
                self.bootstrap_servers,
            )
