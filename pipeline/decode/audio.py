"""Audio chunks: WAV (parsed by hand) or raw PCM described by `content-type`.

`decode_audio` returns mono float32 samples in [-1, 1] at the model's rate. WAV is parsed
here rather than with the `wave` module, which reads neither float nor extensible WAV.

Decisions:
- A data chunk shorter than its header declares, or a body that is not a whole number of
  sample frames, is rejected as ``audio_truncated``: it is damaged input, and padding it
  would feed the model invented audio. A data size of 0xFFFFFFFF (streaming writers that
  cannot seek back) means "up to the end of the value".
- The length limit is checked from the header before any sample is converted.
- Float samples must be finite (``audio_non_finite``); over-range floats are clipped.
- Channels are downmixed by their mean. Rates differing from the target are resampled with
  torchaudio's windowed-sinc resampler (its kernel and convolution, in numpy: no torch on
  this path, so an install without torch decodes audio the same way); for rate pairs whose
  reduced ratio would make its kernel huge (e.g. 44101 Hz, a memory/CPU bomb), an FFT
  resampler is used instead.
- Without `content-type` the value is sniffed: RIFF....WAVE is WAV, anything else is
  refused (raw PCM cannot be recognised from its bytes).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.decode.errors import Reason, RejectedRecord, invalid, preview, undecodable

MIN_RATE, MAX_RATE = 8_000, 96_000
MAX_CHANNELS = 8
WAV_MIMES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
PCM_MIMES = frozenset({"audio/pcm", "audio/x-pcm"})
_UNINFORMATIVE_MIMES = frozenset({"", "application/octet-stream"})
WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
# KSDATAFORMAT_SUBTYPE_*: the format code as a little-endian DWORD, then this fixed tail
_SUBFORMAT_GUID_TAIL = b"\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_UNKNOWN_SIZE = 0xFFFFFFFF
_MAX_SINC_KERNEL = 1 << 20  # elements of torchaudio's resampling kernel
_SINC_ZEROS, _ROLLOFF = 6, 0.99  # torchaudio's lowpass_filter_width and rolloff defaults
_SINC_BLOCK = 1 << 18  # input elements per matrix product (bounds the temporary memory)
_MAX_SINC_MACS = 1 << 29  # multiply-adds of its convolution


@dataclass(frozen=True, slots=True)
class AudioLimits:
    max_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class ContentType:
    mime: str  # lower-case "type/subtype"
    params: dict[str, str] = field(default_factory=dict)  # lower-case names


@dataclass(frozen=True, slots=True)
class SampleFormat:
    name: str  # raw PCM name, e.g. "s16le"
    width: int  # bytes per sample
    is_float: bool = False
    is_unsigned: bool = False


PCM_FORMATS = {
    f.name: f
    for f in (
        SampleFormat("u8", 1, is_unsigned=True),
        SampleFormat("s8", 1),
        SampleFormat("s16le", 2),
        SampleFormat("s24le", 3),
        SampleFormat("s32le", 4),
        SampleFormat("f32le", 4, is_float=True),
    )
}


@dataclass(frozen=True, slots=True)
class Layout:
    """How the sample bytes are laid out: what the WAV header or the content-type says."""

    fmt: SampleFormat
    rate: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return self.fmt.width * self.channels


@dataclass(frozen=True, slots=True, eq=False)
class AudioChunk:
    samples: np.ndarray  # (n,) float32 mono at the target rate, in [-1, 1]
    source_rate: int
    source_channels: int
    duration_ms: int  # of the source audio, rounded to the nearest millisecond


def parse_content_type(ct: str) -> ContentType:
    """``audio/pcm; rate=16000; channels=1`` -> ContentType("audio/pcm", {"rate": "16000", ...}).

    Raises RejectedRecord(validate, invalid_content_type) when it is not type/subtype with
    name=value parameters.
    """
    mime, *parts = ct.split(";")
    mime = mime.strip().lower()
    kind, _, subtype = mime.partition("/")
    if not kind or not subtype or " " in mime:
        raise invalid(Reason.INVALID_CONTENT_TYPE, f"content-type {ct[:100]!r} is not type/subtype")
    params: dict[str, str] = {}
    for part in parts:
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise invalid(
                Reason.INVALID_CONTENT_TYPE,
                f"content-type parameter {part.strip()[:50]!r} is not name=value",
            )
        params[name.strip().lower()] = value.strip().strip('"')
    return ContentType(mime, params)


def decode_audio(
    value: bytes, content_type: str | None, target_rate: int, limits: AudioLimits = AudioLimits()
) -> AudioChunk:
    """Decode WAV or raw PCM to mono float32 at `target_rate`; raises only RejectedRecord."""
    if target_rate < 1:
        raise ValueError(f"decode_audio: target_rate must be positive, got {target_rate}")
    try:
        layout, data = _locate(value, content_type, limits)
        mono = _to_mono(data, layout)  # (frames,)
        samples = _resample(mono, layout.rate, target_rate)  # (frames * target / rate,)
    except RejectedRecord:
        raise
    except Exception as exc:  # hostile bytes must not escape as anything else
        raise undecodable(
            Reason.AUDIO_CORRUPT, f"audio could not be decoded ({exc!r}); check the producer"
        ) from exc
    frames = len(data) // layout.frame_bytes
    return AudioChunk(
        samples=samples,
        source_rate=layout.rate,
        source_channels=layout.channels,
        duration_ms=(frames * 1000 + layout.rate // 2) // layout.rate,
    )


def _locate(value: bytes, content_type: str | None, limits: AudioLimits) -> tuple[Layout, bytes]:
    """The sample layout and the sample bytes, all limits checked."""
    if not value:
        raise invalid(Reason.EMPTY_VALUE, "audio record has an empty value; send WAV or PCM")
    is_riff = len(value) >= 12 and value[:4] == b"RIFF" and value[8:12] == b"WAVE"
    ct = parse_content_type(content_type) if content_type else None
    mime = "" if ct is None else ct.mime
    if mime in PCM_MIMES and ct is not None:
        if is_riff:
            raise invalid(
                Reason.CONTENT_TYPE_MISMATCH,
                "content-type says raw PCM but the value is a WAV file; use audio/wav",
            )
        layout = _pcm_layout(ct.params)
        _check_length(len(value) // layout.frame_bytes, layout, limits)
        _check_whole_frames(len(value), layout)
        return layout, value
    if mime in WAV_MIMES and not is_riff:
        raise invalid(
            Reason.CONTENT_TYPE_MISMATCH,
            f"content-type says WAV but the value has no RIFF/WAVE header "
            f"(starts {preview(value, 16)}); fix the producer's content-type header",
        )
    if mime in WAV_MIMES or (mime in _UNINFORMATIVE_MIMES and is_riff):
        return _wav(value, limits)
    what = (
        f"content-type {content_type[:100]!r}"
        if content_type
        else f"value (starts {preview(value, 16)})"
    )
    raise invalid(
        Reason.UNSUPPORTED_FORMAT,
        f"{what} is not an audio format the pipeline reads; send WAV, or raw PCM with "
        "content-type audio/pcm;rate=..;channels=..;format=..",
    )


def _pcm_layout(params: dict[str, str]) -> Layout:
    fmt = PCM_FORMATS.get(params.get("format", "").lower())
    if fmt is None:
        raise invalid(
            Reason.AUDIO_UNSUPPORTED_ENCODING,
            f"raw PCM format {params.get('format')!r} is missing or unknown; set "
            f"content-type format= to one of {', '.join(PCM_FORMATS)}",
        )
    rate = _int_param(params, "rate", Reason.AUDIO_BAD_RATE, f"{MIN_RATE}-{MAX_RATE}")
    channels = _int_param(params, "channels", Reason.AUDIO_BAD_CHANNELS, f"1-{MAX_CHANNELS}")
    return _checked_layout(fmt, rate, channels)


def _int_param(params: dict[str, str], name: str, reason: Reason, allowed: str) -> int:
    text = params.get(name, "")
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise invalid(
            reason,
            f"raw PCM {name} {params.get(name)!r} is missing or not an integer; "
            f"set content-type {name}= to {allowed}",
        )
    return int(text)


def _checked_layout(fmt: SampleFormat, rate: int, channels: int) -> Layout:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise invalid(
            Reason.AUDIO_BAD_RATE, f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise invalid(Reason.AUDIO_BAD_CHANNELS, f"{channels} channels is outside 1-{MAX_CHANNELS}")
    return Layout(fmt, rate, channels)


def _check_length(frames: int, layout: Layout, limits: AudioLimits) -> None:
    seconds = frames / layout.rate
    if seconds > limits.max_seconds:
        raise invalid(
            Reason.AUDIO_TOO_LONG,
            f"audio chunk is {seconds:.3f} s, over the {limits.max_seconds} s limit; "
            "send shorter chunks or raise the audio length limit",
        )
    if frames == 0:
        raise invalid(Reason.AUDIO_EMPTY, "audio chunk holds no samples; send non-empty chunks")


def _check_whole_frames(nbytes: int, layout: Layout) -> None:
    if nbytes % layout.frame_bytes:
        raise invalid(
            Reason.AUDIO_TRUNCATED,
            f"{nbytes} bytes of samples is not a whole number of {layout.frame_bytes}-byte "
            "frames: the last frame is cut; check the producer",
        )


def _wav(value: bytes, limits: AudioLimits) -> tuple[Layout, bytes]:
    """RIFF/WAVE: walk the chunks to fmt and data, skipping unknown ones."""
    layout: Layout | None = None
    pos, n = 12, len(value)
    while pos + 8 <= n:
        chunk_id, size = struct.unpack_from("<4sI", value, pos)
        body = pos + 8
        if chunk_id == b"fmt ":
            if body + size > n:
                raise invalid(Reason.AUDIO_TRUNCATED, "WAV ends inside its fmt chunk")
            layout = _wav_layout(value[body : body + size])
        elif chunk_id == b"data":
            if layout is None:
                raise invalid(Reason.AUDIO_BAD_HEADER, "WAV data chunk comes before fmt")
            return layout, _wav_data(value, body, size, layout, limits)
        elif body + size > n:
            raise invalid(Reason.AUDIO_TRUNCATED, f"WAV ends inside its {chunk_id!r} chunk")
        pos = body + size + (size & 1)  # chunks are padded to an even size
    raise invalid(
        Reason.AUDIO_BAD_HEADER,
        f"WAV has no {'data' if layout else 'fmt'} chunk; the file is incomplete or not WAV",
    )


def _wav_data(value: bytes, body: int, size: int, layout: Layout, limits: AudioLimits) -> bytes:
    available = len(value) - body
    declared = available if size == _UNKNOWN_SIZE else size
    _check_length(declared // layout.frame_bytes, layout, limits)  # before touching samples
    if declared > available:
        raise invalid(
            Reason.AUDIO_TRUNCATED,
            f"WAV data chunk declares {declared} bytes but only {available} follow: the "
            "chunk is truncated; check that the producer sends whole files",
        )
    _check_whole_frames(declared, layout)
    return value[body : body + declared]


def _wav_layout(fmt_chunk: bytes) -> Layout:
    if len(fmt_chunk) < 16:
        raise invalid(Reason.AUDIO_BAD_HEADER, f"WAV fmt chunk is {len(fmt_chunk)} bytes, < 16")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt_chunk)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(fmt_chunk) < 40:
            raise invalid(Reason.AUDIO_BAD_HEADER, "WAVE_FORMAT_EXTENSIBLE fmt chunk < 40 bytes")
        tag, tail = struct.unpack_from("<I12s", fmt_chunk, 24)
        if tail != _SUBFORMAT_GUID_TAIL:
            raise invalid(
                Reason.AUDIO_UNSUPPORTED_ENCODING,
                "WAVE_FORMAT_EXTENSIBLE subformat is not a standard PCM/float GUID",
            )
    fmt = _wav_sample_format(tag, bits)
    layout = _checked_layout(fmt, rate, channels)
    if block_align != layout.frame_bytes:
        raise invalid(
            Reason.AUDIO_BAD_HEADER,
            f"WAV block align {block_align} != {channels} channels x {bits} bits / 8",
        )
    return layout


def _wav_sample_format(tag: int, bits: int) -> SampleFormat:
    if tag == WAVE_FORMAT_PCM and bits in (8, 16, 24, 32):
        return PCM_FORMATS["u8" if bits == 8 else f"s{bits}le"]  # 8-bit WAV is unsigned
    if tag == WAVE_FORMAT_IEEE_FLOAT and bits == 32:
        return PCM_FORMATS["f32le"]
    raise invalid(
        Reason.AUDIO_UNSUPPORTED_ENCODING,
        f"WAV encoding (format tag {tag:#x}, {bits} bits) is not supported; use PCM "
        "8/16/24/32-bit integer or 32-bit float",
    )


def _to_float(data: bytes, fmt: SampleFormat) -> np.ndarray:
    """Interleaved sample bytes -> (samples,) float32 in [-1, 1]."""
    if fmt.is_float:
        out = np.frombuffer(data, dtype="<f4")  # (samples,)
        if not np.isfinite(out).all():
            raise undecodable(Reason.AUDIO_NON_FINITE, "float audio holds NaN or infinite samples")
        clipped: np.ndarray = np.clip(out, -1.0, 1.0).astype(np.float32)  # (samples,)
        return clipped
    if fmt.width == 3:
        packed = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)  # (samples, 3)
        wide = np.zeros((packed.shape[0], 4), dtype=np.uint8)  # (samples, 4)
        wide[:, 1:] = packed  # sample in the top 3 bytes of a little-endian int32
        ints = wide.view("<i4")[:, 0] >> 8  # (samples,), sign-extended
    else:
        dtype = {1: "u1" if fmt.is_unsigned else "i1", 2: "<i2", 4: "<i4"}[fmt.width]
        ints = np.frombuffer(data, dtype=dtype)  # (samples,)
    # straight to float32: exact up to 24 bits; a 32-bit sample is rounded once, as it
    # would be going through float64 (scaling by a power of two is exact)
    samples = ints.astype(np.float32)  # (samples,)
    if fmt.is_unsigned:
        samples -= 128.0
    samples *= np.float32(1.0 / (1 << (8 * fmt.width - 1)))
    return samples


def _to_mono(data: bytes, layout: Layout) -> np.ndarray:
    interleaved = _to_float(data, layout.fmt)  # (frames * channels,)
    if layout.channels == 1:
        return interleaved
    frames = interleaved.reshape(-1, layout.channels)  # (frames, channels)
    mono: np.ndarray = frames.mean(axis=1, dtype=np.float32)  # (frames,)
    return mono


def _resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return np.ascontiguousarray(mono, dtype=np.float32)
    if _sinc_is_affordable(len(mono), rate, target):
        out = _sinc_resample(np.ascontiguousarray(mono, dtype=np.float32), rate, target)
    else:
        out = _fft_resample(mono, target, rate)  # (frames',)
    clipped: np.ndarray = np.clip(out, -1.0, 1.0).astype(np.float32)  # sinc may overshoot
    return clipped


@functools.lru_cache(maxsize=64)
def _sinc_kernel(rate: int, target: int) -> tuple[np.ndarray, int]:
    """torchaudio's sinc_interp_hann kernel for a rate pair, float32 (new, 2 * width + orig)
    with orig/new the reduced rates, and its width; computed as torchaudio computes it
    (float64, its output-phase offsets in float32) and built once per pair (building it
    cost up to 10x the resampling itself for 22.05 kHz -> 16 kHz chunks)."""
    gcd = math.gcd(rate, target)
    orig, new = rate // gcd, target // gcd
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_SINC_ZEROS * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig  # (1, K)
    phase = (np.arange(0, -new, -1) / new).astype(np.float32).astype(np.float64)  # (new,)
    t = np.clip((phase[:, None] + idx) * base, -_SINC_ZEROS, _SINC_ZEROS)  # (new, K)
    window = np.cos(t * math.pi / _SINC_ZEROS / 2) ** 2  # (new, K)
    t *= math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t) * (window * (base / orig))  # (new, K)
    return kernel.astype(np.float32), width


def _sinc_resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    """torchaudio.functional.resample's convolution: output block j (new samples) is the
    kernel applied to the padded input from j * orig on."""
    kernel, width = _sinc_kernel(rate, target)  # (new, K)
    gcd = math.gcd(rate, target)
    orig, new = rate // gcd, target // gcd
    padded = np.pad(mono, (width, width + orig))  # (frames + K,)
    starts = sliding_window_view(padded, kernel.shape[1])[::orig]  # (frames // orig + 1, K)
    rows = max(1, _SINC_BLOCK // kernel.shape[1])
    blocks = [  # (r, K) @ (K, new) -> (r, new); a contiguous copy multiplies ~2x faster
        np.ascontiguousarray(starts[i : i + rows]) @ kernel.T for i in range(0, len(starts), rows)
    ]
    out = np.concatenate(blocks).reshape(-1)  # (frames // orig + 1) * new
    return out[: math.ceil(new * len(mono) / orig)]  # (frames * target / rate, rounded up)


def _sinc_is_affordable(frames: int, rate: int, target: int) -> bool:
    """Whether torchaudio's kernel (as torchaudio sizes it) stays small for this ratio."""
    gcd = math.gcd(rate, target)
    orig, new = rate // gcd, target // gcd
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))  # lowpass_filter_width=6, rolloff
    kernel_len = 2 * width + orig
    out_frames = frames * target // rate + 1
    return new * kernel_len <= _MAX_SINC_KERNEL and out_frames * kernel_len <= _MAX_SINC_MACS


def _fft_resample(mono: np.ndarray, target: int, rate: int) -> np.ndarray:
    """Band-limited resampling by truncating or zero-padding the spectrum.

    The input is zero-padded to a multiple of rate/gcd samples so that the output grid is
    exactly `target` Hz (not merely close to it), then the padding's output is cut off.
    """
    step = rate // math.gcd(rate, target)  # < 96000: at most 1 s of padding
    n_in = -(-len(mono) // step) * step
    n_full = n_in * target // rate  # exact
    spectrum = np.fft.rfft(mono.astype(np.float64), n=n_in)  # (n_in // 2 + 1,)
    kept = np.zeros(n_full // 2 + 1, dtype=np.complex128)  # (n_full // 2 + 1,)
    bins = min(len(kept), len(spectrum))
    kept[:bins] = spectrum[:bins]
    full = np.fft.irfft(kept, n=n_full) * (n_full / n_in)  # (n_full,)
    return full[: round(len(mono) * target / rate)]  # (frames * target / rate,)
