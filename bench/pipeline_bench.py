"""Pipeline throughput and latency next to model-only, unbatched and per-message baselines.

    .venv/bin/python bench/pipeline_bench.py                  # starts a local broker (3-8 min)
    .venv/bin/python bench/pipeline_bench.py --quick          # smoke run
    .venv/bin/python bench/pipeline_bench.py --skip-kafka     # stages 1, 2 and 4 only
    .venv/bin/python bench/pipeline_bench.py --bootstrap-servers HOST:PORT

Devices send 5 fps 640x480 JPEG (q85; 20 pre-encoded frames reused), 16 kHz mono 16-bit WAV
in 0.5 s chunks, 10 Hz telemetry JSON: 34 records per 2 s device-window. The shipped
default model (`--model DIR` for another); torch threads as `iotfuse run` sets them (half the
cores; `--threads N`).
Stages 1-4 run `--repeat` times, alternated (a shared machine is noisy); the best run of each
is compared.
1. model only: `runner.classify` (encoders, fusion, Shapley) in batches of 64 over the
   `window_inputs` of the closed windows (prepared untimed);
2. offline: `run_offline` over the records (decode, align, window, features, model);
3. end to end: records produced once (3 partitions); each run, a KafkaWorker of a new group
   starts in a thread; the drain is timed from the first record it takes in to the ack of
   the last window's event (as kafka-consumer-perf-test leaves the group join out of its
   fetch rate), and printed again from the worker's start, group join included.
   Acknowledged = the broker acked it (acks=all) and the worker drained that ack, where it
   releases the offsets and observes iotfuse_event_latency_seconds (`LatencySamples`).
   A telemetry record per device 600 ms past the end closes the last windows by watermark;
   the windows it opens are not counted (the idle timeout is set to 10 min so that only
   watermark-closed windows are counted);
4. offline with max_batch=1 (at most 20 s a run: the windows done by then);
5. per-message loop via Kafka: consume a record, decode it, classify it alone (a one-record
   window), produce its event, flush(); over whole windows of a few devices;
6. half load: devices = stage 3's windows/s (a device gives 0.5 window/s) produce in real
   time to a worker in a child process (own GIL and RSS); every window-close -> event-ack
   latency is kept. The first 6 s are a warm-up (the worker's first batches, the producer
   and the new topics' first seconds, when the producer falls up to 0.3 s behind and the
   worker gets a camera frame after a later telemetry record; reported apart: events are
   acknowledged in window order).
   Devices go on sending for 600 ms past the last measured window, so it closes by
   watermark like every other one (the windows that tail opens are not counted).
A worker that acknowledges nothing for 30 s is reported as STALLED and its run left out.
Seen with kafka-python 3.0.12: after the worker pauses a partition running ahead and
resumes it, the partition is never fetched again (its parked records are only restored
while the fetcher's in-line slot is None, which it no longer is after the first fetch), so
the worker no longer pauses single partitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import uuid
import wave
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import Histogram

from encoders.modality import Modality
from pipeline.app import build_engine, run_offline
from pipeline.cli import torch_threads
from pipeline.clients import MAX_REQUEST_BYTES, producer_config, to_record
from pipeline.clock import wall_clock_ms
from pipeline.engine import EngineConfig
from pipeline.features import window_inputs
from pipeline.ingest import ingest
from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.broker import LocalKafka
from pipeline.metrics import Metrics
from pipeline.model_runner import ModelRunner
from pipeline.outputs import event_output, event_value
from pipeline.producer import BoundedProducer
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.windows import Window, Windower
from pipeline.worker import KafkaWorker

PARTITIONS = 3
TICK_MS = 100  # telemetry every tick, camera every 2nd, audio every 5th
LIVE_TAIL_MS = 600  # devices keep sending past the live run: its last windows close as usual
WARM_UP_MS = 6000  # the live run's first windows, not measured: the fleet is already running
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
        metrics = {"temperature_c": 21.0 + 0.01 * k + d, "smoke_ppm": 3.0 + k % 7 / 10,
                   "vibration_rms": 0.2 + k % 5 / 100, "motor_current_a": 4.0, "door_open": 0}
        out.append(Record(TOPICS.telemetry, p, -1, ts, key, json.dumps(metrics).encode(), ()))
        if k % 2 == 0:
            out.append(Record(TOPICS.camera, p, -1, ts, key, media[0][(k // 2 + 7 * d) % 20],
                              (("content-type", b"image/jpeg"),)))
        if k % 5 == 0:
            out.append(Record(TOPICS.audio, p, -1, ts, key, media[1][(k // 5 + d) % 4],
                              (("content-type", b"audio/wav"),)))
    return out


def stream(devices: int, t0: int, seconds: int, media: Media) -> list[Record]:
    """Records in event-time order (offsets -1: offline, nothing commits them)."""
    return [r for k in range(seconds * 1000 // TICK_MS)
            for r in tick_records(devices, t0 + k * TICK_MS, k, media)]


def closing(devices: int, end_ms: int, media: Media) -> list[Record]:
    """Per device, telemetry 600 ms past `end_ms`: closes its last window (lateness 500 ms)."""
    return [r for r in tick_records(devices, end_ms + 600, 1, media)
            if r.topic == TOPICS.telemetry]


# -- model, settings ------------------------------------------------------------------------
def settings_for(bootstrap: str, names: TopicNames | None, max_batch: int = 64) -> Settings:
    s = Settings()
    roles = ("camera", "audio", "telemetry", "labels", "events", "deadletter")
    topics = s.topics if names is None else dataclasses.replace(
        s.topics, **{role: getattr(names, role) for role in roles})
    group = f"bench-{uuid.uuid4().hex[:8]}"
    return dataclasses.replace(
        s, topics=topics,
        kafka=dataclasses.replace(s.kafka, bootstrap_servers=bootstrap, group_id=group),
        runtime=dataclasses.replace(s.runtime, max_batch=max_batch, metrics_port=0),
        windows=dataclasses.replace(s.windows, idle_timeout_ms=600_000))  # see the docstring


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


# -- stages without Kafka -------------------------------------------------------------------
def window_raws(records: Sequence[Record], cfg: EngineConfig) -> list[Raw]:
    """Model inputs of every window of `records`, as the engine builds them."""
    windower, closed = Windower(cfg.windows), list[Window]()
    for r in records:
        got = ingest(r, cfg.ingest)
        closed += windower.add(got.device_id, got.item, 0).closed
    return [window_inputs(w, cfg.features).raw for w in closed + windower.close_all()]


def model_only(runner: ModelRunner, raws: list[Raw], batch: int) -> Rate:
    runner.classify(raws[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(raws), batch):
        runner.classify(raws[i : i + batch])
    return Rate(len(raws), time.perf_counter() - start)


def offline(runner: ModelRunner, records: list[Record], max_batch: int,
            budget_s: float = float("inf")) -> tuple[Rate, str]:
    """Windows/s of `run_offline` (those done within budget_s), and where its time went (the
    engine's stage metrics)."""
    settings, metrics = settings_for("unused:9092", None, max_batch), Metrics()
    engine, events = build_engine(settings, runner, metrics), 0
    start = time.perf_counter()
    for out in run_offline(engine, records):
        events += out.topic == settings.topics.events
        if time.perf_counter() - start > budget_s:
            break
    rate = Rate(events, time.perf_counter() - start)
    model, features = (metrics.value("iotfuse_stage_seconds_sum", {"stage": s}) / rate.seconds
                       for s in ("model", "features"))
    return rate, (f"model {model:.0%}, features (frame decode) {features:.0%}, "
                  f"ingest+align+window+outputs {1 - model - features:.0%}")


# -- stages through the broker --------------------------------------------------------------
def producer(bootstrap: str, batch_bytes: int = 16384) -> BoundedProducer[None]:
    """kafka-python's default batch size (16 KB) gives each 41 KB frame a batch of its own, as
    a fleet of separate cameras would; the live run batches (see `produce_live`)."""
    return BoundedProducer(KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                         batch_size=batch_bytes,
                                         max_request_size=MAX_REQUEST_BYTES), 32 * 1024 * 1024)


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


