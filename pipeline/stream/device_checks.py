"""Two mistakes of a device's producer that the engine processes anyway and reports once per
device: a clock far ahead of this worker's, and a device spread over partitions."""

from __future__ import annotations

import logging

from pipeline.metrics import Metrics
from pipeline.records import Record

log = logging.getLogger(__name__)

FUTURE_WARN_MS = 60_000  # event time this far past the wall clock: the device clock is off


class DeviceChecks:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._partition_reported: set[str] = set()
        self._clock_reported: set[str] = set()

    def clock(self, device: str, ts_ms: int, now: int) -> None:
        """Processed as the contract says (event time is the record's timestamp), but its
        modality's watermark then runs ahead, and once every modality the device sends does,
        the device's records are late until real time catches up: count it, and say so once
        per device."""
        if ts_ms - now <= FUTURE_WARN_MS:
            return
        self.metrics.future_records.inc()
        if device not in self._clock_reported:
            self._clock_reported.add(device)
            log.warning(
                "device %s sent a record stamped %.0f s ahead of this worker's clock; windows "
                "close by event time, so its records may be late (dropped) until real time "
                "catches up. Check the device's clock, or a producer stamping microseconds",
                device,
                (ts_ms - now) / 1000,
            )

    def partition(self, device: str, record: Record, seen: int) -> None:
        """`seen`: the partition the device's records came on first."""
        if seen != record.partition and device not in self._partition_reported:
            self._partition_reported.add(device)
            self.metrics.copartition_violations.inc()
            log.warning(
                "device %s arrives on partition %d of %s but on partition %d elsewhere: the "
                "input topics are not co-partitioned (producers use different partitioners?). "
                "Its windows may be split across workers; use the murmur2 partitioner "
                "(librdkafka: partitioner=murmur2_random) and equal partition counts.",
                device,
                record.partition,
                record.topic,
                seen,
            )

    def forget(self, device: str) -> None:
        self._partition_reported.discard(device)
        self._clock_reported.discard(device)
