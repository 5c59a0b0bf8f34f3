"""Camera frame validation and decoding (pipeline/decode/image.py)."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

import cv2
import numpy as np
import pytest

from pipeline.decode import (
    ImageInfo,
    ImageLimits,
    Reason,
    RejectedRecord,
    Stage,
    decode_image,
    probe_image,
)
from tests.factory import jpeg_header_only, mutate


def frame(width: int, height: int) -> np.ndarray:
    """BGR test frame: black, with a pure red top-left quadrant and a white bottom-right one."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[: height // 2, : width // 2] = (0, 0, 255)  # BGR red
    img[height // 2 :, width // 2 :] = 255
    return img


def jpeg(width: int = 640, height: int = 480, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame(width, height), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return bytes(buf.tobytes())


def png(width: int = 64, height: int = 48) -> bytes:
    ok, buf = cv2.imencode(".png", frame(width, height))
    assert ok
    return bytes(buf.tobytes())


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically complete PNG claiming width x height, without any pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def rejected(call: Callable[[], object]) -> RejectedRecord:
    with pytest.raises(RejectedRecord) as info:
        call()
    return info.value


# --- probe: what is accepted -------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "image/jpeg", "IMAGE/JPEG; q=0.9", ""])
def test_probe_reads_jpeg_dimensions(content_type: str | None) -> None:
    assert probe_image(jpeg(640, 480), content_type) == ImageInfo("jpeg", 640, 480)


@pytest.mark.parametrize("content_type", [None, "image/png", "application/octet-stream"])
def test_probe_reads_png_dimensions(content_type: str | None) -> None:
    assert probe_image(png(64, 48), content_type) == ImageInfo("png", 64, 48)


def test_probe_accepts_zero_padding_after_the_end_marker() -> None:
    assert probe_image(jpeg(32, 16) + bytes(100), None) == ImageInfo("jpeg", 32, 16)
    assert probe_image(png(32, 16) + bytes(7), None) == ImageInfo("png", 32, 16)


def test_probe_accepts_images_exactly_at_the_limits() -> None:
    data = png(40, 30)
    limits = ImageLimits(max_width=40, max_height=30, max_bytes=len(data))
    assert probe_image(data, None, limits) == ImageInfo("png", 40, 30)


# --- probe: what is rejected, and why ----------------------------------------------------


def test_too_many_bytes_is_rejected_before_anything_else() -> None:
    limits = ImageLimits(max_bytes=1000)
    err = rejected(lambda: probe_image(b"\x00" * 1001, "image/jpeg", limits))
    assert (err.stage, err.reason) == (Stage.VALIDATE, Reason.IMAGE_TOO_LARGE_BYTES)
    assert "1001" in err.message and "1000" in err.message


@pytest.mark.parametrize("header", [png_header_only, jpeg_header_only])
def test_too_many_pixels_is_rejected_from_the_header(header: Callable[[int, int], bytes]) -> None:
    data = header(5000, 5000)  # no pixel data at all: only the header can reject it
    assert len(data) < 200
    assert rejected(lambda: probe_image(data, None)).reason == Reason.IMAGE_TOO_LARGE_PIXELS
    assert probe_image(header(4096, 4096), None).width == 4096  # the default limit itself


@pytest.mark.parametrize("width, height", [(4097, 1), (1, 4097)])
def test_each_side_has_its_own_limit(width: int, height: int) -> None:
    err = rejected(lambda: probe_image(png_header_only(width, height), None))
    assert err.reason == Reason.IMAGE_TOO_LARGE_PIXELS


@pytest.mark.parametrize("make", [jpeg, png])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.99])
def test_truncated_images_are_rejected(make: Callable[[], bytes], keep: float) -> None:
    data = make()
    err = rejected(lambda: probe_image(data[: int(len(data) * keep)], None))
    assert (err.stage, err.reason) == (Stage.VALIDATE, Reason.IMAGE_TRUNCATED)


@pytest.mark.parametrize("make", [jpeg, png])
def test_image_cut_inside_its_header_is_truncated(make: Callable[[], bytes]) -> None:
    assert rejected(lambda: probe_image(make()[:20], None)).reason == Reason.IMAGE_TRUNCATED


@pytest.mark.parametrize("make", [jpeg, png])
def test_trailing_garbage_is_rejected(make: Callable[[], bytes]) -> None:
    err = rejected(lambda: probe_image(make() + b"garbage", None))
    assert err.reason == Reason.IMAGE_TRUNCATED


