"""Recording file format: round trip, truncation, corruption, streaming, summary."""

from __future__ import annotations

import io
import logging
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from pipeline.recordings.file import (
    RecordingCorruptError,
    RecordingError,
    RecordingVersionError,
    RecordingWriter,
    open_recording,
    read_records,
)
from pipeline.recordings.format import (
    BLOCK_HEADER,
    CODEC_STORED,
    CODEC_ZSTD,
    FILE_HEADER,
    FILE_MAGIC,
    append_record,
    encode_block_header,
    encode_file_header,
)
from pipeline.recordings.summary import summarize
from pipeline.records import Record


def varied_records(n: int, seed: int = 0) -> list[Record]:
    """Records exercising every field kind (None key/value, binary headers, unicode)."""
    rng = random.Random(seed)
    topics = ["iot.camera", "iot.audio", "iot.telemetry", "iot.ünïcødé.温度"]
    out = []
    for i in range(n):
        headers: tuple[tuple[str, bytes], ...] = ()
        if i % 3 == 1:
            headers = (("content-type", b"image/jpeg"), ("bin\u00e9", bytes(range(256))))
        elif i % 3 == 2:
            headers = (("dup", b""), ("dup", b"\x00\xff"))
        out.append(
            Record(
                topic=topics[i % len(topics)],
                partition=i % 5,
                offset=i * 7 + (1 << 40),
                timestamp_ms=-1 if i % 11 == 0 else 1767225600000 + i,
                key=None if i % 4 == 0 else f"cell-{i % 9}".encode(),
                value=None if i % 6 == 0 else rng.randbytes(rng.randrange(0, 600)),
                headers=headers,
            )
        )
    return out


def write_in_blocks(records: list[Record], per_block: int) -> tuple[bytes, list[int]]:
    """The file bytes, and the byte offset where each block starts (plus the end)."""
    buf = io.BytesIO()
    with RecordingWriter(buf, block_bytes=1 << 30) as writer:
        bounds = [writer.bytes_written]
        for start in range(0, len(records), per_block):
            for record in records[start : start + per_block]:
                writer.write(record)
            writer.flush()
            bounds.append(writer.bytes_written)
        data = buf.getvalue()
    return data, bounds


def read_bytes(data: bytes) -> tuple[list[Record], bool, int | None]:
    with open_recording(io.BytesIO(data)) as reader:
        records = list(reader)
        return records, reader.truncated, reader.truncated_at


def test_round_trip_all_field_kinds(tmp_path: Path) -> None:
    records = varied_records(2000)
    big = Record("iot.camera", 0, 1, 2, b"cam-1", random.Random(1).randbytes(5 << 20), ())
    records.insert(1000, big)
    path = tmp_path / "r.iotrec"
    with RecordingWriter(path, block_bytes=64 << 10) as writer:
        for record in records:
            writer.write(record)
    assert writer.records_written == writer.records_flushed == len(records)
    assert writer.bytes_written == path.stat().st_size
    assert writer.blocks_written > 3
    with open_recording(path) as reader:
        assert list(reader) == records
        assert not reader.truncated
        assert reader.version == 1
        assert reader.position == path.stat().st_size


def test_stream_target_is_flushed_not_closed() -> None:
    records = varied_records(50)
    buf = io.BytesIO()
    with RecordingWriter(buf) as writer:
        for record in records:
            writer.write(record)
    assert not buf.closed
    assert read_bytes(buf.getvalue()) == (records, False, None)


def test_flushed_records_are_readable_while_writer_is_open(tmp_path: Path) -> None:
    records = varied_records(15)
    path = tmp_path / "live.iotrec"
    writer = RecordingWriter(path)
    for record in records[:10]:
        writer.write(record)
    writer.flush()
    for record in records[10:]:
        writer.write(record)
    assert writer.pending_records == 5
    with open_recording(path) as reader:  # what a crash right now would leave
        assert list(reader) == records[:10]
        assert not reader.truncated
    writer.close()
    assert list(read_records(path)) == records


