"""Audio chunk decoding: WAV parsed by hand, raw PCM, limits (pipeline/decode/audio.py)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import numpy as np
import pytest

from pipeline.decode import (
    AudioLimits,
    ContentType,
    Reason,
    RejectedRecord,
    Stage,
    decode_audio,
    parse_content_type,
)
from pipeline.decode.audio import _sinc_is_affordable
from tests.factory import mutate

PCM_GUID_TAIL = b"\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# (wav format tag, bits, raw format name, numpy dtype) for every supported encoding
ENCODINGS = {
    "u8": (1, 8, "u8", "u1"),
    "s16": (1, 16, "s16le", "<i2"),
    "s24": (1, 24, "s24le", None),
    "s32": (1, 32, "s32le", "<i4"),
    "f32": (3, 32, "f32le", "<f4"),
}
# samples that every encoding represents exactly, with their decoded values
KNOWN: dict[str, tuple[list[float], list[float]]] = {
    "u8": ([128, 192, 64, 255, 0], [0.0, 0.5, -0.5, 127 / 128, -1.0]),
    "s8": ([0, 64, -64, 127, -128], [0.0, 0.5, -0.5, 127 / 128, -1.0]),
    "s16": ([0, 2**14, -(2**14), 2**15 - 1, -(2**15)], [0.0, 0.5, -0.5, 1 - 2**-15, -1.0]),
    "s24": ([0, 2**22, -(2**22), 2**23 - 1, -(2**23)], [0.0, 0.5, -0.5, 1 - 2**-23, -1.0]),
    "s32": ([0, 2**30, -(2**30), 2**31 - 1, -(2**31)], [0.0, 0.5, -0.5, 1.0, -1.0]),
    "f32": ([0.0, 0.5, -0.5, 1.0, -1.0], [0.0, 0.5, -0.5, 1.0, -1.0]),
}


def pack(values: list[float] | np.ndarray, encoding: str) -> bytes:
    """Interleaved samples (already in the encoding's integer/float domain) as bytes."""
    if encoding == "s24":
        return b"".join(int(v).to_bytes(3, "little", signed=True) for v in values)
    dtype = {"s8": "i1", **{k: v[3] for k, v in ENCODINGS.items()}}[encoding]
    return np.asarray(values).astype(dtype).tobytes()


def quantize(signal: np.ndarray, encoding: str) -> np.ndarray:
    """Float samples in [-1, 1] -> values in the encoding's domain."""
    if encoding == "f32":
        return signal
    bits = ENCODINGS[encoding][1]
    ints: np.ndarray = np.round(signal * (2 ** (bits - 1) - 1)).astype(np.int64)
    return ints + 128 if encoding == "u8" else ints


def chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def wav(
    data: bytes,
    encoding: str = "s16",
    rate: int = 16000,
    channels: int = 1,
    extensible: bool = False,
    extra: bytes = b"",
    data_size: int | None = None,
    tag: int | None = None,
    block_align: int | None = None,
) -> bytes:
    """A WAV file around sample bytes; `extra` chunks go between fmt and data."""
    fmt_tag, bits = ENCODINGS[encoding][:2]
    block = channels * bits // 8 if block_align is None else block_align
    head = (0xFFFE if extensible else tag or fmt_tag, channels, rate, rate * block, block, bits)
    fmt = struct.pack("<HHIIHH", *head)
    if extensible:
        fmt += struct.pack("<HHII", 22, bits, 0, tag or fmt_tag) + PCM_GUID_TAIL
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + chunk(b"fmt ", fmt) + extra + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def sine(freq: float, rate: int, seconds: float, amplitude: float = 1.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def rejected(call: Callable[[], object]) -> RejectedRecord:
    with pytest.raises(RejectedRecord) as info:
        call()
    return info.value


def reason(value: bytes, content_type: str | None = None, seconds: float = 10.0) -> Reason:
    return rejected(lambda: decode_audio(value, content_type, 16000, AudioLimits(seconds))).reason


# --- what is accepted --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("extensible", [False, True])
def test_wav_encodings_decode_to_known_values(encoding: str, extensible: bool) -> None:
    raw, expected = KNOWN[encoding]
    out = decode_audio(wav(pack(raw, encoding), encoding, extensible=extensible), None, 16000)
    assert out.samples.dtype == np.float32
    np.testing.assert_allclose(out.samples, expected, atol=1e-7)
    assert (out.source_rate, out.source_channels) == (16000, 1)


@pytest.mark.parametrize("encoding", ["u8", "s8", "s16", "s24", "s32", "f32"])
def test_raw_pcm_decodes_to_known_values(encoding: str) -> None:
    raw, expected = KNOWN[encoding]
    name = "s8" if encoding == "s8" else ENCODINGS[encoding][2]
    content_type = f"audio/pcm;rate=16000;channels=1;format={name}"
    out = decode_audio(pack(raw, encoding), content_type, 16000)
    np.testing.assert_allclose(out.samples, expected, atol=1e-7)


def test_stereo_float_48k_sine_becomes_16k_mono() -> None:
    left, right = sine(440, 48000, 1.0, 0.6), sine(440, 48000, 1.0, 0.2)
    stereo = np.stack([left, right], axis=1).reshape(-1)  # interleaved L R L R ...
    out = decode_audio(wav(pack(stereo, "f32"), "f32", 48000, 2), "audio/wav", 16000)
    assert (out.source_rate, out.source_channels, out.duration_ms) == (48000, 2, 1000)
    assert out.samples.shape == (16000,) and out.samples.dtype == np.float32
    expected = sine(440, 16000, 1.0, 0.4)  # the mean of the channels
    inner = slice(200, -200)  # the resampler's edges see zero padding
    np.testing.assert_allclose(out.samples[inner], expected[inner], atol=2e-3)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 96000, 44101, 8001])
