"""A fix to kafka-python 3.0.12: a paused partition's records come back when it resumes.

kafka-python keeps records it had already parsed for a partition when that partition is
paused, and hands them back on resume only while its "current records" slot is None. A
slot whose records were all read is kept, not emptied, so once any other partition's
records were read meanwhile the paused partition's records were never handed back, and
the partition was not fetched again either (its parked records count as pending): it
stopped for good, silently. Pausing all partitions at once (back-pressure) rarely met it;
the worker now pauses single topic-partitions (the aligner's limits,
pipeline/stream/align.py), which met it at once. `install()` empties a drained slot before
each `poll` collects records.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import Fetcher

_fetched_records = Fetcher.fetched_records


def _fetched_records_resuming(self: Any, *args: Any, **kwargs: Any) -> Any:
    current = self._next_partition_records
    if current is not None and not current:  # drained: free the slot for parked records
        self._next_partition_records = None
    return _fetched_records(self, *args, **kwargs)


def install() -> None:
    """For every kafka-python consumer of this process (idempotent)."""
    Fetcher.fetched_records = _fetched_records_resuming
