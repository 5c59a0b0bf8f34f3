"""Bounded decompression of record batches (issue 19, part 2): what a compressed batch may
cost before it is refused, for every codec, through kafka-python's own batch reader."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import pytest
import zstandard
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from pipeline.kafka import decompress
from pipeline.kafka.decompress import (
    GZIP,
    LZ4,
    MAX_BATCH_BYTES,
    SNAPPY,
    ZSTD,
    BatchTooLarge,
    UnsupportedCompression,
)

MiB = 1 << 20


def gzip_zeros(n: int) -> bytes:
    """n zeros, gzip, made a MiB at a time (never held whole)."""
    c = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return b"".join(c.compress(bytes(MiB)) for _ in range(n // MiB)) + c.flush()


def batch(compression: int, values: list[bytes]) -> MemoryRecords:
    """A record batch as a producer makes it (magic 2; base offset 0, a broker's is real)."""
    decompress.install()
    builder = MemoryRecordsBuilder(2, compression, batch_size=1 << 30)
    for i, value in enumerate(values):
        builder.append(1_000 + i, b"dev-1", value)
    builder.close()
    return MemoryRecords(bytes(builder.records()._buffer))


def read(records: MemoryRecords) -> list[bytes]:
    return [r.value for r in records.next_batch()]


@pytest.mark.parametrize("compression", [GZIP, ZSTD, LZ4, SNAPPY])
def test_batches_within_the_bound_read_as_before(compression: int) -> None:
    """Every codec a producer may choose is read (lz4 and snappy are dependencies: a
    librdkafka or Java producer using them must not see its records dead-lettered)."""
    values = [b'{"t": %d}' % i for i in range(1000)] + [bytes(3 * MiB)]
    assert read(batch(compression, values)) == values


def test_a_gzip_bomb_is_refused_without_decompressing_it_whole() -> None:
    """256 MiB of zeros in a 261 KB gzip batch: kafka-python held it decompressed, then a
    copy, then the record's value (3 x 256 MiB). Now decompression stops past 64 MiB."""
    bomb = gzip_zeros(256 * MiB)
    assert len(bomb) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(BatchTooLarge) as refused:
            decompress.decompress(GZIP, bomb, 7, 9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_BATCH_BYTES * 9 // 8 + 2 * MiB  # the buffer grows by an eighth
    assert (refused.value.first, refused.value.last) == (7, 9)
    assert isinstance(refused.value, CorruptRecordError)  # the worker's unreadable path


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_a_batch_past_the_bound_is_refused_by_kafka_pythons_reader(compression: int) -> None:
    records = batch(compression, [b"ok", bytes(MAX_BATCH_BYTES)])
    with pytest.raises(BatchTooLarge, match="offsets 0-1"):
        read(records)


def test_zstd_frames_asking_for_a_huge_window_are_refused() -> None:
    """A frame may declare a window of up to 2 GiB, which the decompressor allocates."""
    params = zstandard.ZstdCompressionParameters(window_log=30)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = stream.compress(bytes(MiB)) + stream.flush()  # no content size: the window holds
    with pytest.raises(CorruptRecordError, match="too much memory"):
        decompress.decompress(ZSTD, frame, 0, 0)


def test_multi_member_and_padded_gzip_read_like_kafka_python() -> None:
    data = gzip.compress(b"abc") + gzip.compress(b"def") + b"\x00" * 8
    assert decompress.gunzip(data, 100) == b"abcdef"


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:10] + b"\xff" * 20])
def test_damaged_batches_are_corrupt_records(damage) -> None:
    data = gzip.compress(bytes(range(256)) * 100)
    with pytest.raises(CorruptRecordError):
        decompress.decompress(GZIP, damage(data), 0, 0)


@pytest.mark.parametrize("compression", [LZ4, SNAPPY, 5])
def test_a_codec_without_its_library_is_unsupported_not_a_crash(compression: int) -> None:
    """kafka-python raised UnsupportedCodecError from poll(), which is no CorruptRecordError:
    an lz4 batch stopped the worker at every start. Now it is dead-lettered."""
    try:
        out = decompress.decompress(compression, b"\x00" * 16, 3, 5)
    except UnsupportedCompression as exc:
        assert (exc.first, exc.last) == (3, 5)
    except CorruptRecordError:
        assert compression != 5  # the library is here: 16 zeros are no valid stream
    else:
        raise AssertionError(f"decoded {out!r}")
