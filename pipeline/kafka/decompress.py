"""What one compressed record batch may cost the worker: bounded decompression.

kafka-python decompresses a whole record batch into memory (kafka/codec.py) and then copies
it, and every record's value once more. A batch is small on the wire and unbounded
decompressed: one camera record of 1 GiB of zeros fits in a 1 MB gzip batch, which the
camera topic (10 MiB batches) accepts, and took a worker from 910 to 3,708 MiB; 10 MiB of
compressed zeros would be about 10 GiB. Neither the client nor the broker limits it: the
fetch limits count compressed bytes, and a topic's `compression.type` other than
`producer` makes the *broker* decompress the batch to recompress it (the bomb then costs
the broker's heap instead; `iotfuse topics` leaves it at `producer`).

`install()` replaces how kafka-python's batches decompress (gzip, zstd, lz4, snappy), for
every consumer of this process: output is produced in chunks of at most 1 MiB and the batch
is refused once it passes `MAX_BATCH_BYTES` decompressed (64 MiB: six times the largest
record a client of ours fetches, and far more than any batch of the contract's records a
producer makes), before the rest is decompressed. Decompressed batches go straight into
the buffer kafka-python reads records from (no second copy). A refused batch raises
`BatchTooLarge`, a batch in a codec this process cannot read `UnsupportedCompression`: both
are kafka-python's `CorruptRecordError`, raised from `poll()`, so the worker's
unreadable-record path (pipeline/kafka/unreadable.py) dead-letters the batch's records by
position and reads on past it. Peak memory for one batch: `MAX_BATCH_BYTES` plus the
records copied out of it (a poll's records, at most the batch again).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import kafka.codec as codec
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.legacy_records import LegacyRecordBatch

MAX_BATCH_BYTES = 64 * 1024 * 1024  # decompressed, per record batch
CHUNK_BYTES = 1024 * 1024  # decompressed at a time

GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4
CODECS = {GZIP: "gzip", SNAPPY: "snappy", LZ4: "lz4", ZSTD: "zstd"}


class BatchTooLarge(CorruptRecordError):  # type: ignore[misc]
    """A record batch that decompresses past the limit (offsets first..last)."""

    def __init__(self, codec_name: str, limit: int, first: int, last: int) -> None:
        super().__init__(
            f"a {codec_name} record batch (offsets {first}-{last}) decompresses to more than "
            f"{limit} bytes; it was not decompressed further"
        )
        self.first, self.last = first, last


class UnsupportedCompression(CorruptRecordError):  # type: ignore[misc]
    """A record batch in a codec this process has no library for (offsets first..last)."""

    def __init__(self, codec_name: str, first: int, last: int) -> None:
        super().__init__(
            f"a record batch (offsets {first}-{last}) is compressed with {codec_name}, which "
            "this worker cannot read"
        )
        self.first, self.last = first, last


class _Over(Exception):
    """Decompressed output passed the limit."""


def _grow(out: bytearray, chunk: bytes, limit: int) -> None:
    if len(out) + len(chunk) > limit:
        raise _Over
    out += chunk


def gunzip(data: bytes, limit: int) -> bytearray:
    """gzip (one member or several, as kafka-python's reader takes them), at most `limit`
    bytes out; raises _Over past it, ValueError for a damaged or truncated stream."""
    out = bytearray()
    rest = data
    while rest.strip(b"\x00"):  # zero padding after the last member is allowed
        d = zlib.decompressobj(zlib.MAX_WBITS | 16)
        pending = rest
        while True:
            try:
                chunk = d.decompress(pending, CHUNK_BYTES)
            except zlib.error as exc:
                raise ValueError(f"damaged gzip data: {exc}") from exc
            _grow(out, chunk, limit)
            pending = d.unconsumed_tail
            if d.eof or (not chunk and not pending):
                break
        if not d.eof:
            raise ValueError("truncated gzip data")
        rest = d.unused_data
    return out


def unzstd(data: bytes, limit: int) -> bytearray:
    import zstandard

    out = bytearray()
    # the window a frame may ask for is bounded too: a bomb cannot make it allocate 2 GiB
    dctx = zstandard.ZstdDecompressor(max_window_size=limit)
    try:
        with dctx.stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
            while chunk := reader.read(CHUNK_BYTES):
                _grow(out, chunk, limit)
    except zstandard.ZstdError as exc:
        raise ValueError(f"damaged zstd data: {exc}") from exc
    return out


def unlz4(data: bytes, limit: int) -> bytearray:
    try:
        import lz4.frame
    except ImportError as exc:
        raise _Unsupported from exc
    out = bytearray()
    rest = data
    while rest:
        d = lz4.frame.LZ4FrameDecompressor()
        pending = rest
        try:
            while not d.eof:
                chunk = d.decompress(pending, CHUNK_BYTES)
                _grow(out, chunk, limit)
                pending = b""
                if not chunk and d.needs_input:
                    raise ValueError("truncated lz4 data")
        except RuntimeError as exc:
            raise ValueError(f"damaged lz4 data: {exc}") from exc
        rest = d.unused_data
    return out


def _varint(data: bytes, pos: int) -> int:
    """A little-endian base-128 varint (a raw snappy block's uncompressed length)."""
    result, shift = 0, 0
    while pos < len(data) and shift < 35:
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        pos, shift = pos + 1, shift + 7
    raise ValueError("damaged snappy data: bad length")


def unsnappy(data: bytes, limit: int) -> bytearray:
    """Raw snappy, or xerial-framed blocks (Java clients): each block's uncompressed length
    is read from its header and summed before anything is decompressed."""
    if not codec.has_snappy():
        raise _Unsupported
    blocks = []
    if codec._detect_xerial_stream(data):
        pos = 16
        while pos < len(data):
            (size,) = struct.unpack_from("!i", data, pos)
            blocks.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
    else:
        blocks.append(data)
    if sum(_varint(block, 0) for block in blocks) > limit:
        raise _Over
    out = bytearray()
    for block in blocks:
        try:
            plain = codec.snappy.decompress(block)
        except Exception as exc:  # python-snappy/cramjam: their own error types
            raise ValueError(f"damaged snappy data: {exc}") from None
        _grow(out, plain, limit)
    return out


class _Unsupported(Exception):
    """No library for this codec here."""


DECODERS: dict[int, Callable[[bytes, int], bytearray]] = {
    GZIP: gunzip,
    SNAPPY: unsnappy,
    LZ4: unlz4,
    ZSTD: unzstd,
}


def decompress(compression: int, data: bytes, first: int, last: int) -> bytearray:
    """A batch's records section decompressed, within MAX_BATCH_BYTES; kafka-python's
    CorruptRecordError (BatchTooLarge, UnsupportedCompression) otherwise."""
    name = CODECS.get(compression, f"codec {compression}")
    decoder = DECODERS.get(compression)
    if decoder is None:
        raise UnsupportedCompression(name, first, last)
    try:
        return decoder(data, MAX_BATCH_BYTES)
    except _Over:
        pass  # raised below, out of this block: no traceback keeps the partial output alive
    except _Unsupported:
        raise UnsupportedCompression(name, first, last) from None
    except ValueError as exc:
        raise CorruptRecordError(f"record batch (offsets {first}-{last}): {exc}") from None
    raise BatchTooLarge(name, MAX_BATCH_BYTES, first, last)


def _default_maybe_uncompress(self: Any) -> None:
    """DefaultRecordBatch._maybe_uncompress, bounded (magic 2: every Kafka >= 0.11 batch)."""
    if not self._decompressed:
        compression = self.compression_type
        if compression != self.CODEC_NONE:
            data = bytes(memoryview(self._buffer)[self._pos :])
            self._buffer = decompress(compression, data, self.base_offset, self.last_offset)
            self._pos = 0
    self._decompressed = True


def _legacy_decompress(self: Any, key_offset: int) -> bytearray:
    """LegacyRecordBatch._decompress, bounded (magic 0 and 1: brokers before 0.11)."""
    pos = key_offset
    (key_size,) = struct.unpack_from(">i", self._buffer, pos)
    pos += self.KEY_LENGTH + max(key_size, 0)
    (value_size,) = struct.unpack_from(">i", self._buffer, pos)
    pos += self.VALUE_LENGTH
    if value_size == -1:
        raise CorruptRecordError("Value of compressed message is None")
    data = bytes(self._buffer[pos : pos + value_size])
    compression = self.compression_type
    if compression == LZ4 and self._magic == 0:
        raise UnsupportedCompression("lz4 (Kafka 0.8 framing)", self._offset, self._offset)
    return decompress(compression, data, self._offset, self._offset)


def install() -> None:
    """Bound decompression for every kafka-python consumer of this process (idempotent)."""
    DefaultRecordBatch._maybe_uncompress = _default_maybe_uncompress
    LegacyRecordBatch._decompress = _legacy_decompress
