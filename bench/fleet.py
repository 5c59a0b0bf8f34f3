"""What the benchmarks share: the simulated fleet's records, the settings, a worker in a thread.

Devices send 5 fps 640x480 JPEG (q85; 20 pre-encoded frames reused), 16 kHz mono 16-bit WAV
in 0.5 s chunks and 10 Hz telemetry JSON: 34 records per 2 s device-window.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import uuid
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from kafka import KafkaProducer
from prometheus_client import Histogram

from encoders.modality import Modality
from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.config import MAX_RECORD_BYTES
from pipeline.kafka.producer import BoundedProducer
from pipeline.kafka.worker import KafkaWorker
from pipeline.metrics import Metrics
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import WorkerThread

PARTITIONS = 3
TICK_MS = 100  # telemetry every tick, camera every 2nd, audio every 5th
CAMERA_EVERY, AUDIO_EVERY = 2, 5  # ticks
PER_WINDOW = 20 + 10 + 4  # telemetry, camera, audio records per 2 s device-window
STALL_S = 30  # no event acknowledged for this long: the worker is stuck
TOPICS = Settings().topics
Raw = dict[Modality, np.ndarray]
Media = tuple[list[bytes], list[bytes]]  # JPEG frames, WAV chunks


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.count / self.seconds


class LatencySamples:
    """Replaces `metrics.event_latency`: keeps every observation, and when the last came."""

    def __init__(self, metrics: Metrics) -> None:
        self.histogram, self.values, self.last_at = metrics.event_latency, list[float](), 0.0
        metrics.event_latency = cast(Histogram, self)

    def observe(self, amount: float) -> None:
        self.histogram.observe(amount)
        self.last_at = time.perf_counter()
        self.values.append(amount)


# -- inputs ---------------------------------------------------------------------------------
def make_media(pool: int = 20) -> Media:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]  # (480, 640) each
    base = np.stack([x * 200 // 640, y * 200 // 480, (x + y) // 10], -1)  # (480, 640, 3)
    frames, chunks = [], []
    for i in range(pool):
        img = base.astype(np.uint8)
        cv2.rectangle(img, (60 + 6 * i, 190), (300 + 6 * i, 430), (60, 70, 150), -1)
        cv2.circle(img, (380 + 9 * i, 140), 45, (0, 190, 250), -1)
        cv2.putText(img, f"cam {i:02d}", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255,) * 3, 2)
        noisy = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        frames.append(bytes(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 85])[1]))
    t = np.arange(8000) / 16000  # 0.5 s at 16 kHz
    for i in range(4):
        tone = 0.2 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setparams((1, 2, 16000, 0, "NONE", "not compressed"))  # mono, 16-bit, 16 kHz
            w.writeframes((tone * 32767).astype("<i2").tobytes())
        chunks.append(buf.getvalue())
    return frames, chunks


def tick_records(devices: int, ts: int, k: int, media: Media) -> list[Record]:
    """Tick k (event time ts) of every device; partition = device index % 3 (offline)."""
    out = []
    for d in range(devices):
        key, p = f"dev-{d:03d}".encode(), d % PARTITIONS
        metrics = {
            "temperature_c": 21.0 + 0.01 * k + d,
            "smoke_ppm": 3.0 + k % 7 / 10,
            "vibration_rms": 0.2 + k % 5 / 100,
            "motor_current_a": 4.0,
            "door_open": 0,
        }
        out.append(Record(TOPICS.telemetry, p, -1, ts, key, json.dumps(metrics).encode(), ()))
        if k % CAMERA_EVERY == 0:
            out.append(
                Record(
                    TOPICS.camera,
                    p,
                    -1,
                    ts,
                    key,
                    media[0][(k // 2 + 7 * d) % 20],
                    (("content-type", b"image/jpeg"),),
                )
            )
        if k % AUDIO_EVERY == 0:
            out.append(
                Record(
                    TOPICS.audio,
                    p,
                    -1,
                    ts,
                    key,
                    media[1][(k // 5 + d) % 4],
                    (("content-type", b"audio/wav"),),
                )
            )
    return out


def stream(devices: int, t0: int, seconds: int, media: Media) -> list[Record]:
    """Records in event-time order (offsets -1: offline, nothing commits them)."""
    return [
        r
        for k in range(seconds * 1000 // TICK_MS)
        for r in tick_records(devices, t0 + k * TICK_MS, k, media)
    ]


def closing(devices: int, end_ms: int, media: Media) -> list[Record]:
    """Per device, a record of each modality 600 ms past `end_ms`: closes its last window
    (lateness 500 ms; every modality a device sends must pass it, contract v1.1)."""
    return tick_records(devices, end_ms + 600, 0, media)  # tick 0: all three modalities


# -- model, settings ------------------------------------------------------------------------
def settings_for(
    bootstrap: str, names: TopicNames | None, max_batch: int = 64, explain_top: int = 0
) -> Settings:
    s = Settings()
    roles = ("camera", "audio", "telemetry", "labels", "events", "deadletter")
    topics = (
        s.topics
        if names is None
        else dataclasses.replace(s.topics, **{role: getattr(names, role) for role in roles})
    )
    group = f"bench-{uuid.uuid4().hex[:8]}"
    return dataclasses.replace(
        s,
        topics=topics,
        kafka=dataclasses.replace(s.kafka, bootstrap_servers=bootstrap, group_id=group),
        runtime=dataclasses.replace(
            s.runtime, max_batch=max_batch, metrics_port=0, explain_telemetry_top=explain_top
        ),
        windows=dataclasses.replace(s.windows, idle_timeout_ms=600_000),
    )  # see the docstring


def memory_mib(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) RSS of this process; unlike ru_maxrss, a spawned
    child's VmHWM does not start from its parent's peak."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def wait_for(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


# -- through the broker ----------------------------------------------------------------------
def producer(bootstrap: str, batch_bytes: int = 16384) -> BoundedProducer[None]:
    """kafka-python's default batch size (16 KB) gives each 41 KB frame a batch of its own, as
    a fleet of separate cameras would; the live run batches (see `produce_live`)."""
    return BoundedProducer(
        KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            batch_size=batch_bytes,
            max_request_size=MAX_RECORD_BYTES,
        ),
        32 * 1024 * 1024,
    )


def send(out: BoundedProducer[None], records: Sequence[Record], names: TopicNames) -> None:
    rename = dict(zip((TOPICS.camera, TOPICS.audio, TOPICS.telemetry), names.inputs, strict=True))
    for r in records:  # partitioned by key (murmur2), as any producer would
        out.send(None, rename[r.topic], r.key, r.value, r.headers, r.timestamp_ms)


def produced(bootstrap: str, records: Sequence[Record]) -> TopicNames:
    """Fresh topics holding `records`."""
    names, out = TopicNames.prefixed(f"bench-{uuid.uuid4().hex[:8]}"), producer(bootstrap)
    ensure_topics(bootstrap, names, PARTITIONS, 1)
    send(out, records, names)
    out.flush()
    out.close()
    return names


class Stalled(RuntimeError):
    """The worker stopped making progress (known causes: the module docstring)."""


class MeasuredWorker(WorkerThread[KafkaWorker]):
    """A KafkaWorker on a thread (pipeline.testing.WorkerThread), its latency observations
    recorded."""

    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        metrics = Metrics()
        self.latency = LatencySamples(metrics)
        self.first_at: float | None = None  # when the worker had taken in its first record
        super().__init__(KafkaWorker(settings, build_engine(settings, runner, metrics)))

    def wait_acked(self, n: int) -> None:
        """Until n events are acknowledged, then stop; Stalled if none comes for STALL_S."""
        seen, since = 0, time.monotonic()
        try:
            while (count := len(self.latency.values)) < n:
                if self.first_at is None and self.records_in() > 0:
                    self.first_at = time.perf_counter()
                if not self.thread.is_alive():
                    raise RuntimeError(f"the worker died after {count} of {n} events") from (
                        self.error
                    )
                if count > seen:
                    seen, since = count, time.monotonic()
                elif time.monotonic() - since > STALL_S:
                    raise Stalled(f"no event acknowledged for {STALL_S} s after {count} of {n}")
                time.sleep(0.01)
        finally:
            self.stop.set()
            self.thread.join(timeout=60)

    def records_in(self) -> float:
        metrics = self.worker.metrics
        return sum(metrics.value("iotfuse_records_in_total", {"modality": m}) for m in Modality)