def test_cut_anywhere_in_last_block_reads_whole_blocks() -> None:
    records = varied_records(60)
    data, bounds = write_in_blocks(records, per_block=20)
    last = bounds[-2]
    for cut in range(last + 1, len(data)):
        got, truncated, at = read_bytes(data[:cut])
        assert (got, truncated, at) == (records[:40], True, last), cut


def test_cut_in_middle_blocks_and_header() -> None:
    records = varied_records(100)
    data, bounds = write_in_blocks(records, per_block=20)
    for block, start in enumerate(bounds[:-1]):
        end = bounds[block + 1]
        assert read_bytes(data[:start]) == (records[: block * 20], False, None)
        for cut in (start + 1, start + BLOCK_HEADER.size - 1, start + BLOCK_HEADER.size, end - 1):
            assert read_bytes(data[:cut]) == (records[: block * 20], True, start)
    for cut in range(FILE_HEADER.size):  # crash while the file header was being written
        assert read_bytes(data[:cut]) == ([], True, 0)


def test_zero_filled_tail_reads_as_truncation() -> None:
    records = varied_records(40)
    data, bounds = write_in_blocks(records, per_block=20)
    assert read_bytes(data + bytes(5000)) == (records, True, len(data))
    zeroed_last = data[: bounds[1]] + bytes(len(data) - bounds[1])
    assert read_bytes(zeroed_last) == (records[:20], True, bounds[1])


@pytest.mark.parametrize("where", ["header_length", "header_crc", "payload", "last_payload"])
def test_flipped_byte_raises_corrupt_with_position(where: str) -> None:
    records = varied_records(80)
    data, bounds = write_in_blocks(records, per_block=20)
    block = 3 if where == "last_payload" else 2
    start = bounds[block]
    pos = {
        "header_length": start,
        "header_crc": start + 21,
        "payload": start + BLOCK_HEADER.size + 30,
        "last_payload": bounds[-1] - 1,
    }[where]
    damaged = bytearray(data)
    damaged[pos] ^= 0x40
    seen: list[Record] = []
    reader = open_recording(io.BytesIO(bytes(damaged)))
    with pytest.raises(RecordingCorruptError) as info:
        for record in reader:
            seen.append(record)  # noqa: PERF402 (keep what was yielded before the error)
    assert seen == records[: block * 20]
    assert (info.value.position, info.value.block_index) == (start, block)
    assert f"byte {start}" in str(info.value) and f"block {block}" in str(info.value)
    assert f"head -c {start}" in str(info.value)
    assert read_bytes(data[:start]) == (seen, False, None)  # the advice works


@pytest.mark.parametrize(
    ("codec", "count_delta", "raw_len_delta"),
    [(CODEC_ZSTD, 1, 0), (CODEC_ZSTD, -1, 0), (CODEC_ZSTD, 0, -1), (CODEC_ZSTD, 0, 1),
     (CODEC_STORED, 1, 0), (CODEC_STORED, 0, 1), (7, 0, 0)],
)  # fmt: skip
def test_block_with_valid_checksums_but_wrong_contents_is_corrupt(
    codec: int, count_delta: int, raw_len_delta: int
) -> None:
    records = varied_records(5)
    raw = bytearray()
    for record in records:
        append_record(raw, record, {})
    payload = zstandard.ZstdCompressor().compress(raw) if codec == CODEC_ZSTD else bytes(raw)
    count = len(records) + count_delta
    header = encode_block_header(payload, len(raw) + raw_len_delta, count, codec)
    data = encode_file_header() + header + payload
    with pytest.raises(RecordingCorruptError, match="does not decode") as info:
        read_bytes(data)
    assert (info.value.position, info.value.block_index) == (FILE_HEADER.size, 0)


