"""Microphone view of the cell: synthesised sound, chunked into WAV or raw PCM records.

Sound = room noise + machine hum (50 Hz and harmonics, only while the machine runs)
+ fault sounds (a shifted harmonic, band-limited grinding, irregular knocks)
+ the building siren (600-1200 Hz sweep, fire and alarm_test alike)
+ footsteps of people in the cell and background thumps and clicks in every class
(people passing outside), so footsteps alone do not reveal an intrusion.
Tones are functions of absolute time, so chunks join without phase jumps; a transient is
drawn from its own seed, so one that straddles two chunks continues across them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from pipeline.records import Headers, Record
from pipeline.simulate.scenario import (
    DeviceSetup,
    EpisodePlan,
    SampleFormat,
    ScenarioConfig,
    make_rng,
    plan_index,
    walking_spans,
)

Samples = npt.NDArray[np.float64]
_BITS: Mapping[str, int] = MappingProxyType({"s16": 16, "s24": 24, "f32": 32})
_TRANSIENT_MS = 120.0  # longest transient


@dataclass(frozen=True)
class Voice:
    """The device's microphone and machine: fixed per device."""

    hum: tuple[float, ...]  # amplitude of 50, 100, 150, 200 Hz
    hum_phase: tuple[float, ...]
    noise: float  # room noise standard deviation
    gain: float  # microphone gain
    stereo: tuple[float, float]  # gains of the two channels


@dataclass(frozen=True)
class _EpisodeSound:
    siren_period_s: float
    siren_amp: float
    fault_shift: float  # relative shift of the fault's extra harmonics
    fault_rate_hz: float  # grinding modulation rate
    fault_amp: float
    events: tuple[tuple[float, str, float], ...]  # (world ms, kind, amplitude)


def make_voice(rng: np.random.Generator) -> Voice:
    fundamental = float(rng.uniform(0.04, 0.1))
    hum = tuple(fundamental * float(rng.uniform(0.2, 1.0)) if k else fundamental for k in range(4))
    return Voice(
        hum=hum,
        hum_phase=tuple(float(v) for v in rng.uniform(0, 2 * math.pi, 4)),
        noise=float(rng.uniform(0.004, 0.015)),
        gain=float(rng.uniform(0.6, 1.4)),
        stereo=(float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.6, 1.0))),
    )


def _poisson(rng: np.random.Generator, a: float, b: float, rate_hz: float) -> list[float]:
    n = int(rng.poisson(max(b - a, 0.0) / 1000.0 * rate_hz))
    return sorted(float(t) for t in rng.uniform(a, b, n))


def episode_sound(plan: EpisodePlan) -> _EpisodeSound:
    rng = make_rng(plan.seed, "sound")
    ep = plan.episode
    events = [
        (t, "thump" if rng.random() < 0.6 else "click", float(rng.uniform(0.015, 0.05)))
        for t in _poisson(rng, ep.start_ms, ep.end_ms, 0.6)
    ]
    for a, b in walking_spans(plan):
        cadence = float(rng.uniform(450, 650))  # ms between steps
        events += [
            (float(t), "thump", float(rng.uniform(0.02, 0.05)))
            for t in np.arange(a + rng.uniform(0, cadence), b, cadence)
        ]
    if plan.label == "machine_fault":
        rate = float(rng.uniform(2.0, 6.0)) * plan.intensity
        events += [
            (t, "knock", float(rng.uniform(0.15, 0.5)) * plan.intensity)
            for t in _poisson(rng, ep.start_ms, ep.end_ms, rate)
        ]
    return _EpisodeSound(
        siren_period_s=float(rng.uniform(0.8, 3.0)),
        siren_amp=float(rng.uniform(0.12, 0.35)),
        fault_shift=float(rng.uniform(0.04, 0.1)),
        fault_rate_hz=float(rng.uniform(8, 25)),
        fault_amp=float(rng.uniform(0.03, 0.09)) * plan.intensity,
        events=tuple(sorted(events)),
    )