def test_random_bytes_are_not_an_image() -> None:
    data = random.Random(1).randbytes(5000)
    assert rejected(lambda: probe_image(data, None)).reason == Reason.UNSUPPORTED_FORMAT


def test_png_chunk_longer_than_the_file_is_rejected_before_decoding() -> None:
    data = bytearray(png(48, 32))
    idat = data.index(b"IDAT") - 4
    data[idat] = 0x7F  # the IDAT length now claims ~2 GiB, which OpenCV would allocate
    assert rejected(lambda: probe_image(bytes(data), None)).reason == Reason.IMAGE_CORRUPT


def test_png_with_absurdly_many_chunks_is_rejected() -> None:
    head, iend = png_header_only(8, 8)[:-12], png_chunk(b"IEND", b"")
    assert probe_image(head + png_chunk(b"tEXt", b"") * 1000 + iend, None).width == 8
    data = head + png_chunk(b"tEXt", b"") * 70000 + iend  # 840 kB of empty chunks
    assert rejected(lambda: probe_image(data, None)).reason == Reason.IMAGE_CORRUPT


@pytest.mark.parametrize("sof", [0xC2, 0xCA])  # progressive: each scan re-walks the image
def test_progressive_jpeg_with_hundreds_of_scans_is_rejected(sof: int) -> None:
    head = jpeg_header_only(16, 16, sof)[:-2]
    few, many = head + b"\xff\xda\x00\x02" * 256, head + b"\xff\xda\x00\x02" * 257
    assert probe_image(few + b"\xff\xd9", None).width == 16
    assert rejected(lambda: probe_image(many + b"\xff\xd9", None)).reason == Reason.IMAGE_CORRUPT


def test_repeated_scans_of_a_baseline_jpeg_are_accepted_and_ignored() -> None:
    """libjpeg stops at a sequential JPEG's first complete scan: no scan limit needed."""
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = bytes(cv2.imencode(".jpg", img)[1])
    sos = data.find(b"\xff\xda")
    bomb = data[:sos] + data[sos:-2] * 300 + b"\xff\xd9"
    info = probe_image(bomb, "image/jpeg")
    assert np.array_equal(decode_image(bomb, info, 64), decode_image(data, info, 64))


def test_empty_value_is_rejected() -> None:
    assert rejected(lambda: probe_image(b"", None)).reason == Reason.EMPTY_VALUE


@pytest.mark.parametrize(
    "make, content_type",
    [(png, "image/jpeg"), (jpeg, "image/png"), (lambda: b"GIF89a" + bytes(50), "image/png")],
)
def test_content_type_must_agree_with_the_bytes(
    make: Callable[[], bytes], content_type: str
) -> None:
    err = rejected(lambda: probe_image(make(), content_type))
    assert (err.stage, err.reason) == (Stage.VALIDATE, Reason.CONTENT_TYPE_MISMATCH)


def test_non_image_content_type_is_unsupported() -> None:
    assert rejected(lambda: probe_image(jpeg(), "image/gif")).reason == Reason.UNSUPPORTED_FORMAT


def test_hierarchical_jpeg_is_unsupported() -> None:
    data = jpeg_header_only(16, 16, sof=0xC5)
    assert rejected(lambda: probe_image(data, None)).reason == Reason.UNSUPPORTED_FORMAT


@pytest.mark.parametrize(
    "data",
    [
        jpeg_header_only(0, 16),  # zero height
        b"\xff\xd8\xff\xda\x00\x02\xff\xd9",  # scan before any frame header
        b"\xff\xd8\xff\xe0\x00\x04\x00\x00\x00\x00\xff\xd9",  # no marker after APP0
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"tEXt", bytes(13)) + png_chunk(b"IEND", b""),
        png_header_only(8, 8).replace(b"IEND", b"IE\x00D"),  # chunk type is not letters
    ],
)
def test_malformed_headers_are_corrupt(data: bytes) -> None:
    assert rejected(lambda: probe_image(data, None)).reason == Reason.IMAGE_CORRUPT


