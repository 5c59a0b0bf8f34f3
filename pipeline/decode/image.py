"""Camera frames: cheap validation from the header, then a (reduced) decode to RGB.

`probe_image` never decodes pixels: it checks the byte size, the format (magic bytes, and
the `content-type` header when given), reads the dimensions from the header (PNG IHDR; for
JPEG it walks the marker segments up to the SOFn frame header), applies the pixel limits
and checks that the file is complete. Only then does `decode_image` hand the bytes to
OpenCV, whose own pixel limits are thus never the first line of defence.

Decisions:
- Completeness: a JPEG must end with the EOI marker (FF D9), a PNG with its IEND chunk.
  Trailing zero bytes after it are accepted as padding (some cameras and DMA buffers pad
  frames to a block size); any other trailing byte counts as a truncated/damaged file.
  For PNG the whole chunk list is walked: every declared chunk length must fit inside the
  value (OpenCV's PNG reader allocates what a chunk header claims: a flipped length byte
  cost seconds and gigabytes before this check).
- `content-type` ``application/octet-stream`` (or an empty one) carries no information and
  is treated as absent: the bytes are sniffed.
- `decode_image` squashes the frame to size x size (aspect ratio not kept, nothing
  cropped), so the whole field of view reaches the encoder. EXIF orientation is applied
  (OpenCV's default).
- A JPEG with more than 256 scans (SOS markers) is refused: libjpeg re-walks the image
  for every progressive scan, so such a file is a CPU bomb. Real encoders write ~10.
- Any failure, including unexpected exceptions from parsing hostile bytes or from OpenCV,
  surfaces as RejectedRecord and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from pipeline.decode.errors import Reason, RejectedRecord, invalid, preview, undecodable

ImageFormat = Literal["jpeg", "png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
_PNG_MAX_CHUNK = 2**31 - 1  # PNG spec limit on a chunk's length
_PNG_MAX_CHUNKS = 1 << 16  # encoders write a few to a few thousand; bounds the probe's cost
_JPEG_EOI = b"\xff\xd9"
_MIME_FORMATS: dict[str, ImageFormat] = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/png": "png",
    "image/x-png": "png",
}
_UNINFORMATIVE_MIMES = frozenset({"", "application/octet-stream"})
# SOFn markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# libjpeg(-turbo) decodes baseline, extended, progressive, lossless and arithmetic frames,
# not the hierarchical/differential ones (C5-C7, CD-CF)
_SUPPORTED_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB})
# each progressive scan re-walks the whole image, so thousands of tiny scans make a small
# file cost seconds of CPU (Cure53's libjpeg-turbo report; NVIDIA nvImageCodec's default).
# Sequential JPEGs are not counted: libjpeg stops at their first complete scan (a 250 MB
# baseline file of 2,000 repeated scans decodes in 2.5 ms), and counting costs ~45 us a frame.
_JPEG_MAX_SCANS = 256
_PROGRESSIVE_SOF = frozenset({0xC2, 0xCA})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length
_REDUCED_FLAGS = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_width: int = 4096
    max_height: int = 4096
    max_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: ImageFormat
    width: int
    height: int


def probe_image(
    value: bytes, content_type: str | None, limits: ImageLimits = ImageLimits()
) -> ImageInfo:
    """Validate an image from its header alone; raises RejectedRecord(stage="validate")."""
    try:
        return _probe(value, content_type, limits)
    except RejectedRecord:
        raise
    except Exception as exc:  # hostile bytes must not escape as anything else
        raise invalid(
            Reason.IMAGE_CORRUPT,
            f"image header could not be parsed ({exc!r}); send a well-formed JPEG or PNG",
        ) from exc


def decode_image(value: bytes, info: ImageInfo, size: int) -> np.ndarray:
    """Decode to uint8 RGB of shape [size, size, 3]; raises RejectedRecord(stage="decode").

    `info` must come from `probe_image(value, ...)`. JPEGs are decoded at the smallest
    libjpeg scale (1/2, 1/4, 1/8) that keeps both sides >= size, then resized.
    """
    if size < 1:
        raise ValueError(f"decode_image: size must be >= 1, got {size}")
    try:
        return _decode(value, info, size)
    except RejectedRecord:
        raise
    except Exception as exc:  # OpenCV raises cv2.error, MemoryError, ... on hostile input
        raise undecodable(
            Reason.IMAGE_CORRUPT,
            f"{info.format} image could not be decoded ({exc!r}); "
            "the image data is damaged: check the camera's encoder",
        ) from exc


def _probe(value: bytes, content_type: str | None, limits: ImageLimits) -> ImageInfo:
    if not value:
        raise invalid(Reason.EMPTY_VALUE, "camera record has an empty value; send JPEG or PNG")
    if len(value) > limits.max_bytes:
        raise invalid(
            Reason.IMAGE_TOO_LARGE_BYTES,
            f"image is {len(value)} bytes, over the {limits.max_bytes}-byte limit; "
            "send a smaller or more compressed frame, or raise the image byte limit",
        )
    fmt = _resolve_format(value, content_type)
    width, height, sof = _png_size(value) if fmt == "png" else _jpeg_size(value)
    if width < 1 or height < 1:
        raise invalid(Reason.IMAGE_CORRUPT, f"{fmt} header declares a {width}x{height} image")
    if width > limits.max_width or height > limits.max_height:
        raise invalid(
            Reason.IMAGE_TOO_LARGE_PIXELS,
            f"image is {width}x{height} pixels, over the {limits.max_width}x"
            f"{limits.max_height} limit; downscale at the camera or raise the pixel limit",
        )
    _check_complete(value, fmt, limits.max_bytes)
    if sof in _PROGRESSIVE_SOF and value.count(b"\xff\xda") > _JPEG_MAX_SCANS:  # SOS markers
        raise invalid(Reason.IMAGE_CORRUPT, f"JPEG has over {_JPEG_MAX_SCANS} scans")
    return ImageInfo(format=fmt, width=width, height=height)


def _sniff(value: bytes) -> ImageFormat | None:
    if value.startswith(PNG_SIGNATURE):
        return "png"
    if value.startswith(JPEG_SOI):
        return "jpeg"
    return None


def _resolve_format(value: bytes, content_type: str | None) -> ImageFormat:
    sniffed = _sniff(value)
    mime = "" if content_type is None else content_type.split(";", 1)[0].strip().lower()
    if mime in _UNINFORMATIVE_MIMES:
        if sniffed is None:
            raise invalid(
                Reason.UNSUPPORTED_FORMAT,
                f"value is neither JPEG nor PNG (starts {preview(value, 16)}); "
                "the camera topic takes JPEG or PNG images",
            )
        return sniffed
    declared = _MIME_FORMATS.get(mime)
    if declared is None:
        raise invalid(
            Reason.UNSUPPORTED_FORMAT,
            f"content-type {(content_type or '')[:100]!r} is not an image type the pipeline reads; "
            "use image/jpeg or image/png",
        )
    if sniffed != declared:
        found = "no JPEG/PNG signature" if sniffed is None else f"{sniffed} bytes"
        raise invalid(
            Reason.CONTENT_TYPE_MISMATCH,
            f"content-type says {declared} but the value has {found} "
            f"(starts {preview(value, 16)}); fix the producer's content-type header",
        )
    return declared


def _png_size(value: bytes) -> tuple[int, int, None]:
    # signature(8) | length(4)=13 | "IHDR" | width(4) | height(4) | 5 bytes | CRC(4)
    if len(value) < 33:
        raise invalid(Reason.IMAGE_TRUNCATED, f"PNG is {len(value)} bytes, cut before IHDR")
    length, chunk_type, width, height = struct.unpack_from(">I4sII", value, 8)
    if chunk_type != b"IHDR" or length != 13:
        raise invalid(Reason.IMAGE_CORRUPT, "PNG does not start with an IHDR chunk")
    return int(width), int(height), None


def _jpeg_size(value: bytes) -> tuple[int, int, int]:
    """Walk the marker segments from SOI to the SOFn frame header: (width, height, SOF)."""
    n, pos = len(value), 2
    while True:
        if pos >= n:
            raise invalid(Reason.IMAGE_TRUNCATED, "JPEG ends before its frame header (SOF)")
        if value[pos] != 0xFF:
            raise invalid(Reason.IMAGE_CORRUPT, f"JPEG: expected a marker at byte {pos}")
        while pos < n and value[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            raise invalid(Reason.IMAGE_TRUNCATED, "JPEG ends inside a marker")
        marker = value[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):  # stuffing, SOI, EOI, SOS before any SOF
            raise invalid(
                Reason.IMAGE_CORRUPT, f"JPEG: marker FF{marker:02X} before the frame header"
            )
        if pos + 2 > n:
            raise invalid(Reason.IMAGE_TRUNCATED, "JPEG ends inside a segment length")
        (length,) = struct.unpack_from(">H", value, pos)
        if length < 2:
            raise invalid(Reason.IMAGE_CORRUPT, f"JPEG: segment length {length} at byte {pos}")
        if marker in _SOF_MARKERS:
            return _jpeg_frame_size(value, pos, marker)
        pos += length


def _jpeg_frame_size(value: bytes, pos: int, marker: int) -> tuple[int, int, int]:
    # length(2) | precision(1) | height(2) | width(2) | components(1) ...
    if pos + 8 > len(value):
        raise invalid(Reason.IMAGE_TRUNCATED, "JPEG ends inside its frame header")
    if marker not in _SUPPORTED_SOF:
        raise invalid(
            Reason.UNSUPPORTED_FORMAT,
            f"hierarchical/differential JPEG (SOF marker FF{marker:02X}) is not supported; "
            "send baseline or progressive JPEG",
        )
    height, width = struct.unpack_from(">HH", value, pos + 3)
    return int(width), int(height), marker


def _check_complete(value: bytes, fmt: ImageFormat, max_bytes: int) -> None:
    if fmt == "png":
        end = _png_end(value, max_bytes)
    else:
        end = len(value.rstrip(b"\x00"))  # zero padding is allowed, see module docstring
        if value[end - 2 : end] != _JPEG_EOI:
            raise invalid(
                Reason.IMAGE_TRUNCATED,
                f"jpeg does not end with the EOI marker FF D9 (ends {value[-8:]!r}): it is "
                "truncated or has trailing garbage; check that the producer sends whole files",
            )
    if value.count(0, end) != len(value) - end:
        raise invalid(
            Reason.IMAGE_TRUNCATED,
            f"{len(value) - end} bytes follow the end of the {fmt} image and are not zero "
            "padding: trailing garbage or a damaged file; send whole, unmodified files",
        )


def _png_end(value: bytes, max_bytes: int) -> int:
    """Walk the PNG chunks (lengths and types, not CRCs) to the end of IEND.

    Every declared chunk length must fit in the value: decoders trust them for allocations.
    A chunk that claims more than the largest image accepted (`max_bytes`) is no truncated
    image but a corrupt one: no whole file could hold it.
    """
    pos, n = 8, len(value)
    for _ in range(_PNG_MAX_CHUNKS):
        if pos + 12 > n:
            break
        length: int
        kind: bytes
        length, kind = struct.unpack_from(">I4s", value, pos)
        if length > _PNG_MAX_CHUNK or not kind.isalpha():
            raise invalid(Reason.IMAGE_CORRUPT, f"PNG chunk header at byte {pos} is invalid")
        if pos + 12 + length > max_bytes:
            raise invalid(
                Reason.IMAGE_CORRUPT,
                f"PNG chunk {kind.decode('ascii')} at byte {pos} claims {length} bytes, past "
                f"the {max_bytes}-byte image limit: the file is corrupt",
            )
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            if length != 0 or pos > n:
                raise invalid(Reason.IMAGE_CORRUPT, "PNG IEND chunk is malformed")
            return pos
    if pos + 12 <= n:
        raise invalid(Reason.IMAGE_CORRUPT, f"PNG has over {_PNG_MAX_CHUNKS} chunks")
    raise invalid(
        Reason.IMAGE_TRUNCATED,
        f"png ends (after {n} bytes) before its IEND chunk: the image is truncated; check that "
        "the producer sends whole files",
    )


def _reduced_flag(info: ImageInfo, size: int) -> int:
    """The largest libjpeg reduction that keeps both sides >= size (JPEG only)."""
    if info.format == "jpeg":
        for factor, flag in _REDUCED_FLAGS:
            # libjpeg scales each side to ceil(side / factor)
            if -(-info.width // factor) >= size and -(-info.height // factor) >= size:
                return int(flag)
    return int(cv2.IMREAD_COLOR)


def _decode(value: bytes, info: ImageInfo, size: int) -> np.ndarray:
    encoded = np.frombuffer(value, dtype=np.uint8)  # (nbytes,), no copy
    bgr = cv2.imdecode(encoded, _reduced_flag(info, size))  # (h', w', 3) or None
    if bgr is None:
        raise undecodable(
            Reason.IMAGE_CORRUPT,
            f"OpenCV could not decode this {info.format} ({info.width}x{info.height}); "
            "the image data is damaged: check the camera's encoder",
        )
    if bgr.dtype == np.uint16:  # e.g. 12-bit JPEG: keep the 8 most significant bits
        bgr = (bgr.astype(np.uint16) >> 8).astype(np.uint8)
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3 or min(bgr.shape[:2]) < 1:
        raise undecodable(
            Reason.IMAGE_CORRUPT,
            f"{info.format} decoded to an unexpected array {bgr.dtype}{bgr.shape}",
        )
    height, width = bgr.shape[:2]
    if (height, width) != (size, size):
        shrinking = height >= size and width >= size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        bgr = cv2.resize(bgr, (size, size), interpolation=interpolation)  # (size, size, 3)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # (size, size, 3), channel 0 = red
    return np.ascontiguousarray(rgb, dtype=np.uint8)
