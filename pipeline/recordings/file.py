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
and recovery: docs/recording-format.md; framing: pipeline/recordings/format.py.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO, Self

import zstandard

from pipeline.recordings.format import (
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
    "RecordingVersionError",
    "RecordingWriter",
    "open_recording",
    "read_records",
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
