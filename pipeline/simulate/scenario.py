"""The simulated production cell: classes, device setups and each device's event schedule.

A device is one monitored cell with a camera, a microphone and a sensor unit. Its
timeline is a list of `EpisodePlan`s tiling `[start_ms, end_ms)`: `normal` stretches
alternate with episodes of the other classes. A plan holds what the modalities must agree
on (door openings, the person's walk, the siren, fire progress); camera.py, audio.py and
telemetry.py each render their own view of it. Every random draw comes from a generator
seeded by (seed, device, purpose), so a config always yields the same streams.

Confusable pairs (one modality alone cannot separate them; fusion can):
fire/alarm_test share the siren (audio), maintenance/intrusion share the person (camera),
normal/alarm_test/intrusion look alike to telemetry except for door moments.
"""

from __future__ import annotations

import bisect
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

CLASSES: tuple[str, ...] = (
    "normal",
    "machine_fault",
    "fire",
    "intrusion",
    "maintenance",
    "alarm_test",
)
EVENT_CLASSES: tuple[str, ...] = CLASSES[1:]
STREAMS: tuple[str, ...] = ("camera", "audio", "telemetry", "labels")
DEFAULT_TOPICS: Mapping[str, str] = MappingProxyType(
    {
        "camera": "iot.camera",
        "audio": "iot.audio",
        "telemetry": "iot.telemetry",
        "labels": "iot.labels",
    }
)
SetupProfile = Literal["train", "unseen"]
ImageFormat = Literal["jpeg", "png"]
SampleFormat = Literal["s16", "s24", "f32"]
Keyframe = tuple[float, float, float]  # (world time ms, x, feet y), x and y as frame fractions

_DEVICE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def make_rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded by `parts` only (strings hashed with crc32): no global RNG."""
    ints = [p & 0xFFFFFFFFFFFFFFFF if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(ints)))


@dataclass(frozen=True)
class ScenarioConfig:
    seed: int
    devices: int
    duration_s: float
    start_ms: int = 1767225600000  # 2026-01-01T00:00:00Z
    profile: SetupProfile = "train"
    topics: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TOPICS))
    camera_fps: float | None = None  # overrides every device's frame rate
    audio_chunk_ms: int | None = None  # overrides every device's chunk length
    telemetry_hz: float | None = None  # overrides every device's sample rate
    streams: tuple[str, ...] = STREAMS  # which of camera/audio/telemetry/labels to emit
    device_prefix: str = "cell"

    def __post_init__(self) -> None:
        if self.devices < 1 or self.duration_s <= 0:
            raise ValueError(
                f"need devices >= 1 and duration_s > 0, got devices={self.devices}, "
                f"duration_s={self.duration_s}"
            )
        if self.profile not in ("train", "unseen"):
            raise ValueError(f"profile must be 'train' or 'unseen', got {self.profile!r}")
        unknown = [s for s in self.streams if s not in STREAMS]
        missing = [s for s in self.streams if s not in self.topics]
        if unknown or missing:
            raise ValueError(
                f"streams must be among {STREAMS} and each needs a topic; unknown="
                f"{unknown}, without topic={missing}"
            )
        for name, value in (
            ("camera_fps", self.camera_fps),
            ("telemetry_hz", self.telemetry_hz),
            ("audio_chunk_ms", self.audio_chunk_ms),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if not _DEVICE_ID.match(f"{self.device_prefix}-{self.devices - 1:02d}"):
            raise ValueError(
                f"device_prefix {self.device_prefix!r} makes invalid device ids: "
                "use 1-120 chars of [A-Za-z0-9._:-]"
            )

    @property
    def end_ms(self) -> int:
        return self.start_ms + round(self.duration_s * 1000)

    def device_id(self, index: int) -> str:
        return f"{self.device_prefix}-{index:02d}"


@dataclass(frozen=True)
class DeviceSetup:
    device_id: str
    index: int
    width: int
    height: int
    fps: float
    image_format: ImageFormat
    jpeg_quality: int
    audio_rate: int
    audio_channels: int
    audio_format: SampleFormat
    audio_raw_pcm: bool  # raw PCM with a content-type header instead of WAV
    chunk_ms: int
    telemetry_hz: float
    camera_offset_ms: int  # fixed clock skew of each modality: stamp = world time + offset
    audio_offset_ms: int
    telemetry_offset_ms: int
    content_type_headers: bool  # also label WAV/image records with a content-type header
    door_x: float  # where the door is, as a fraction of the frame width


@dataclass(frozen=True)
class _Choices:
    sizes: tuple[tuple[int, int], ...]
    size_p: tuple[float, ...]
    fps: tuple[float, ...]
    rates: tuple[int, ...]
    channels: tuple[int, ...]
    telemetry_hz: tuple[float, ...]
    chunk_ms: tuple[int, ...]


_PROFILES: Mapping[str, _Choices] = MappingProxyType(
    {
        "train": _Choices(
            ((640, 480), (320, 240), (1280, 720)),
            (0.4, 0.35, 0.25),
            (2.0, 4.0, 5.0, 8.0, 10.0),
            (16000, 22050, 44100, 48000),
            (1, 2),
            (2.0, 5.0, 10.0, 20.0),
            (500,),
        ),
        "unseen": _Choices(
            ((800, 600), (960, 540)),
            (0.6, 0.4),
            (1.0, 3.0, 6.0, 12.0),
            (8000, 32000),
            (2,),
            (1.0, 25.0),
            (250, 1000),
        ),
    }
)


def device_setup(cfg: ScenarioConfig, index: int) -> DeviceSetup:
    """The hardware of device `index`, drawn from the config's profile."""
    rng = make_rng(cfg.seed, index, "setup", cfg.profile)
    ch = _PROFILES[cfg.profile]
    width, height = ch.sizes[int(rng.choice(len(ch.sizes), p=ch.size_p))]
    png = width <= 320 and bool(rng.random() < 0.5)
    fps = 2.0 if png else float(rng.choice(ch.fps))
    fmt: SampleFormat = ("s16", "s24", "f32")[int(rng.choice(3, p=(0.7, 0.15, 0.15)))]
    offsets = rng.integers(-40, 41, size=3)
    return DeviceSetup(
        device_id=cfg.device_id(index),
        index=index,
        width=width,
        height=height,
        fps=cfg.camera_fps or fps,
        image_format="png" if png else "jpeg",
        jpeg_quality=int(rng.integers(80, 91)),
        audio_rate=int(rng.choice(ch.rates)),
        audio_channels=int(rng.choice(ch.channels)),
        audio_format=fmt,
        audio_raw_pcm=fmt == "s16" and bool(rng.random() < 0.3),
        chunk_ms=cfg.audio_chunk_ms or int(rng.choice(ch.chunk_ms)),
        telemetry_hz=cfg.telemetry_hz or float(rng.choice(ch.telemetry_hz)),
        camera_offset_ms=int(offsets[0]),
        audio_offset_ms=int(offsets[1]),
        telemetry_offset_ms=int(offsets[2]),
        content_type_headers=bool(rng.random() < 0.5),
        door_x=float(rng.uniform(0.08, 0.22) if rng.random() < 0.5 else rng.uniform(0.78, 0.92)),
    )


