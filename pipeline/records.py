"""The one record type that flows through pipeline/: a Kafka record, source-agnostic.

Kafka consumers, recordings and the in-memory test source all produce `Record`s, so
everything downstream (decoding, windowing, sinks) is plain functions over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # event time: the Kafka record timestamp, integer milliseconds
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default=())

    def header(self, name: str) -> bytes | None:
        """The last value of header `name` (case-insensitive), or None."""
        lowered = name.lower()
        found: bytes | None = None
        for k, v in self.headers:
            if k.lower() == lowered:
                found = v
        return found
