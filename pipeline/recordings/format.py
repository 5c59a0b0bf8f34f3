"""Low-level framing of recording files: file header, blocks, record encoding.

The byte layout is documented in docs/recording-format.md; this module is its single
implementation. `pipeline.recordings.file` builds the writer, reader and summary on top.
All integers are little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import zstandard
from crc32c import crc32c

from pipeline.records import Headers, Record

FILE_MAGIC = b"IOTFREC\0"
FORMAT_VERSION = 1  # the newest version this code writes and reads
KNOWN_FLAGS = 0  # no flag bits are defined in version 1; readers reject unknown ones

FILE_HEADER = struct.Struct("<8sHHI")  # magic, version u16, flags u16, crc32c(previous 12 B)
# payload_len, raw_len, count, crc32c(payload), codec u16, reserved u16, crc32c(previous 20 B)
BLOCK_HEADER = struct.Struct("<IIIIHHI")
CODEC_STORED = 0  # payload is the raw records
CODEC_ZSTD = 1  # payload is one zstd frame
RECORD_HEAD = struct.Struct("<HiqqiiH")  # topic_len, partition, offset, ts, key_len, value_len, n_h
HEADER_HEAD = struct.Struct("<HI")  # header name_len, value_len

MAX_BLOCK_RAW = 0xFFFFFFFF  # raw_len is a u32
_NAME_CACHE_LIMIT = 4096  # cached topic / header-name encodings per writer or reader
_SAMPLES, _SAMPLE_BYTES = 4, 16 << 10  # probe of a block's compressibility
_MIN_SAVING = 0.05  # compress a block only if the probe shrinks by at least this much


class RecordingError(Exception):
    """Base class of every error about a recording file."""


class RecordingVersionError(RecordingError):
    """The file was written in a format version newer than this code reads."""


class RecordingCorruptError(RecordingError):
    """Bytes that are present in the file are wrong (not merely cut short)."""

    def __init__(self, source: str, position: int, block_index: int | None, problem: str):
        self.source = source
        self.position = position
        self.block_index = block_index
        self.problem = problem
        if block_index is None:
            where = f"file header at byte {position}"
            advice = (
                "check that this is an iotfuse recording; if it is, restore it from a copy"
                " or record again"
            )
        else:
            where = f"block {block_index} at byte {position}"
            advice = (
                f"the {block_index} blocks before byte {position} are intact: to keep them,"
                f" copy that prefix to a new file (head -c {position} SRC > DST) and read"
                " that; otherwise restore the file from a copy or record again"
            )
        super().__init__(f"recording {source} is corrupt: {where}: {problem}; {advice}")


class FramingError(ValueError):
    """A decoded block payload does not parse; the reader turns it into a corrupt error."""


@dataclass(frozen=True, slots=True)
class BlockHeader:
    payload_len: int  # bytes of zstd payload that follow the header
    raw_len: int  # bytes of the decompressed payload
    record_count: int
    payload_crc: int  # crc32c of the payload as stored
    codec: int


def encode_file_header(version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    head = FILE_HEADER.pack(FILE_MAGIC, version, flags, 0)[:12]
    return head + struct.pack("<I", crc32c(head))


def parse_file_header(data: bytes, source: str) -> tuple[int, int] | None:
    """(version, flags) from the first bytes of a file; None when `data` is a cut-short
    prefix of a valid header. Raises on anything else."""
    magic = data[:8]
    if magic != FILE_MAGIC[: len(magic)]:
        raise RecordingCorruptError(
            source, 0, None, f"bad magic {magic!r}, expected {FILE_MAGIC!r}"
        )
    if len(data) < 10:
        return None
    (version,) = struct.unpack_from("<H", data, 8)
    if version > FORMAT_VERSION or version == 0:
        raise RecordingVersionError(
            f"recording {source} has format version {version}; this iotfuse reads versions"
            f" 1..{FORMAT_VERSION}: upgrade iotfuse to read it"
        )
    if len(data) < FILE_HEADER.size:
        return None
    _, _, flags, crc = FILE_HEADER.unpack(data)
    if crc != crc32c(data[:12]):
        raise RecordingCorruptError(source, 0, None, "file header checksum mismatch")
    if flags & ~KNOWN_FLAGS:
        raise RecordingVersionError(
            f"recording {source} uses flags {flags:#06x} unknown to this iotfuse (version"
            f" {FORMAT_VERSION}): upgrade iotfuse to read it"
        )
    return version, flags


def encode_block_header(
    payload: bytes | bytearray, raw_len: int, record_count: int, codec: int
) -> bytes:
    head = struct.pack("<IIIIHH", len(payload), raw_len, record_count, crc32c(payload), codec, 0)
    return head + struct.pack("<I", crc32c(head))


def parse_block_header(data: bytes) -> BlockHeader | None:
    """The header of a block, or None when its checksum does not match."""
    payload_len, raw_len, count, payload_crc, codec, _, head_crc = BLOCK_HEADER.unpack(data)
    if head_crc != crc32c(data[:20]):
        return None
    return BlockHeader(payload_len, raw_len, count, payload_crc, codec)


def _worth_compressing(raw: bytearray, compressor: zstandard.ZstdCompressor) -> bool:
    """Whether a few slices of `raw` shrink: JPEG/PNG-heavy blocks do not, and compressing
    them would cost most of the writer's time for nothing."""
    total = _SAMPLES * _SAMPLE_BYTES
    if len(raw) <= 2 * total:
        return True
    view, step = memoryview(raw), (len(raw) - _SAMPLE_BYTES) // (_SAMPLES - 1)
    packed = sum(
        len(compressor.compress(view[i * step : i * step + _SAMPLE_BYTES])) for i in range(_SAMPLES)
    )
    return packed <= total * (1 - _MIN_SAVING)


