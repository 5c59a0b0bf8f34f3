"""Recordings: files of Kafka records of any topics, replayable exactly.

    with RecordingWriter("run.iotrec") as writer:
        writer.write(record)          # buffered; a block is written every ~1 MiB
        writer.flush()                # call every few seconds: a crash loses only the
                                      # records written since the last flush
    with open_recording("run.iotrec") as reader:
        for record in reader: ...
        if reader.truncated: ...      # cut short by a crash; all whole blocks were read

The writer writes straight to its path (no temporary file and rename), so a recording
cut short by a crash still reads up to its last whole block. Byte layout, integrity
and recovery: docs/recording-format.md; framing: pipeline/recording_format.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

import zstandard

from pipeline.recording_format import (
    MAX_BLOCK_RAW,
    BlockReader,
    RecordingCorruptError,
    RecordingError,
    RecordingVersionError,
    append_record,
    block_payload,
    encode_block_header,
    encode_file_header,
)
from pipeline.records import Record

__all__ = [
    "RecordingCorruptError",
    "RecordingError",
    "RecordingReader",
    "RecordingSummary",
    "RecordingVersionError",
    "RecordingWriter",
    "TopicSummary",
    "open_recording",
    "read_records",
    "summarize",
]

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | BinaryIO
_MAX_BLOCK_BYTES = 1 << 30
_MIN_LEVEL = -(1 << 17)  # zstd's fastest (negative) level


def _source_name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


class RecordingWriter:
    """Writes records to a recording, block by block. Not thread-safe.

    `target` is a path (created; an existing file is an error unless `overwrite`) or a
    binary stream (written from its current position, flushed but never closed here).
    Records are buffered until `block_bytes` of them are encoded, or `flush()`."""

    def __init__(
        self,
        target: Source,
        *,
        block_bytes: int = 1 << 20,
        level: int = 3,
        overwrite: bool = False,
        fsync: bool = False,
    ) -> None:
        if not 1 <= block_bytes <= _MAX_BLOCK_BYTES:
            raise ValueError(f"block_bytes must be in 1..{_MAX_BLOCK_BYTES}, got {block_bytes}")
        if not _MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(
                f"zstd level must be in {_MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}"
                f" (3 is a good default), got {level}"
            )
        self.name = _source_name(target)
        self._file, self._owns_file = self._open(target, overwrite)
        self._block_bytes = block_bytes
        self._fsync = fsync
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._names: dict[str, bytes] = {}
        self._buf = bytearray()
        self._pending = 0
        self._closed = False
        self._failure: BaseException | None = None
        self.records_written = 0  # records accepted by write()
        self.records_flushed = 0  # records in whole blocks handed to the file
        self.blocks_written = 0
        self.bytes_written = 0  # bytes handed to the file (header and whole blocks)
        try:
            self._emit(encode_file_header())
            self._file.flush()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(target: Source, overwrite: bool) -> tuple[BinaryIO, bool]:
        if not isinstance(target, (str, os.PathLike)):
            return target, False
        try:
            return open(target, "wb" if overwrite else "xb"), True
        except FileExistsError as exc:
            raise FileExistsError(
                f"recording {os.fspath(target)} already exists: choose a new path, delete it,"
                " or pass overwrite=True"
            ) from exc

    def write(self, record: Record) -> None:
        """Buffer one record; writes a block once `block_bytes` are buffered."""
        self._check_usable()
        buf = self._buf
        start = len(buf)
        try:
            append_record(buf, record, self._names)
        except (struct.error, TypeError, UnicodeEncodeError, OverflowError) as exc:
            del buf[start:]
            raise ValueError(
                f"cannot record {record.topic!r} partition {record.partition} offset"
                f" {record.offset}: {exc} (topic/header names up to 65535 UTF-8 bytes, key"
                " and value bytes or None under 2 GiB, partition i32, offset and timestamp"
                " i64); the record was not written"
            ) from exc
        except BaseException:
            del buf[start:]  # e.g. KeyboardInterrupt: never leave half a record in a block
            raise
        if len(buf) > MAX_BLOCK_RAW:
            size = len(buf) - start
            del buf[start:]
            raise ValueError(
                f"record {record.topic!r}/{record.partition}@{record.offset} is too large"
                f" to record ({size} bytes encoded); it was not written"
            )
        self._pending += 1
        self.records_written += 1
        if len(buf) >= self._block_bytes:
            self._write_block()

    def flush(self) -> None:
        """Write the buffered records as a block and flush the file (fsync if asked)."""
        self._check_usable()
        self._write_block()
        try:
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        except BaseException as exc:
            self._failure = exc
            raise

    def close(self) -> None:
        """Flush the last block and close the file (if this writer opened it)."""
        if self._closed:
            return
        try:
            if self._failure is None:
                self.flush()
        finally:
            self._closed = True
            if self._owns_file:
                self._file.close()

    @property
    def pending_records(self) -> int:
        """Records buffered in memory, not yet in the file."""
        return self._pending

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise RecordingError(f"recording {self.name} is closed; open a new writer")
        if self._failure is not None:
            raise RecordingError(
                f"an earlier write to recording {self.name} failed ({self._failure!r}); the"
                " file reads up to its last whole block: start a new recording"
            )

    def _write_block(self) -> None:
        if not self._pending:
            return
        raw = self._buf
        codec, payload = block_payload(raw, self._compressor)
        self._emit(encode_block_header(payload, len(raw), self._pending, codec))
        self._emit(payload)
        self.records_flushed += self._pending
        self.blocks_written += 1
        self._pending = 0
        self._buf = bytearray()

    def _emit(self, data: bytes | bytearray) -> None:
        try:
            self._file.write(data)
        except BaseException as exc:
            self._failure = exc  # a partial block may be in the file: no more blocks after it
            raise
        self.bytes_written += len(data)


class RecordingReader(BlockReader):
    """Reads a recording's records in file order; iterate it once.

    A file cut short (a crash while recording) reads up to its last whole block and then
    sets `truncated` and `truncated_at` (the byte where the cut-off block starts) instead
    of raising. Wrong bytes raise RecordingCorruptError after the blocks before them were
    yielded. Byte positions count from where reading started in `source`."""

    def __init__(self, source: Source) -> None:
        self._owns_file = isinstance(source, (str, os.PathLike))
        if isinstance(source, (str, os.PathLike)):
            stream: BinaryIO = open(source, "rb")  # noqa: SIM115 (closed by close())
        else:
            stream = source
        self._started = False
        try:
            super().__init__(stream, _source_name(source))
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[Record]:
        for block in self.iter_blocks():
            yield from block
            del block  # not alive while the next block is read: one block in memory

    def iter_blocks(self) -> Iterator[list[Record]]:
        """The records block by block (cheaper than one by one for batch consumers)."""
        if self._started:
            raise RecordingError(
                f"recording {self.name} is already being read; a reader iterates once:"
                " open the recording again to re-read it"
            )
        self._started = True
        while True:
            block = self.next_block()
            if block is None:
                return
            yield block
            del block

    def close(self) -> None:
        if self._owns_file:
            self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_recording(source: Source) -> RecordingReader:
    """A reader over a recording (path or binary stream); checks the file header now."""
    return RecordingReader(source)


def read_records(*sources: Source) -> Iterator[Record]:
    """The records of each recording in turn; logs a warning for a truncated one."""
    for source in sources:
        with open_recording(source) as reader:
            yield from reader
            if reader.truncated:
                log.warning(
                    "recording %s is cut short at byte %s (a crash while recording?); read"
                    " its %d records up to there",
                    reader.name,
                    reader.truncated_at,
                    reader.records_read,
                )


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
