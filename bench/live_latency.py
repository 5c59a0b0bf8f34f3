"""Stage 6 of bench/pipeline_bench.py: event latency with devices producing in real time.

A worker in a child process (own GIL and RSS) consumes what one producer process, standing in
for the fleet, sends in real time; every window-close -> event-ack latency is kept.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
from fleet import (
    STALL_S,
    TICK_MS,
    MeasuredWorker,
    Media,
    Raw,
    Stalled,
    memory_mib,
    produced,
    producer,
    send,
    settings_for,
    tick_records,
    wait_for,
)

from pipeline.clock import wall_clock_ms
from pipeline.kafka.admin import TopicNames
from pipeline.settings import Settings
from pipeline.stream.model_runner import ModelRunner

# devices keep sending past the live run, to a camera frame 600 ms past its end: its last
# windows close by watermark as usual (every modality must pass end + 500 ms)
LIVE_TAIL_MS = 700
WARM_UP_MS = 6000  # the live run's first windows, not measured: the fleet is already running


def live_worker(
    settings: Settings, directory: str | None, warm_up: Raw, threads: int, conn: Connection
) -> None:
    """Child process: a warmed-up worker until the expected events are acknowledged; sends
    back (latency samples s, RSS MiB when ready and at peak, CPU cores busy, stall note)."""
    torch.set_num_threads(threads)
    runner = ModelRunner.load(directory)
    runner.classifier(settings.runtime.explain_telemetry_top)([warm_up])  # as the worker will
    run = MeasuredWorker(settings, runner)
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
    counts = {
        "late records dropped": sum(
            metrics.value("iotfuse_late_records_total", {"modality": m})
            for m in ("camera", "audio", "telemetry")
        )
    }
    for result in ("classified", "used", "redone"):
        counts[f"early {result}"] = metrics.value("iotfuse_early_windows_total", {"result": result})
    conn.send((run.latency.values, ready_mib, memory_mib(), cores, note, counts))


def produce_live(
    bootstrap: str,
    names: TopicNames,
    devices: int,
    seconds: int,
    media: Media,
    sent: dict[int, int] | None = None,
) -> tuple[float, float]:
    """Real time from the next window boundary; returns how far sending fell behind (s) and
    the CPU cores this process used meanwhile. `sent` fills in, per tick's event time, the
    wall-clock ms at which its records were handed to the Kafka client.

    This one process stands in for the whole fleet on the worker's 2 cores, so it batches up
    to 1 MiB a partition: with a batch per frame, it and the broker took 1.0-1.1 cores at 93
    devices (0.4 batched), and the worker under test fell behind for want of CPU."""
    out = producer(bootstrap, batch_bytes=1024 * 1024)
    for topic in names.inputs:  # connected before the first tick, as a running fleet is
        out.producer.partitions_for(topic)
    behind, t0, cpu0 = 0.0, (wall_clock_ms() // 2000 + 1) * 2000, time.process_time()
    ticks = [
        (t0 + k * TICK_MS, tick_records(devices, t0 + k * TICK_MS, k, media))
        for k in range((WARM_UP_MS + seconds * 1000 + LIVE_TAIL_MS) // TICK_MS)
    ]
    # the whole run's records live until it ends: out of the collector's reach, or each
    # full collection walks them and stalls sending 90-100 ms (3 a minute at 100 devices),
    # which showed as +100 ms user-seen latency on the windows those ticks close
    gc.freeze()
    try:
        for ts, records in ticks:
            delay = ts / 1000 - time.time()
            if delay > 0:
                time.sleep(delay)  # pacing, not synchronisation
            behind = max(behind, -delay)
            send(out, records, names)
            if sent is not None:
                sent[ts] = wall_clock_ms()
        out.flush()
        out.close()
    finally:
        gc.unfreeze()
    return behind, (time.process_time() - cpu0) / (time.time() - t0 / 1000)


@dataclass(frozen=True)
class LiveRun:
    devices: int
    seconds: int
    latency_ms: np.ndarray  # every event in acknowledgement order, warm-up included
    ready_mib: float  # worker RSS when ready, and at peak
    peak_mib: float
    cores: float  # worker CPU cores busy
    note: str  # a stall, if any
    behind_s: float  # how far the producer fell behind schedule
    producer_cores: float
    counts: dict[str, float]  # late records, early inference

    @property
    def measured(self) -> np.ndarray:
        """After the warm-up (events are acknowledged in window order)."""
        warm_up = self.devices * WARM_UP_MS // 2000
        return self.latency_ms[warm_up:] if self.latency_ms.size > warm_up else self.latency_ms

    @property
    def p99(self) -> float:
        return float(np.percentile(self.measured, 99))

    def lines(self) -> list[str]:
        lat, every = self.measured, self.latency_ms
        return [
            f"6 half load: {self.devices} devices ({self.devices / 2:.1f} windows/s), "
            f"{self.seconds} s after a {WARM_UP_MS / 1000:.0f} s warm-up, {lat.size} "
            f"events: latency p50 {np.percentile(lat, 50):.0f} ms, p99 {self.p99:.0f} ms, "
            f"max {lat.max():.0f} ms",
            f"    with the warm-up windows (worker cold, producer starting): "
            f"p99 {np.percentile(every, 99):.0f} ms, max {every.max():.0f} ms",
            f"    worker: RSS {self.ready_mib:.0f} MiB when ready, peak {self.peak_mib:.0f} "
            f"MiB; {self.cores:.2f} cores busy; producer: {self.producer_cores:.2f} cores, "
            f"behind schedule <= {self.behind_s * 1000:.0f} ms; "
            + "; ".join(f"{k}: {v:.0f}" for k, v in self.counts.items()),
        ]


def live_latency(
    bootstrap: str,
    directory: Path | None,
    warm_up: Raw,
    devices: int,
    seconds: int,
    media: Media,
    explain_top: int = 0,
) -> LiveRun:
    """`explain_top`: runtime.explain_telemetry_top of the worker (bench/explain_bench.py)."""
    names = produced(bootstrap, [])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    args = (
        settings_for(bootstrap, names, explain_top=explain_top),
        str(directory) if directory else None,
        warm_up,
        torch.get_num_threads(),
        child,
    )
    proc = ctx.Process(target=live_worker, args=args, daemon=True)
    proc.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("the live worker did not start within 300 s")
        parent.recv()
        behind, producer_cores = produce_live(bootstrap, names, devices, seconds, media)
        parent.send(devices * (WARM_UP_MS + seconds * 1000) // 2000)
        if not parent.poll(seconds + 300):
            raise RuntimeError("the live worker did not report within 300 s of the run's end")
        values, ready_mib, peak_mib, cores, note, counts = parent.recv()
    finally:
        proc.join(timeout=60)
    latency_ms = np.array(values or [np.nan]) * 1000  # nan: no event (stalled)
    return LiveRun(
        devices,
        seconds,
        latency_ms,
        ready_mib,
        peak_mib,
        cores,
        note,
        behind,
        producer_cores,
        counts,
    )