def test_common_and_odd_rates_resample_to_the_same_sine(rate: int) -> None:
    data = pack(quantize(sine(1000, rate, 0.5, 0.5), "s16"), "s16")
    out = decode_audio(wav(data, "s16", rate), None, 16000)
    assert len(out.samples) == pytest.approx(8000, abs=1)
    expected = sine(1000, 16000, 0.5, 0.5)[: len(out.samples)]
    inner = slice(200, -200)
    np.testing.assert_allclose(out.samples[inner], expected[inner], atol=5e-3)


def test_sinc_resampler_is_only_used_when_its_kernel_is_small() -> None:
    assert _sinc_is_affordable(480000, 44100, 16000) and _sinc_is_affordable(96000, 96000, 16000)
    assert not _sinc_is_affordable(441010, 44101, 16000)  # gcd 1: a 16000 x 44000 kernel


def test_unknown_chunks_are_skipped() -> None:
    extra = chunk(b"LIST", b"INFOsoftx") + chunk(b"JUNK", bytes(7))  # odd sizes: pad bytes
    data = pack(KNOWN["s16"][0], "s16")
    head = b"RIFF\x00\x00\x00\x00WAVE" + chunk(b"bext", b"abc")
    value = head + wav(data, extra=extra)[12:]  # an unknown chunk before fmt as well
    np.testing.assert_allclose(decode_audio(value, None, 16000).samples, KNOWN["s16"][1])


def test_streaming_data_size_means_up_to_the_end() -> None:
    data = pack(KNOWN["s16"][0], "s16")
    out = decode_audio(wav(data, data_size=0xFFFFFFFF), None, 16000)
    np.testing.assert_allclose(out.samples, KNOWN["s16"][1])


def test_over_range_float_is_clipped() -> None:
    out = decode_audio(wav(pack([1.5, -3.0, 0.25], "f32"), "f32"), None, 16000)
    np.testing.assert_allclose(out.samples, [1.0, -1.0, 0.25])


