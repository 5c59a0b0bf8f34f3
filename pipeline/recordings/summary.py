"""`iotfuse inspect`'s first pass: what a recording holds, in one streaming read.

Counts, devices and time span per topic, and a content digest that is equal for two
recordings of the same per-partition streams however they were interleaved.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from pipeline.recordings.file import Source, open_recording
from pipeline.recordings.format import append_record
from pipeline.records import Record


@dataclass(frozen=True, slots=True)
class TopicSummary:
    topic: str
    records: int
    value_bytes: int
    partitions: frozenset[int]
    devices: frozenset[str]  # distinct keys, UTF-8 (undecodable bytes backslash-escaped)
    keyless_records: int
    min_timestamp_ms: int
    max_timestamp_ms: int


@dataclass(frozen=True, slots=True)
class RecordingSummary:
    source: str
    format_version: int | None
    records: int
    blocks: int
    bytes_read: int  # file header and whole blocks
    truncated: bool
    truncated_at: int | None
    topics: dict[str, TopicSummary]  # by topic name, sorted
    min_timestamp_ms: int | None
    max_timestamp_ms: int | None
    digest: str  # "sha256:<hex>", equal for recordings of the same per-partition streams
    offset_order_violations: int  # records whose offset is not above the previous one


class _TopicStats:
    __slots__ = ("devices", "keyless", "max_ts", "min_ts", "partitions", "records", "value_bytes")

    def __init__(self, timestamp_ms: int) -> None:
        self.records = 0
        self.value_bytes = 0
        self.partitions: set[int] = set()
        self.devices: set[bytes] = set()
        self.keyless = 0
        self.min_ts = self.max_ts = timestamp_ms

    def add(self, record: Record) -> None:
        self.records += 1
        if record.value is not None:
            self.value_bytes += len(record.value)
        self.partitions.add(record.partition)
        if record.key is None:
            self.keyless += 1
        else:
            self.devices.add(record.key)
        self.min_ts = min(self.min_ts, record.timestamp_ms)
        self.max_ts = max(self.max_ts, record.timestamp_ms)

    def freeze(self, topic: str) -> TopicSummary:
        devices = frozenset(k.decode("utf-8", "backslashreplace") for k in self.devices)
        return TopicSummary(
            topic, self.records, self.value_bytes, frozenset(self.partitions), devices,
            self.keyless, self.min_ts, self.max_ts,
        )  # fmt: skip


class _Stream:
    __slots__ = ("count", "hasher", "last_offset")

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.count = 0
        self.last_offset: int | None = None


_DIGEST_DOMAIN = b"iotfuse.recording-digest/v1\n"


def _combined_digest(streams: dict[tuple[str, int], _Stream]) -> str:
    digest = hashlib.sha256(_DIGEST_DOMAIN)
    for topic, partition in sorted(streams):
        stream = streams[topic, partition]
        name = topic.encode("utf-8")
        digest.update(struct.pack("<H", len(name)) + name)
        digest.update(struct.pack("<iQ", partition, stream.count) + stream.hasher.digest())
    return "sha256:" + digest.hexdigest()


def summarize(source: Source) -> RecordingSummary:
    """Topics, counts, devices, time span and content digest of a recording.

    Memory grows with the number of topics, partitions and devices, not records. The
    digest hashes each (topic, partition) stream in file order, then combines the streams
    sorted by (topic, partition): it equals the digest of all records sorted by (topic,
    partition, offset) whenever each partition was recorded in offset order (counted in
    `offset_order_violations` otherwise), and ignores how streams were interleaved."""
    topics: dict[str, _TopicStats] = {}
    streams: dict[tuple[str, int], _Stream] = {}
    names: dict[str, bytes] = {}
    scratch = bytearray()
    violations = 0
    with open_recording(source) as reader:
        for block in reader.iter_blocks():
            for record in block:
                stats = topics.get(record.topic)
                if stats is None:
                    stats = topics[record.topic] = _TopicStats(record.timestamp_ms)
                stats.add(record)
                stream = streams.get((record.topic, record.partition))
                if stream is None:
                    stream = streams[record.topic, record.partition] = _Stream()
                if stream.last_offset is not None and record.offset <= stream.last_offset:
                    violations += 1
                stream.last_offset = record.offset
                stream.count += 1
                scratch.clear()
                append_record(scratch, record, names)
                stream.hasher.update(scratch)
        frozen = {name: topics[name].freeze(name) for name in sorted(topics)}
        return RecordingSummary(
            source=reader.name,
            format_version=reader.version,
            records=reader.records_read,
            blocks=reader.blocks_read,
            bytes_read=reader.position,
            truncated=reader.truncated,
            truncated_at=reader.truncated_at,
            topics=frozen,
            min_timestamp_ms=min((t.min_timestamp_ms for t in frozen.values()), default=None),
            max_timestamp_ms=max((t.max_timestamp_ms for t in frozen.values()), default=None),
            digest=_combined_digest(streams),
            offset_order_violations=violations,
        )
