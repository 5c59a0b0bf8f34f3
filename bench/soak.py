"""Soak (issue 15, part 6): a worker at half load for minutes; does it stay the same?

    .venv/bin/python bench/soak.py --devices 100 --minutes 10

A worker in a child process (own GIL and RSS) consumes what one producer process sends in
real time, as in bench/live_latency.py. After a warm-up, the worker's RSS is sampled every
10 s; every event's latency (window close -> acknowledged) is kept with when it came. It
prints the RSS slope (least squares, MB/min), the late records, and p50/p99 latency of the
first and of the last minute, with the targets: slope <= 1 MB/min, no late records, p99 of
the last minute no worse than the first (within 25 % or 50 ms).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import torch
from fleet import MeasuredWorker, make_media, memory_mib, settings_for, wait_for
from live_latency import WARM_UP_MS, produce_live

from encoders.modality import Modality
from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.local.broker import LocalKafka
from pipeline.settings import Settings
from pipeline.stream.model_runner import ModelRunner

SAMPLE_S = 10.0


def soak_worker(settings: Settings, threads: int, conn: Connection) -> None:
    """Child: until the expected events are acknowledged; sends back (RSS samples as
    (s since ready, MiB), latencies as (s since ready, s), late records)."""
    torch.set_num_threads(threads)
    run = MeasuredWorker(settings, ModelRunner.load(None))
    wait_for(lambda: bool(run.worker.consumer.assignment()), 60, "partitions")
    conn.send("ready")
    t0, rss, done = time.perf_counter(), [], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            rss.append((time.perf_counter() - t0, memory_mib("VmRSS")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    observe, stamped = run.latency.observe, []

    def observe_stamped(amount: float) -> None:
        stamped.append((time.perf_counter() - t0, amount))
        observe(amount)

    run.latency.observe = observe_stamped  # type: ignore[method-assign]
    try:
        run.wait_acked(conn.recv())
    finally:
        done.set()
    metrics = run.worker.engine.metrics
    late = sum(metrics.value("iotfuse_late_records_total", {"modality": m}) for m in Modality)
    conn.send((rss, stamped, late))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=100, help="half load of the e2e figure")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    p.add_argument("--bootstrap-servers", help="an existing broker (default: a local one)")
    a = p.parse_args()
    seconds = int(a.minutes * 60)
    kafka = None if a.bootstrap_servers else LocalKafka()
    if kafka is not None:
        kafka.start()
    bootstrap = a.bootstrap_servers or kafka.bootstrap_servers  # type: ignore[union-attr]
    try:
        names = TopicNames.prefixed(f"soak-{int(time.time())}")
        ensure_topics(bootstrap, names, 3, 1)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        settings = settings_for(bootstrap, names)
        proc = ctx.Process(
            target=soak_worker, args=(settings, torch.get_num_threads(), child), daemon=True
        )
        proc.start()
        if not parent.poll(300):
            raise RuntimeError("the worker did not start within 300 s")
        parent.recv()
        behind, _ = produce_live(bootstrap, names, a.devices, seconds, make_media())
        parent.send(a.devices * (WARM_UP_MS + seconds * 1000) // 2000)
        if not parent.poll(300):
            raise RuntimeError("the worker did not report within 300 s of the soak's end")
        rss, stamped, late = parent.recv()
        proc.join(timeout=60)
    finally:
        if kafka is not None:
            kafka.close()
    warm = WARM_UP_MS / 1000 + 30  # RSS after the warm-up and the first half minute
    t, mib = np.array([s for s, _ in rss if s > warm]), np.array([m for s, m in rss if s > warm])
    slope = float(np.polyfit(t / 60, mib * 1.048576, 1)[0]) if t.size > 2 else float("nan")
    at, lat = np.array([s for s, _ in stamped]), np.array([v for _, v in stamped]) * 1000
    start = WARM_UP_MS / 1000
    first = lat[(at >= start) & (at < start + 60)]
    last = lat[at >= at.max() - 60]
    print(
        f"soak: {a.devices} devices, {seconds} s after a {start:.0f} s warm-up, {lat.size} events"
    )
    print(
        f"  worker RSS {mib.min():.0f}-{mib.max():.0f} MiB over {t.size} samples; slope "
        f"{slope:+.2f} MB/min (target <= 1)"
    )
    print(f"  late records: {late:.0f} (target 0); producer behind schedule <= {behind:.2f} s")
    for name, part in (("first minute", first), ("last minute", last)):
        print(
            f"  {name}: {part.size} events, p50 {np.percentile(part, 50):.0f} ms, "
            f"p99 {np.percentile(part, 99):.0f} ms"
        )


if __name__ == "__main__":
    main()