def test_length_limit_is_inclusive() -> None:
    limits = AudioLimits(max_seconds=0.5)
    exact = pack(np.zeros(4000, dtype=np.int64), "s16")  # 0.5 s at 8 kHz
    assert decode_audio(wav(exact, rate=8000), None, 8000, limits).duration_ms == 500
    longer = wav(exact + bytes(2), rate=8000)
    assert (
        rejected(lambda: decode_audio(longer, None, 8000, limits)).reason == Reason.AUDIO_TOO_LONG
    )


def test_parse_content_type() -> None:
    parsed = parse_content_type('Audio/PCM; rate=16000 ;Channels="2"; format=s16le')
    assert parsed == ContentType("audio/pcm", {"rate": "16000", "channels": "2", "format": "s16le"})
    assert parse_content_type("audio/wav") == ContentType("audio/wav", {})


# --- what is rejected, and why -----------------------------------------------------------


@pytest.mark.parametrize("content_type", ["audio", "/pcm", "audio/pcm;rate", "audio/pcm;=1"])
def test_malformed_content_type(content_type: str) -> None:
    assert reason(bytes(4), content_type) == Reason.INVALID_CONTENT_TYPE


@pytest.mark.parametrize(
    "params, expected",
    [
        ("channels=1;format=s16le", Reason.AUDIO_BAD_RATE),
        ("rate=abc;channels=1;format=s16le", Reason.AUDIO_BAD_RATE),
        ("rate=-16000;channels=1;format=s16le", Reason.AUDIO_BAD_RATE),
        ("rate=7999;channels=1;format=s16le", Reason.AUDIO_BAD_RATE),
        ("rate=96001;channels=1;format=s16le", Reason.AUDIO_BAD_RATE),
        ("rate=16000;format=s16le", Reason.AUDIO_BAD_CHANNELS),
        ("rate=16000;channels=two;format=s16le", Reason.AUDIO_BAD_CHANNELS),
        ("rate=16000;channels=0;format=s16le", Reason.AUDIO_BAD_CHANNELS),
        ("rate=16000;channels=9;format=s16le", Reason.AUDIO_BAD_CHANNELS),
        ("rate=16000;channels=1", Reason.AUDIO_UNSUPPORTED_ENCODING),
        ("rate=16000;channels=1;format=s16be", Reason.AUDIO_UNSUPPORTED_ENCODING),
    ],
)
def test_raw_pcm_needs_valid_parameters(params: str, expected: Reason) -> None:
    err = rejected(lambda: decode_audio(bytes(64), f"audio/pcm;{params}", 16000))
    assert (err.stage, err.reason) == (Stage.VALIDATE, expected)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: wav(d, rate=7999), Reason.AUDIO_BAD_RATE),
        (lambda d: wav(d, rate=96001), Reason.AUDIO_BAD_RATE),
        (lambda d: wav(d, channels=0), Reason.AUDIO_BAD_CHANNELS),
        (lambda d: wav(d, channels=9), Reason.AUDIO_BAD_CHANNELS),
        (lambda d: wav(d, tag=2), Reason.AUDIO_UNSUPPORTED_ENCODING),  # MS ADPCM
        (lambda d: wav(d, "s16", tag=3), Reason.AUDIO_UNSUPPORTED_ENCODING),  # 16-bit float
        (lambda d: wav(d, extensible=True, tag=2), Reason.AUDIO_UNSUPPORTED_ENCODING),
        (
            lambda d: wav(d, extensible=True).replace(PCM_GUID_TAIL, bytes(12)),  # unknown GUID
            Reason.AUDIO_UNSUPPORTED_ENCODING,
        ),
        (lambda d: wav(d, block_align=3), Reason.AUDIO_BAD_HEADER),
        (lambda d: wav(d).replace(b"fmt ", b"fmx "), Reason.AUDIO_BAD_HEADER),  # no fmt
        (lambda d: wav(d).replace(b"data", b"dat\x00"), Reason.AUDIO_BAD_HEADER),  # no data
    ],
)
def test_wav_header_problems(make: Callable[[bytes], bytes], expected: Reason) -> None:
    assert reason(make(pack(KNOWN["s16"][0], "s16"))) == expected