class WorkerThread:
    """A KafkaWorker running in a thread, its latency observations recorded."""

    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        metrics = Metrics()
        self.latency = LatencySamples(metrics)
        self.worker = KafkaWorker(settings, build_engine(settings, runner, metrics))
        self.stop = threading.Event()
        self.first_at: float | None = None  # when the worker had taken in its first record
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def wait_acked(self, n: int) -> None:
        """Until n events are acknowledged, then stop; Stalled if none comes for STALL_S."""
        seen, since = 0, time.monotonic()
        try:
            while (count := len(self.latency.values)) < n:
                if self.first_at is None and self.records_in() > 0:
                    self.first_at = time.perf_counter()
                if not self.thread.is_alive():
                    raise RuntimeError(f"the worker died after {count} of {n} events")
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


def end_to_end(bootstrap: str, runner: ModelRunner, names: TopicNames, windows: int
               ) -> tuple[Rate, Rate]:
    """A worker of a new consumer group reads the topics from the beginning: the drain (from
    its first record) and the whole run (from its start, group join included)."""
    start = time.perf_counter()
    run = WorkerThread(settings_for(bootstrap, names), runner)
    run.wait_acked(windows)
    assert run.first_at is not None  # events were acknowledged: records came in first
    return (Rate(windows, run.latency.last_at - run.first_at),
            Rate(windows, run.latency.last_at - start))