def block_payload(
    raw: bytearray, compressor: zstandard.ZstdCompressor
) -> tuple[int, bytes | bytearray]:
    """(codec, payload) for a block's raw records: zstd when it makes them smaller."""
    if _worth_compressing(raw, compressor):
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            return CODEC_ZSTD, packed
    return CODEC_STORED, raw


def encode_name(name: str, cache: dict[str, bytes]) -> bytes:
    encoded = cache.get(name)
    if encoded is None:
        if len(cache) >= _NAME_CACHE_LIMIT:
            cache.clear()
        encoded = cache[name] = name.encode("utf-8")
    return encoded


def decode_name(raw: bytes, cache: dict[bytes, str]) -> str:
    name = cache.get(raw)
    if name is None:
        if len(cache) >= _NAME_CACHE_LIMIT:
            cache.clear()
        name = cache[raw] = raw.decode("utf-8")
    return name


def append_record(buf: bytearray, record: Record, names: dict[str, bytes]) -> None:
    """Append the encoding of `record` to `buf` (also the digest's canonical encoding).

    Raises struct.error / TypeError / UnicodeEncodeError on a field that does not fit;
    `buf` may then hold a partial record, which the caller must cut off."""
    topic = encode_name(record.topic, names)
    key, value, headers = record.key, record.value, record.headers
    buf += RECORD_HEAD.pack(
        len(topic),
        record.partition,
        record.offset,
        record.timestamp_ms,
        -1 if key is None else len(key),
        -1 if value is None else len(value),
        len(headers),
    )
    buf += topic
    if key:
        buf += key
    for name, header_value in headers:
        name_bytes = encode_name(name, names)
        header_value = header_value or b""  # a null header value is recorded as empty
        buf += HEADER_HEAD.pack(len(name_bytes), len(header_value))
        buf += name_bytes
        buf += header_value
    if value:
        buf += value


def _decode_headers(
    raw: bytes, pos: int, count: int, names: dict[bytes, str]
) -> tuple[Headers, int]:
    headers = []
    unpack = HEADER_HEAD.unpack_from
    for _ in range(count):
        name_len, value_len = unpack(raw, pos)
        pos += HEADER_HEAD.size
        name = decode_name(raw[pos : pos + name_len], names)
        pos += name_len
        headers.append((name, raw[pos : pos + value_len]))
        pos += value_len
    return tuple(headers), pos