def test_too_long_is_rejected_from_the_header_before_reading_samples() -> None:
    header_only = wav(b"", rate=8000, data_size=11 * 8000 * 2)  # claims 11 s, holds nothing
    err = rejected(lambda: decode_audio(header_only, None, 16000))
    assert (err.stage, err.reason) == (Stage.VALIDATE, Reason.AUDIO_TOO_LONG)
    assert "11.000 s" in err.message


def test_too_long_raw_pcm() -> None:
    content_type = "audio/pcm;rate=8000;channels=1;format=u8"
    assert reason(bytes(8001), content_type, seconds=1.0) == Reason.AUDIO_TOO_LONG


def test_truncated_data_chunk_is_rejected() -> None:
    data = pack(KNOWN["s16"][0], "s16")
    assert reason(wav(data)[:-2]) == Reason.AUDIO_TRUNCATED
    assert reason(wav(data, data_size=len(data) + 2)) == Reason.AUDIO_TRUNCATED


@pytest.mark.parametrize(
    "value, content_type",
    [
        (wav(bytes(9), "s16"), None),  # 4.5 frames of mono 16-bit
        (wav(bytes(16), "s24", channels=2), None),  # 2.67 frames of stereo 24-bit
        (bytes(7), "audio/pcm;rate=8000;channels=2;format=u8"),
    ],
)
def test_partial_frames_are_truncated(value: bytes, content_type: str | None) -> None:
    assert reason(value, content_type) == Reason.AUDIO_TRUNCATED


def test_float_nan_is_rejected() -> None:
    value = wav(pack([0.0, float("nan")], "f32"), "f32")
    err = rejected(lambda: decode_audio(value, None, 16000))
    assert (err.stage, err.reason) == (Stage.DECODE, Reason.AUDIO_NON_FINITE)


@pytest.mark.parametrize(
    "value, content_type, expected",
    [
        (b"", None, Reason.EMPTY_VALUE),
        (wav(b""), None, Reason.AUDIO_EMPTY),
        (b"ID3\x03" + bytes(100), None, Reason.UNSUPPORTED_FORMAT),  # an MP3
        (bytes(100), "audio/mpeg", Reason.UNSUPPORTED_FORMAT),
        (bytes(100), "audio/wav", Reason.CONTENT_TYPE_MISMATCH),
        (
            wav(bytes(4)),
            "audio/pcm;rate=16000;channels=1;format=s16le",
            Reason.CONTENT_TYPE_MISMATCH,
        ),
        (b"RIFF\x00\x00\x00\x00WAVE", None, Reason.AUDIO_BAD_HEADER),
        (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00", None, Reason.AUDIO_TRUNCATED),
    ],
)
def test_other_rejections(value: bytes, content_type: str | None, expected: Reason) -> None:
    assert reason(value, content_type) == expected


def test_fuzzed_wav_only_ever_raises_rejected_record() -> None:
    left, right = sine(440, 48000, 0.02, 0.5), sine(660, 48000, 0.02, 0.5)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    original = wav(
        pack(quantize(stereo, "s16"), "s16"), "s16", 48000, 2, extra=chunk(b"LIST", bytes(9))
    )
    rng, outcomes = random.Random(20260102), {"decoded": 0, "rejected": 0}
    for _ in range(2000):
        try:
            out = decode_audio(mutate(original, rng), None, 48000)  # resample if rate is hit
        except RejectedRecord as err:
            assert err.reason in set(Reason) and err.message
            outcomes["rejected"] += 1
        else:
            assert out.samples.dtype == np.float32 and np.abs(out.samples).max() <= 1.0
            outcomes["decoded"] += 1
    assert outcomes["rejected"] > 500 and outcomes["decoded"] > 300  # both paths exercised