def per_message(bootstrap: str, runner: ModelRunner, records: list[Record]) -> Rate:
    """The naive loop: one record at a time, one model call and one flush() per record."""
    names = produced(bootstrap, records)
    settings = settings_for(bootstrap, names)
    cfg = build_engine(settings, runner).cfg
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             max_partition_fetch_bytes=MAX_REQUEST_BYTES)
    consumer.assign([TopicPartition(t, p) for t in names.inputs for p in range(PARTITIONS)])
    events = KafkaProducer(**producer_config(settings))
    done, start = 0, time.perf_counter()
    while done < len(records):
        for msg in (m for batch in consumer.poll(timeout_ms=200).values() for m in batch):
            got = ingest(to_record(msg), cfg.ingest)
            end = got.item.ts_ms + cfg.windows.window_ms
            window = Window(got.device_id, got.item.ts_ms, end)
            window.add(got.item)
            decision = runner.classify([window_inputs(window, cfg.features).raw])[0]
            value = event_value(window, decision, runner.model_id, wall_clock_ms())
            event = event_output(window, value, names.events, (), 0)
            events.send(names.events, key=event.key, value=event.value, timestamp_ms=end)
            events.flush()
            done += 1
    rate = Rate(done, time.perf_counter() - start)
    consumer.close()
    events.close()
    return rate


def live_worker(settings: Settings, directory: str | None, warm_up: Raw, threads: int,
                conn: Connection) -> None:
    """Child process: a warmed-up worker until the expected events are acknowledged; sends
    back (latency samples s, RSS MiB when ready and at peak, CPU cores busy, stall note)."""
    torch.set_num_threads(threads)
    runner = ModelRunner.load(directory)
    runner.classify([warm_up])
    run = WorkerThread(settings, runner)
    wait_for(lambda: bool(run.worker.consumer.assignment()), STALL_S, "partitions")
    conn.send("ready")
    ready_mib, cpu0, wall0 = memory_mib("VmRSS"), time.process_time(), time.perf_counter()
    note = ""
    try:
        run.wait_acked(conn.recv())
    except Stalled as exc:
        note = f"live run stalled: {exc}"
    cores = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    metrics = run.worker.engine.metrics
    counts = {"late records dropped": sum(
        metrics.value("iotfuse_late_records_total", {"modality": m})
        for m in ("camera", "audio", "telemetry"))}
    for result in ("classified", "used", "redone"):
        counts[f"early {result}"] = metrics.value("iotfuse_early_windows_total",
                                                  {"result": result})
    conn.send((run.latency.values, ready_mib, memory_mib(), cores, note, counts))