# --- decode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: jpeg(640, 480), lambda: png(64, 48), lambda: jpeg(20, 10)]
)
@pytest.mark.parametrize("size", [16, 64])
def test_decode_gives_rgb_in_the_original_orientation(make: Callable[[], bytes], size: int) -> None:
    data = make()
    out = decode_image(data, probe_image(data, None), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    q = size // 4  # sample the middle of each quadrant, away from blurred edges
    red, black, white = out[q, q], out[q, 3 * q], out[3 * q, 3 * q]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # channel 0 is red: RGB order
    assert black.max() < 60 and white.min() > 200


@pytest.mark.parametrize(
    "encode",
    [
        lambda img: cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))[1],
        lambda img: cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))[1],
        lambda img: cv2.imencode(".png", img.astype(np.uint16) * 257)[1],  # 16 bits/channel
        lambda img: cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1],
        lambda img: cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))[1],
    ],
)
def test_other_pixel_formats_decode_to_rgb(encode: Callable[[np.ndarray], np.ndarray]) -> None:
    data = bytes(encode(frame(64, 48)).tobytes())
    out = decode_image(data, probe_image(data, None), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[24, 24].min() > 200 and out[8, 24].max() < 60  # white and black quadrants


def test_reduced_decode_matches_full_decode() -> None:
    data = jpeg(640, 480)
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert full is not None
    expected = cv2.cvtColor(
        cv2.resize(full, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    got = decode_image(data, probe_image(data, None), 64)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 2.0


@pytest.mark.parametrize(
    "width, height, size, flag",
    [
        (640, 480, 64, cv2.IMREAD_REDUCED_COLOR_4),  # 480/8 = 60 < 64, 480/4 = 120
        (640, 480, 60, cv2.IMREAD_REDUCED_COLOR_8),  # 60 x 80 is still >= 60
        (640, 480, 224, cv2.IMREAD_REDUCED_COLOR_2),
        (640, 480, 241, cv2.IMREAD_COLOR),
        (100, 100, 13, cv2.IMREAD_REDUCED_COLOR_8),  # libjpeg rounds up: ceil(100 / 8) = 13
        (100, 100, 14, cv2.IMREAD_REDUCED_COLOR_4),
    ],
)
def test_jpeg_uses_the_largest_reduction_that_keeps_size(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, size: int, flag: int
) -> None:
    flags: list[int] = []
    real = cv2.imdecode

    def spy(buf: np.ndarray, f: int) -> np.ndarray | None:
        flags.append(f)
        return real(buf, f)

    monkeypatch.setattr(cv2, "imdecode", spy)
    data = jpeg(width, height)
    assert decode_image(data, probe_image(data, None), size).shape == (size, size, 3)
    assert flags == [flag]


def test_png_is_decoded_at_full_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    flags: list[int] = []
    real = cv2.imdecode

    def spy(buf: np.ndarray, f: int) -> np.ndarray | None:
        flags.append(f)
        return real(buf, f)

    monkeypatch.setattr(cv2, "imdecode", spy)
    data = png(640, 480)
    decode_image(data, probe_image(data, None), 64)
    assert flags == [cv2.IMREAD_COLOR]


def test_undecodable_image_is_corrupt() -> None:
    data = jpeg_header_only(16, 16)  # passes the probe, but has no tables and no scan
    info = probe_image(data, None)
    err = rejected(lambda: decode_image(data, info, 8))
    assert (err.stage, err.reason) == (Stage.DECODE, Reason.IMAGE_CORRUPT)


def test_opencv_exceptions_become_rejections(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(buf: np.ndarray, flag: int) -> np.ndarray:
        raise cv2.error("boom")

    monkeypatch.setattr(cv2, "imdecode", explode)
    data = png()
    err = rejected(lambda: decode_image(data, probe_image(data, None), 8))
    assert (err.stage, err.reason) == (Stage.DECODE, Reason.IMAGE_CORRUPT)
    assert "boom" in err.message


@pytest.mark.parametrize(
    "make, min_decoded",  # libpng checks CRCs, so few damaged PNGs still decode
    [(lambda: jpeg(48, 32), 300), (lambda: png(48, 32), 1)],
)
def test_fuzzed_images_only_ever_raise_rejected_record(
    make: Callable[[], bytes], min_decoded: int
) -> None:
    rng, original = random.Random(20260101), make()
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(2000):
        data = mutate(original, rng)
        try:
            out = decode_image(data, probe_image(data, None), 16)
        except RejectedRecord as err:
            assert err.reason in set(Reason) and err.message
            outcomes["rejected"] += 1
        else:
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8
            outcomes["decoded"] += 1
    assert outcomes["rejected"] > 500 and outcomes["decoded"] >= min_decoded  # both paths