def _transient(kind: str, amp: float, rate: int, seed: tuple[int, int]) -> Samples:
    """One knock / footstep thump / click, the same whichever chunk asks for it."""
    rng = make_rng(seed[0], kind, seed[1])
    t = np.arange(int(rate * _TRANSIENT_MS / 1000)) / rate  # (n,) seconds
    if kind == "knock":
        tone = np.sin(2 * math.pi * rng.uniform(150, 600) * t) + 0.5 * rng.normal(0, 1, t.size)
        return amp * tone * np.exp(-t / rng.uniform(0.015, 0.04))
    if kind == "thump":
        tone = np.sin(2 * math.pi * rng.uniform(60, 120) * t) + 0.4 * rng.normal(0, 1, t.size)
        return amp * tone * np.exp(-t / 0.012)
    return amp * rng.normal(0, 1, t.size) * np.exp(-t / 0.003)


def _band_noise(rng: np.random.Generator, n: int, rate: int, lo: float, hi: float) -> Samples:
    spectrum = np.fft.rfft(rng.normal(0, 1, n))  # (n // 2 + 1,)
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < lo) | (freqs > hi)] = 0
    out: Samples = np.fft.irfft(spectrum, n)  # (n,)
    return out / (np.std(out) + 1e-9)


def _episode_part(
    x: Samples,
    t_s: Samples,
    t_ms: Samples,
    plan: EpisodePlan,
    snd: _EpisodeSound,
    voice: Voice,
    rate: int,
    rng: np.random.Generator,
) -> None:
    """Add the episode's sound to `x` (samples at world times t_ms, t_s = seconds)."""
    if plan.machine_running:
        for k, (amp, ph) in enumerate(zip(voice.hum, voice.hum_phase, strict=True)):
            x += amp * np.sin(2 * math.pi * 50.0 * (k + 1) * t_s + ph)
    if plan.label == "machine_fault":
        for k in (2, 3):
            shifted = 50.0 * k * (1 + snd.fault_shift)  # Hz
            x += 0.7 * voice.hum[k - 1] * np.sin(2 * math.pi * shifted * t_s)
        if x.size > 16:
            grind = _band_noise(rng, x.size, rate, 1500.0, min(4000.0, rate * 0.45))
            x += snd.fault_amp * grind * np.sin(math.pi * snd.fault_rate_hz * t_s) ** 2
    if plan.siren is not None:
        on = (t_ms >= plan.siren[0]) & (t_ms < plan.siren[1])
        tau = (t_ms[on] - plan.siren[0]) / 1000.0
        period = snd.siren_period_s  # f(tau) = 900 + 300 sin(2 pi tau / period)
        sweep = 300 * period / (2 * math.pi) * np.cos(2 * math.pi * tau / period)
        phase = 2 * math.pi * (900 * tau - sweep)
        x[on] += snd.siren_amp * (np.sin(phase) + 0.25 * np.sin(2 * phase))
    times = [e[0] for e in snd.events]
    first = int(np.searchsorted(times, t_ms[0] - _TRANSIENT_MS))
    last = int(np.searchsorted(times, t_ms[-1], side="right"))
    for i in range(first, last):
        at, kind, amp = snd.events[i]
        wave = _transient(kind, amp, rate, (plan.seed, i))
        start = int(round((at - t_ms[0]) * rate / 1000.0))
        lo, hi = max(start, 0), min(start + wave.size, x.size)
        if hi > lo:
            x[lo:hi] += wave[lo - start : hi - start]


def synthesize(
    t_ms: Samples,
    origin_ms: int,
    plans: Sequence[EpisodePlan],
    starts: Sequence[int],
    voice: Voice,
    sounds: dict[int, _EpisodeSound],
    rate: int,
    rng: np.random.Generator,
) -> Samples:
    """Mono sound at world times `t_ms` (sorted); `sounds` caches per-episode details."""
    x = rng.normal(0.0, voice.noise, t_ms.size)  # (n,)
    t_s = (t_ms - origin_ms) / 1000.0
    first, last = plan_index(starts, t_ms[0]), plan_index(starts, t_ms[-1])
    for i in range(first, last + 1):
        plan = plans[i]
        if i not in sounds:
            sounds[i] = episode_sound(plan)
        lo = 0 if i == first else int(np.searchsorted(t_ms, plan.episode.start_ms))
        hi = t_ms.size if i == last else int(np.searchsorted(t_ms, plan.episode.end_ms))
        if hi > lo:
            part = x[lo:hi]  # a view: the episode adds its sound in place
            _episode_part(part, t_s[lo:hi], t_ms[lo:hi], plan, sounds[i], voice, rate, rng)
    return x * voice.gain