def block_codecs(data: bytes) -> list[int]:
    codecs, pos = [], FILE_HEADER.size
    while pos < len(data):
        payload_len, _, _, _, codec, _, _ = BLOCK_HEADER.unpack_from(data, pos)
        codecs.append(codec)
        pos += BLOCK_HEADER.size + payload_len
    return codecs


def test_blocks_are_compressed_only_when_it_pays() -> None:
    rng = random.Random(5)
    noisy = [Record("iot.camera", 0, i, i, b"c", rng.randbytes(50_000)) for i in range(60)]
    telemetry = [Record("iot.telemetry", 0, i, i, b"c", b'{"t": %d}' % i) for i in range(30_000)]
    for records, codec in ((noisy, CODEC_STORED), (telemetry, CODEC_ZSTD)):
        buf = io.BytesIO()
        with RecordingWriter(buf) as writer:
            for record in records:
                writer.write(record)
        data = buf.getvalue()
        assert set(block_codecs(data)) == {codec} and len(block_codecs(data)) > 1
        assert read_bytes(data) == (records, False, None)
    encoded = bytearray()
    for record in telemetry:
        append_record(encoded, record, {})
    assert len(data) < len(encoded) / 3


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    with pytest.raises(RecordingCorruptError, match="bad magic") as info:
        open_recording(path)
    assert info.value.block_index is None and info.value.position == 0


def test_damaged_file_header_flags() -> None:
    data = bytearray(encode_file_header())
    data[10] ^= 1
    with pytest.raises(RecordingCorruptError, match="file header checksum"):
        open_recording(io.BytesIO(bytes(data)))


def test_future_version_and_unknown_flags() -> None:
    with pytest.raises(RecordingVersionError, match="version 2.*upgrade"):
        open_recording(io.BytesIO(encode_file_header(version=2)))
    with pytest.raises(RecordingVersionError, match="version 9.*upgrade"):
        open_recording(io.BytesIO(FILE_MAGIC + struct.pack("<H", 9)))  # even cut short
    with pytest.raises(RecordingVersionError, match="flags"):
        open_recording(io.BytesIO(encode_file_header(flags=4)))


def test_streaming_read_memory_stays_flat(tmp_path: Path) -> None:
    rng = random.Random(3)
    path = tmp_path / "many.iotrec"
    n = 50_000
    with RecordingWriter(path, block_bytes=256 << 10) as writer:
        tracemalloc.start()
        for i in range(n):
            writer.write(Record("iot.telemetry", i % 3, i, i, b"cell-1", rng.randbytes(400)))
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    size = path.stat().st_size
    assert size > 16 << 20
    tracemalloc.start()
    count = 0
    with open_recording(path) as reader:
        for record in reader:
            count += record.offset == count
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    assert read_peak < size / 10 and write_peak < size / 10, (read_peak, write_peak, size)


def interleaved(records: list[Record], seed: int) -> list[Record]:
    """A random merge of the per-(topic, partition) streams, each kept in order."""
    streams: dict[tuple[str, int], list[Record]] = {}
    for record in records:
        streams.setdefault((record.topic, record.partition), []).append(record)
    queues = [list(reversed(s)) for s in streams.values()]
    rng, out = random.Random(seed), []
    while queues:
        queue = rng.choice(queues)
        out.append(queue.pop())
        queues = [q for q in queues if q]
    return out


def write_file(path: Path, records: list[Record], block_bytes: int = 1 << 20) -> Path:
    with RecordingWriter(path, block_bytes=block_bytes) as writer:
        for record in records:
            writer.write(record)
    return path