@dataclass(frozen=True, order=True)
class Episode:
    """Ground truth: `label` holds on the half-open span [start_ms, end_ms)."""

    start_ms: int
    end_ms: int
    label: str


@dataclass(frozen=True)
class EpisodePlan:
    episode: Episode
    seed: int  # seeds the episode's details in each modality (knocks, smoke, clothes)
    intensity: float  # 0.5..1: how strong the episode's signs are
    machine_running: bool
    doors: tuple[tuple[int, int], ...] = ()  # world-time spans with the door open
    person: tuple[int, int] | None = None  # world-time span a person is in the cell
    path: tuple[Keyframe, ...] = ()  # the person's walk, linear between keyframes
    siren: tuple[int, int] | None = None  # world-time span the building alarm sounds
    warning_light: bool = False  # the machine's fault lamp blinks
    ramp_ms: float = 5000.0  # fire growth time constant

    @property
    def label(self) -> str:
        return self.episode.label


def schedule(cfg: ScenarioConfig, setup: DeviceSetup) -> list[EpisodePlan]:
    """Plans tiling [cfg.start_ms, cfg.end_ms): normal stretches (3-12 s) alternate with
    episodes (4-20 s) whose classes cycle through shuffled blocks, so they stay balanced."""
    rng = make_rng(cfg.seed, setup.index, "schedule")
    plans: list[EpisodePlan] = []
    bag: list[str] = []
    t, end = cfg.start_ms, cfg.end_ms
    while t < end:
        if len(plans) % 2 == 0:
            label, duration = "normal", int(rng.integers(3000, 12001))
        else:
            if not bag:
                bag = [EVENT_CLASSES[i] for i in rng.permutation(len(EVENT_CLASSES))]
            label, duration = bag.pop(), int(rng.integers(4000, 20001))
        episode = Episode(t, min(t + duration, end), label)
        plans.append(_plan(episode, setup, make_rng(cfg.seed, setup.index, "episode", len(plans))))
        t = episode.end_ms
    return plans