def decode_records(raw: bytes, count: int, names: dict[bytes, str]) -> list[Record]:
    """The `count` records of a decompressed block payload, in order."""
    out: list[Record] = []
    unpack = RECORD_HEAD.unpack_from
    head_size = RECORD_HEAD.size
    pos = 0
    try:
        for _ in range(count):
            topic_len, partition, offset, ts, key_len, value_len, n_headers = unpack(raw, pos)
            pos += head_size
            if key_len < -1 or value_len < -1:
                raise FramingError(f"record {len(out)} has a negative length")
            topic = decode_name(raw[pos : pos + topic_len], names)
            pos += topic_len
            key: bytes | None = None
            if key_len >= 0:
                key = raw[pos : pos + key_len]
                pos += key_len
            headers: Headers = ()
            if n_headers:
                headers, pos = _decode_headers(raw, pos, n_headers, names)
            value: bytes | None = None
            if value_len >= 0:
                value = raw[pos : pos + value_len]
                pos += value_len
            out.append(Record(topic, partition, offset, ts, key, value, headers))
    except (struct.error, UnicodeDecodeError) as exc:
        raise FramingError(f"record {len(out)} does not parse: {exc}") from exc
    if pos != len(raw):
        raise FramingError(
            f"{count} records span {pos} bytes but the block payload holds {len(raw)}"
        )
    return out


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    """`size` bytes, or fewer only at end of file."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def rest_is_zero(stream: BinaryIO, head: bytes) -> bool:
    """Whether `head` and everything after it to end of file are zero bytes (the tail a
    crash can leave when the file size was saved before its data)."""
    if head.count(0) != len(head):
        return False
    while chunk := stream.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return True


class BlockReader:
    """Verifies and decodes a recording's file header, then its blocks one at a time."""

    def __init__(self, file: BinaryIO, name: str) -> None:
        self.file = file
        self.name = name
        self.truncated = False
        self.truncated_at: int | None = None  # where the cut-off block (or header) starts
        self.blocks_read = 0
        self.records_read = 0  # records of the blocks read so far
        self.version: int | None = None  # None when the file header itself is cut short
        self.position = 0  # end of the header or of the last whole block read
        self._names: dict[bytes, str] = {}
        self._decompress: Callable[..., bytes] = zstandard.ZstdDecompressor().decompress
        self._done = False
        parsed = parse_file_header(read_exactly(file, FILE_HEADER.size), name)
        if parsed is None:
            self._truncate()
        else:
            self.version = parsed[0]
            self.position = FILE_HEADER.size

    def next_block(self) -> list[Record] | None:
        """The next block's records; None at end of file or where the file is cut short."""
        if self._done:
            return None
        head = read_exactly(self.file, BLOCK_HEADER.size)
        if len(head) < BLOCK_HEADER.size:
            self._done = True
            if head:  # a block header cut short
                self._truncate()
            return None
        header = parse_block_header(head)
        if header is None:
            if not rest_is_zero(self.file, head):
                raise self._corrupt("block header checksum mismatch")
            self._truncate()
            return None
        payload = read_exactly(self.file, header.payload_len)
        if len(payload) < header.payload_len:
            self._truncate()
            return None
        if crc32c(payload) != header.payload_crc:
            raise self._corrupt("block payload checksum mismatch")
        try:
            if header.codec == CODEC_STORED:
                raw = payload
            elif header.codec == CODEC_ZSTD:
                raw = self._decompress(payload, max_output_size=header.raw_len)
            else:
                raise FramingError(f"unknown codec {header.codec}")
            if len(raw) != header.raw_len:
                raise FramingError(f"payload is {len(raw)} bytes, header says {header.raw_len}")
            records = decode_records(raw, header.record_count, self._names)
        except (zstandard.ZstdError, FramingError) as exc:
            raise self._corrupt(f"block payload does not decode: {exc}") from exc
        self.position += BLOCK_HEADER.size + header.payload_len
        self.blocks_read += 1
        self.records_read += len(records)
        return records

    def _truncate(self) -> None:
        self.truncated = True
        self.truncated_at = self.position
        self._done = True

    def _corrupt(self, problem: str) -> RecordingCorruptError:
        self._done = True
        return RecordingCorruptError(self.name, self.position, self.blocks_read, problem)