def produce_live(bootstrap: str, names: TopicNames, devices: int, seconds: int,
                 media: Media) -> tuple[float, float]:
    """Real time from the next window boundary; returns how far sending fell behind (s) and
    the CPU cores this process used meanwhile.

    This one process stands in for the whole fleet on the worker's 2 cores, so it batches up
    to 1 MiB a partition: with a batch per frame, it and the broker took 1.0-1.1 cores at 93
    devices (0.4 batched), and the worker under test fell behind for want of CPU."""
    out = producer(bootstrap, batch_bytes=1024 * 1024)
    for topic in names.inputs:  # connected before the first tick, as a running fleet is
        out.producer.partitions_for(topic)
    behind, t0, cpu0 = 0.0, (wall_clock_ms() // 2000 + 1) * 2000, time.process_time()
    ticks = [(t0 + k * TICK_MS, tick_records(devices, t0 + k * TICK_MS, k, media))
             for k in range((WARM_UP_MS + seconds * 1000 + LIVE_TAIL_MS) // TICK_MS)]
    for ts, records in ticks:
        delay = ts / 1000 - time.time()
        if delay > 0:
            time.sleep(delay)  # pacing, not synchronisation
        behind = max(behind, -delay)
        send(out, records, names)
    out.flush()
    out.close()
    return behind, (time.process_time() - cpu0) / (time.time() - t0 / 1000)


def live_latency(bootstrap: str, directory: Path | None, warm_up: Raw, devices: int,
                 seconds: int, media: Media
                 ) -> tuple[list[float], float, float, float, str, tuple[float, float],
                            dict[str, float]]:
    """(latency samples s, worker RSS MiB ready and peak, its CPU cores, stall note,
    (producer lag s, producer CPU cores), the worker's late records and early inference
    counts)."""
    names = produced(bootstrap, [])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    args = (settings_for(bootstrap, names), str(directory) if directory else None, warm_up,
            torch.get_num_threads(), child)
    proc = ctx.Process(target=live_worker, args=args, daemon=True)
    proc.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("the live worker did not start within 300 s")
        parent.recv()
        behind = produce_live(bootstrap, names, devices, seconds, media)
        parent.send(devices * (WARM_UP_MS + seconds * 1000) // 2000)
        if not parent.poll(seconds + 300):
            raise RuntimeError("the live worker did not report within 300 s of the run's end")
        values, ready_mib, peak_mib, cores, note, counts = parent.recv()
    finally:
        proc.join(timeout=60)
    return values, ready_mib, peak_mib, cores, note, behind, counts


# -- the run --------------------------------------------------------------------------------
def row(name: str, runs: list[Rate], unit: str = "windows") -> str:
    """The best run; the slowest too when there were several."""
    best, worst = max(runs, key=lambda r: r.per_s), min(runs, key=lambda r: r.per_s)
    spread = f"  (slowest of {len(runs)}: {worst.per_s:.1f})" if len(runs) > 1 else ""
    return f"{name:<40}{best.count:>6} {unit:<8}{best.seconds:>7.2f} s{best.per_s:>8.1f} /s{spread}"


def check(name: str, value: float, target: float, less: bool = False) -> str:
    verdict = "ok" if (value <= target if less else value >= target) else "MISSED"
    return f"  {name:<46}{value:>8.2f}   target {'<=' if less else '>='} {target:<6g} {verdict}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=32, help="devices in the record set")
    p.add_argument("--seconds", type=int, default=20, help="seconds of records per device")
    p.add_argument("--live-seconds", type=int, default=24, help="length of the latency run")
    p.add_argument("--repeat", type=int, default=4, help="runs of stages 1-4, alternated")
    p.add_argument("--skip-kafka", action="store_true", help="stages 1, 2 and 4 only")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--threads", type=int, default=torch_threads(0, "run"),
                   help="torch threads, the worker's too (default: as `iotfuse run` sets them)")
    p.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.devices, a.seconds, a.live_seconds, a.repeat = 4, 6, 6, 1
    seconds, live_seconds = a.seconds + a.seconds % 2, a.live_seconds + a.live_seconds % 2
    torch.set_num_threads(a.threads)
    media = make_media()
    t0 = (wall_clock_ms() // 2000) * 2000 - seconds * 1000 - 60_000
    records, windows = stream(a.devices, t0, seconds, media), a.devices * seconds // 2
    lines = [f"{a.devices} devices x {seconds} s: {windows} device-windows, {len(records)} "
             f"records ({sum(len(r.value or b'') for r in records) / 1e6:.0f} MB, JPEG "
             f"{np.mean([len(f) for f in media[0]]) / 1e3:.0f} KB); torch threads "
             f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load avg "
             f"{os.getloadavg()[0]:.1f} at start"]
    runs: dict[str, list[Rate]] = {"model": [], "b64": [], "e2e": [], "e2e+join": [], "b1": []}
    splits, naive, live, stalls = {}, None, None, list[str]()
    with ExitStack() as stack:
        directory = a.model
        runner = ModelRunner.load(directory)
        lines.append(f"model {runner.model_id.name} ({runner.model_id.version[:19]}) on "
                     f"{runner.device}")
        cfg = build_engine(settings_for("unused:9092", None), runner).cfg
        raws = window_raws(records, cfg)
        bootstrap, names = a.bootstrap_servers, None
        if not a.skip_kafka:
            if bootstrap is None:
                print("starting a local Kafka ...", file=sys.stderr, flush=True)
                bootstrap = stack.enter_context(LocalKafka(nodes=1)).bootstrap_servers
            names = produced(bootstrap, records + closing(a.devices, t0 + seconds * 1000, media))
        for n in range(a.repeat):
            print(f"round {n + 1} of {a.repeat} of stages 1-4", file=sys.stderr, flush=True)
            runs["model"].append(model_only(runner, raws, cfg.max_batch))
            for key, batch, budget_s in (("b64", 64, float("inf")), ("b1", 1, 20.0)):
                rate, split = offline(runner, records, batch, budget_s)
                if rate.per_s >= max(r.per_s for r in [*runs[key], rate]):
                    splits[key] = split  # the best run's
                runs[key].append(rate)
                if key == "b64" and bootstrap is not None and names is not None:
                    try:
                        drain, whole = end_to_end(bootstrap, runner, names, windows)
                        runs["e2e"].append(drain)
                        runs["e2e+join"].append(whole)
                    except Stalled as exc:
                        stalls.append(f"end to end, round {n + 1}: {exc}")
        lines += [row("1 model only (classify, batches of 64)", runs["model"]),
                  row("2 offline pipeline, max_batch 64", runs["b64"]), f"    {splits['b64']}"]
        if runs["e2e"]:
            lines += [row("3 end to end via Kafka, max_batch 64", runs["e2e"]),
                      row("    the same, group join included", runs["e2e+join"])]
        lines += [row("4 offline pipeline, max_batch 1", runs["b1"]), f"    {splits['b1']}"]
        if bootstrap is not None and runs["e2e"]:
            print("per-message loop ...", file=sys.stderr, flush=True)
            few = {f"dev-{d:03d}".encode() for d in range(1 if a.quick else min(a.devices, 4))}
            until = t0 + (2000 if a.quick else 4000)  # whole windows of those devices
            naive = per_message(bootstrap, runner,
                                [r for r in records if r.key in few and r.timestamp_ms < until])
            lines.append(row("5 per-message loop via Kafka", [naive], "records")
                         + f" = {naive.per_s / PER_WINDOW:.2f} windows/s")
            devices = max(1, round(max(r.per_s for r in runs["e2e"])))  # = half load
            print(f"live: {devices} devices, {live_seconds} s", file=sys.stderr, flush=True)
            live = live_latency(bootstrap, directory, raws[0], devices, live_seconds, media)
            every = np.array(live[0] or [np.nan]) * 1000  # nan: no event (stalled)
            warm_up = devices * WARM_UP_MS // 2000
            lat = every[warm_up:] if every.size > warm_up else every  # after the warm-up
            ready_mib, peak_mib, cores, note, (behind, producer_cores), counts = live[1:]
            stalls += [note] if note else []
            lines += [f"6 half load: {devices} devices ({devices / 2:.1f} windows/s), "
                      f"{live_seconds} s after a {WARM_UP_MS / 1000:.0f} s warm-up, {lat.size} "
                      f"events: latency p50 {np.percentile(lat, 50):.0f} ms, p99 "
                      f"{np.percentile(lat, 99):.0f} ms, max {lat.max():.0f} ms",
                      f"    with the warm-up windows (worker cold, producer starting): "
                      f"p99 {np.percentile(every, 99):.0f} ms, max {every.max():.0f} ms",
                      f"    worker: RSS {ready_mib:.0f} MiB when ready, peak {peak_mib:.0f} MiB; "
                      f"{cores:.2f} cores busy; "
                      f"producer: {producer_cores:.2f} cores, behind schedule <= "
                      f"{behind * 1000:.0f} ms; "
                      + "; ".join(f"{k}: {v:.0f}" for k, v in counts.items())]
    lines.append(f"bench process peak RSS {memory_mib():.0f} MiB; load avg "
                 f"{os.getloadavg()[0]:.1f} at end")
    best = {k: max((r.per_s for r in v), default=0.0) for k, v in runs.items()}
    lines += ["ratios of the best runs, and targets:",
              check("pipeline / model-only (offline)", best["b64"] / best["model"], 0.7),
              check("batched / unbatched (offline)", best["b64"] / best["b1"], 3.5)]
    if naive is not None and live is not None:
        per_msg = naive.per_s / PER_WINDOW
        lines += [check("end to end, windows/s", best["e2e"], 100),
                  check("batched e2e / per-message (both via Kafka)", best["e2e"] / per_msg, 10),
                  f"  {'(batched offline / per-message':<46}{best['b64'] / per_msg:>8.2f})",
                  check("p99 latency at half load, ms", float(np.percentile(lat, 99)),
                        250, less=True)]
    lines += [f"STALLED, left out of the figures: {stall}" for stall in stalls]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