def test_summary_digest_ignores_interleaving_not_content(tmp_path: Path) -> None:
    records = varied_records(3000)
    a = summarize(write_file(tmp_path / "a", interleaved(records, 1)))
    b = summarize(write_file(tmp_path / "b", interleaved(records, 2), block_bytes=4096))
    assert a.digest == b.digest and a.digest.startswith("sha256:")
    assert a.offset_order_violations == 0
    changed = list(records)
    victim = next(i for i, r in enumerate(changed) if r.value)
    value = bytearray(changed[victim].value or b"")
    value[-1] ^= 1
    old = changed[victim]
    changed[victim] = Record(old.topic, old.partition, old.offset, old.timestamp_ms, old.key,
                             bytes(value), old.headers)  # fmt: skip
    assert summarize(write_file(tmp_path / "c", changed)).digest != a.digest


def test_summary_statistics(tmp_path: Path) -> None:
    records = varied_records(500)
    summary = summarize(write_file(tmp_path / "s", records))
    assert (summary.records, summary.truncated) == (len(records), False)
    assert list(summary.topics) == sorted({r.topic for r in records})
    for topic, stats in summary.topics.items():
        mine = [r for r in records if r.topic == topic]
        assert stats.records == len(mine)
        assert stats.value_bytes == sum(len(r.value or b"") for r in mine)
        assert stats.devices == {r.key.decode() for r in mine if r.key is not None}
        assert stats.keyless_records == sum(r.key is None for r in mine)
        assert stats.partitions == {r.partition for r in mine}
        assert (stats.min_timestamp_ms, stats.max_timestamp_ms) == (
            min(r.timestamp_ms for r in mine),
            max(r.timestamp_ms for r in mine),
        )
    assert summary.min_timestamp_ms == min(r.timestamp_ms for r in records)
    backwards = summarize(write_file(tmp_path / "back", list(reversed(records))))
    assert backwards.offset_order_violations == len(records) - len(
        {(r.topic, r.partition) for r in records}
    )


def test_invalid_record_is_rejected_and_writer_stays_usable() -> None:
    good = varied_records(10)
    buf = io.BytesIO()
    with RecordingWriter(buf) as writer:
        writer.write(good[0])
        with pytest.raises(ValueError, match="partition 8589934592"):
            writer.write(Record("t", 1 << 33, 0, 0, None, b"x"))
        for record in good[1:]:
            writer.write(record)
    assert read_bytes(buf.getvalue()) == (good, False, None)


def test_writer_refuses_to_clobber_and_use_after_close(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x", varied_records(3))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        RecordingWriter(path)
    writer = RecordingWriter(path, overwrite=True)
    writer.close()
    with pytest.raises(RecordingError, match="closed"):
        writer.write(varied_records(1)[0])
    assert read_bytes(path.read_bytes()) == ([], False, None)


class FailingStream(io.BytesIO):
    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.fail_after:
            keep = self.fail_after - self.tell()
            super().write(data[:keep])
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_failed_write_stops_writer_and_file_reads_as_truncated() -> None:
    records = varied_records(100)
    _, bounds = write_in_blocks(records, per_block=20)
    stream = FailingStream(fail_after=bounds[2] + 50)
    writer = RecordingWriter(stream, block_bytes=1 << 30)
    for i, record in enumerate(records[:60]):
        writer.write(record)
        if i % 20 == 19 and i < 40:
            writer.flush()
    with pytest.raises(OSError):
        writer.flush()
    with pytest.raises(RecordingError, match="start a new recording"):
        writer.write(records[60])
    writer.close()
    assert read_bytes(stream.getvalue()) == (records[:40], True, bounds[2])


def test_reader_iterates_once_and_read_records_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = varied_records(30)
    whole = write_file(tmp_path / "whole", records)
    cut = tmp_path / "cut"
    cut.write_bytes(whole.read_bytes()[:-3])
    with open_recording(whole) as reader:
        assert list(reader) == records
        with pytest.raises(RecordingError, match="open the recording again"):
            list(reader)
    with caplog.at_level(logging.WARNING):
        assert list(read_records(whole, cut)) == records
    assert "cut short" in caplog.text and str(cut) in caplog.text