def _plan(ep: Episode, setup: DeviceSetup, rng: np.random.Generator) -> EpisodePlan:
    seed, intensity = int(rng.integers(0, 2**63)), float(rng.uniform(0.5, 1.0))
    doors: list[tuple[int, int]] = []
    person: tuple[int, int] | None = None
    path: tuple[Keyframe, ...] = ()
    siren: tuple[int, int] | None = None
    length = ep.end_ms - ep.start_ms
    if ep.label in ("maintenance", "intrusion"):  # same distribution: camera can't tell
        opened = ep.start_ms + int(rng.integers(100, 1200))
        doors.append((opened, min(opened + int(rng.integers(1500, 4000)), ep.end_ms)))
        enter, leave = opened + int(rng.integers(300, 900)), ep.end_ms - int(rng.integers(0, 800))
        if rng.random() < 0.5 and length > 9000:  # leaves through the door again
            exit_open = ep.end_ms - int(rng.integers(1800, 3500))
            doors.append((exit_open, exit_open + 1500))
            leave = exit_open + 1000
        person = (enter, max(leave, enter + 500))
        path = _walk(person, setup.door_x, rng)
    elif ep.label == "normal" and length > 4000 and rng.random() < 0.35:  # someone looks in
        opened = ep.start_ms + int(rng.integers(500, length - 3000))
        doors.append((opened, opened + int(rng.integers(1000, 2500))))
    elif ep.label in ("fire", "alarm_test"):  # same siren distribution: audio can't tell
        siren = (min(ep.start_ms + int(rng.integers(300, 3000)), ep.end_ms), ep.end_ms)
    return EpisodePlan(
        episode=ep,
        seed=seed,
        intensity=intensity,
        machine_running=ep.label != "maintenance",
        doors=tuple(doors),
        person=person,
        path=path,
        siren=siren,
        warning_light=ep.label == "machine_fault" and bool(rng.random() < 0.7),
        ramp_ms=float(rng.uniform(2500, 7000)),
    )


def _walk(span: tuple[int, int], door_x: float, rng: np.random.Generator) -> tuple[Keyframe, ...]:
    """Walk from the door between random spots, pausing at each, until the span ends."""
    t, x, y = float(span[0]), door_x, 0.62
    frames: list[Keyframe] = [(t, x, y)]
    speed = float(rng.uniform(0.12, 0.3))  # frame widths per second
    while t < span[1]:
        nx, ny = float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.66, 0.95))
        t += 1000.0 * math.hypot(nx - x, ny - y) / speed
        x, y = nx, ny
        frames.append((t, x, y))
        t += float(rng.uniform(300, 2500))
        frames.append((t, x, y))
    return tuple(frames)


def plan_index(starts: Sequence[int], t_ms: float) -> int:
    """Index of the plan holding world time `t_ms` (the first/last one outside the timeline)."""
    return min(max(bisect.bisect_right(starts, t_ms) - 1, 0), len(starts) - 1)


def plan_at(plans: Sequence[EpisodePlan], starts: Sequence[int], t_ms: float) -> EpisodePlan:
    return plans[plan_index(starts, t_ms)]


def door_open(plan: EpisodePlan, t_ms: float) -> bool:
    return any(a <= t_ms < b for a, b in plan.doors)


def siren_on(plan: EpisodePlan, t_ms: float) -> bool:
    return plan.siren is not None and plan.siren[0] <= t_ms < plan.siren[1]


def fire_progress(plan: EpisodePlan, t_ms: float) -> float:
    """0 outside fires; inside, grows from 0 towards 1 with time constant ramp_ms."""
    if plan.label != "fire" or t_ms < plan.episode.start_ms:
        return 0.0
    return 1.0 - math.exp(-(t_ms - plan.episode.start_ms) / plan.ramp_ms)


def person_at(plan: EpisodePlan, t_ms: float) -> tuple[float, float, bool] | None:
    """(x, feet y, walking) of the person at `t_ms`, or None when nobody is in the cell."""
    if plan.person is None or not plan.person[0] <= t_ms < plan.person[1]:
        return None
    times = [k[0] for k in plan.path]
    i = min(max(bisect.bisect_right(times, t_ms) - 1, 0), len(plan.path) - 2)
    (t0, x0, y0), (t1, x1, y1) = plan.path[i], plan.path[i + 1]
    u = min(max((t_ms - t0) / max(t1 - t0, 1.0), 0.0), 1.0)
    return x0 + u * (x1 - x0), y0 + u * (y1 - y0), (x0, y0) != (x1, y1)


def walking_spans(plan: EpisodePlan) -> list[tuple[float, float]]:
    """World-time spans in which the person walks (for footsteps)."""
    end = float(plan.person[1]) if plan.person else 0.0
    return [
        (a[0], min(b[0], end))
        for a, b in zip(plan.path, plan.path[1:], strict=False)
        if (a[1], a[2]) != (b[1], b[2]) and a[0] < end
    ]
