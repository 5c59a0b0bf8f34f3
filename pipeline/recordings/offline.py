"""Recording -> events without Kafka: `iotfuse replay FILE --offline --out EVENTS.jsonl`.

    with open("events.jsonl", "w") as events:
        result = replay_offline("run.iotrec", engine, events, dead_letters=None,
                                topic_map={"t.camera": "iot.camera"}, progress=show)

The records go through exactly what a live replay goes through, minus the broker:
`merge_by_time` orders them across (topic, partition) streams as `iotfuse replay` does
before sending (each stream kept in file order), the topic map renames them, and
`run_offline` (pipeline/stream/assembly.py) drives the same `Engine` the Kafka worker
drives: decode, align, windows, encoders, fusion. End of the recording closes every window (no idle
timeouts: no wall clock is involved). Each event is written as the exact JSON value the
worker would publish, one per line; dead letters as one JSON line each: original key,
topic, partition, offset, timestamp, stage, reason and message (not the payload).

Records recorded without an offset (-1, e.g. from the simulator) are numbered 0, 1, ...
per (topic, partition) in file order, as a broker numbers them on replay: the engine
tells records apart by position, and a dead letter then names which record it was.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from pipeline.recordings.file import open_recording
from pipeline.recordings.merge import merge_by_time
from pipeline.records import Record, record_size
from pipeline.stream.assembly import run_offline
from pipeline.stream.engine import Engine
from pipeline.stream.outputs import Output

LOOKAHEAD_BYTES = 64 * 1024 * 1024  # records held to merge streams by timestamp


@dataclass(slots=True)
class OfflineCounts:
    """Running totals, updated as the replay goes (progress callbacks read them)."""

    records: int = 0  # read from the recording
    bytes: int = 0  # key, value and header bytes read
    inputs: int = 0  # records of the pipeline's input topics (after the topic map)
    events: int = 0
    dead_letters: int = 0
    other_topics: dict[str, int] = field(default_factory=dict)  # skipped: not inputs


@dataclass(frozen=True, slots=True)
class OfflineResult:
    counts: OfflineCounts
    elapsed_s: float
    truncated_at: int | None  # the recording is cut short here (a crash while recording)


Progress = Callable[[OfflineCounts], None]


def dead_letter_json(out: Output) -> dict[str, Any]:
    """A dead letter as one JSON object: where the record came from and why it was
    rejected, from the contract's `iotfuse.error.*` headers; not its value."""
    headers = {
        k: (v or b"").decode("utf-8", "replace")
        for k, v in out.headers
        if k.startswith("iotfuse.error.")  # the worker's own, never an input's
    }
    entry: dict[str, Any] = {"key": None}
    if out.key is not None:
        try:
            entry["key"] = out.key.decode("utf-8")
        except UnicodeDecodeError:
            entry["key_base64"] = base64.b64encode(out.key).decode("ascii")
    entry |= {
        "topic": headers.get("iotfuse.error.topic"),
        "partition": int(headers.get("iotfuse.error.partition", "-1")),
        "offset": int(headers.get("iotfuse.error.offset", "-1")),
        "timestamp_ms": int(headers.get("iotfuse.error.timestamp", "-1")),
        "stage": headers.get("iotfuse.error.stage"),
        "reason": headers.get("iotfuse.error.reason"),
        "message": headers.get("iotfuse.error.message"),
    }
    return entry


def _inputs(
    blocks: Iterable[list[Record]],
    topic_map: Mapping[str, str],
    inputs: frozenset[str],
    counts: OfflineCounts,
) -> Iterator[Record]:
    for rec in merge_by_time(blocks, LOOKAHEAD_BYTES):
        counts.records += 1
        counts.bytes += record_size(rec)
        topic = topic_map.get(rec.topic, rec.topic)
        if topic in inputs:
            counts.inputs += 1
        else:
            counts.other_topics[topic] = counts.other_topics.get(topic, 0) + 1
        yield rec if topic == rec.topic else replace(rec, topic=topic)


def _write(
    out: Output, engine: Engine, events: TextIO, dead_letters: TextIO | None, counts: OfflineCounts
) -> None:
    if out.topic == engine.cfg.events_topic:
        assert out.value is not None
        events.write(out.value.decode("utf-8") + "\n")  # the published bytes, unchanged
        counts.events += 1
    elif out.topic == engine.cfg.deadletter_topic:  # incidents are not written offline
        if dead_letters is not None:
            dead_letters.write(json.dumps(dead_letter_json(out), ensure_ascii=False) + "\n")
        counts.dead_letters += 1


def replay_offline(
    source: str | os.PathLike[str],
    engine: Engine,
    events: TextIO,
    dead_letters: TextIO | None = None,
    *,
    topic_map: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> OfflineResult:
    """Run the recording through `engine`; events (and dead letters) as JSON lines."""
    started = clock()
    counts = OfflineCounts()
    inputs = frozenset(engine.cfg.ingest.topics)

    def on_record(_n: int) -> None:
        if progress is not None:
            progress(counts)

    with open_recording(source) as reader:
        records = _inputs(reader.iter_blocks(), topic_map or {}, inputs, counts)
        for out in run_offline(engine, records, on_record):
            _write(out, engine, events, dead_letters, counts)
        truncated_at = reader.truncated_at if reader.truncated else None
    events.flush()
    if dead_letters is not None:
        dead_letters.flush()
    return OfflineResult(counts, clock() - started, truncated_at)