def encode_samples(x: npt.NDArray[np.float32], fmt: SampleFormat) -> bytes:
    """Interleaved little-endian samples of x (n, channels) in [-1, 1]."""
    clipped = np.clip(x, -1.0, 1.0)
    if fmt == "f32":
        return clipped.astype("<f4").tobytes()
    if fmt == "s16":
        return np.round(clipped * 32767).astype("<i2").tobytes()
    wide = np.round(clipped * 8388607).astype("<i4").reshape(-1, 1).view(np.uint8)  # (n*ch, 4)
    return wide[:, :3].tobytes()


def wav_bytes(x: npt.NDArray[np.float32], rate: int, fmt: SampleFormat) -> bytes:
    """A RIFF/WAVE file: PCM for s16/s24, IEEE float (fmt size 18 + fact chunk) for f32."""
    channels, bits = x.shape[1], _BITS[fmt]
    block = channels * bits // 8
    if fmt == "f32":
        fmt_chunk = struct.pack(
            "<4sIHHIIHHH", b"fmt ", 18, 3, channels, rate, rate * block, block, bits, 0
        )
        fmt_chunk += struct.pack("<4sII", b"fact", 4, x.shape[0])
    else:
        fmt_chunk = struct.pack(
            "<4sIHHIIHH", b"fmt ", 16, 1, channels, rate, rate * block, block, bits
        )
    data = encode_samples(x, fmt)
    head = struct.pack("<4sI4s", b"RIFF", 4 + len(fmt_chunk) + 8 + len(data), b"WAVE")
    return head + fmt_chunk + struct.pack("<4sI", b"data", len(data)) + data


def audio_records(
    cfg: ScenarioConfig, setup: DeviceSetup, plans: Sequence[EpisodePlan], topic: str
) -> Iterator[Record]:
    """Chunks of chunk_ms; a chunk's timestamp is its first sample on the mic's skewed clock."""
    rng = make_rng(cfg.seed, setup.index, "audio")
    voice = make_voice(make_rng(cfg.seed, setup.index, "voice"))
    starts, sounds = [p.episode.start_ms for p in plans], dict[int, _EpisodeSound]()
    rate, origin = setup.audio_rate, cfg.start_ms + int(rng.integers(0, setup.chunk_ms))
    headers: Headers = ()
    if setup.audio_raw_pcm:
        headers = (
            (
                "content-type",
                f"audio/pcm;rate={rate};channels={setup.audio_channels};format=s16le".encode(),
            ),
        )
    elif setup.content_type_headers:
        headers = (("content-type", b"audio/wav"),)
    key, k = setup.device_id.encode(), 0
    while True:
        n0, n1 = k * setup.chunk_ms * rate // 1000, (k + 1) * setup.chunk_ms * rate // 1000
        ts = origin + n0 * 1000 // rate
        if ts >= cfg.end_ms:
            return
        t_ms = origin - setup.audio_offset_ms + np.arange(n0, n1) * 1000.0 / rate  # (n,)
        mono = synthesize(t_ms, cfg.start_ms, plans, starts, voice, sounds, rate, rng)
        for old in [i for i in sounds if plans[i].episode.end_ms < t_ms[0] - 1000]:
            del sounds[old]
        chans = [g * mono + rng.normal(0.0, voice.noise * 0.3, mono.size) for g in voice.stereo]
        x = np.stack(chans[: setup.audio_channels], axis=1).astype(np.float32)  # (n, channels)
        if setup.audio_raw_pcm:
            value = encode_samples(x, "s16")
        else:
            value = wav_bytes(x, rate, setup.audio_format)
        yield Record(topic, -1, -1, ts, key, value, headers)
        k += 1
