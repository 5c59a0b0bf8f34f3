"""kafka-python's consumer records as our `Record`s: the one conversion every reader uses."""

from __future__ import annotations

from typing import Any

from pipeline.records import Record


def to_record(msg: Any) -> Record:
    """A kafka-python ConsumerRecord as a Record (a null header value stays null, a missing
    timestamp becomes -1)."""
    headers = tuple((str(k), None if v is None else bytes(v)) for k, v in msg.headers or ())
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        timestamp_ms=int(msg.timestamp) if msg.timestamp is not None else -1,
        key=msg.key,
        value=msg.value,
        headers=headers,
    )
