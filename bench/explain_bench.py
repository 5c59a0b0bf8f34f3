"""What `runtime.explain_telemetry_top` (`explanation.telemetry` in each event) costs.

    .venv/bin/python bench/explain_bench.py                # model only and offline, A/B
    .venv/bin/python bench/explain_bench.py --live          # and latency at half load (Kafka)
    .venv/bin/python bench/explain_bench.py --quick

bench/fleet.py's devices (5 fps 640x480 JPEG, 0.5 s WAV chunks, 10 Hz telemetry), the
shipped model, torch threads as `iotfuse run` sets them. Each measurement runs off and on
(top 3 metrics) alternately, `--repeat` times (a shared machine is noisy); the best of each
is compared, in windows per second (wall clock: noisy on a shared machine) and in CPU
milliseconds per window (this process; steadier):
1. model only: `classify` over the closed windows' inputs, in batches of 64 and of 8 (the
   live worker's batches at half load are small);
2. the offline pipeline (`run_offline`, max_batch 64);
3. with `--live`: event latency at half load (bench/live_latency.py: devices producing in
   real time to a worker in a child process), `--devices` devices (default 86: half load as
   docs/performance.md measured it, 43 windows/s, a device giving 0.5 window/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack

import numpy as np
import torch
from fleet import Rate, make_media, settings_for, stream
from live_latency import LiveRun, live_latency
from pipeline_bench import window_raws

from pipeline.cli import torch_threads
from pipeline.clock import wall_clock_ms
from pipeline.kafka.local.broker import LocalKafka
from pipeline.metrics import Metrics
from pipeline.records import Record
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.model_runner import ModelRunner

TOP = 3


Timed = tuple[Rate, float]  # windows per wall-clock second, and CPU ms per window


def model_only(runner: ModelRunner, raws: list, batch: int, top: int) -> Timed:
    classify = runner.classifier(top)
    classify(raws[:batch])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(raws), batch):
        classify(raws[i : i + batch])
    cpu_ms = (time.process_time() - cpu) * 1000 / len(raws)
    return Rate(len(raws), time.perf_counter() - start), cpu_ms


def offline(runner: ModelRunner, records: list[Record], top: int) -> Timed:
    settings = settings_for("unused:9092", None, 64, explain_top=top)
    engine, events = build_engine(settings, runner, Metrics()), 0
    start, cpu = time.perf_counter(), time.process_time()
    for out in run_offline(engine, records):
        events += out.topic == settings.topics.events
    cpu_ms = (time.process_time() - cpu) * 1000 / max(events, 1)
    return Rate(events, time.perf_counter() - start), cpu_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=86, help="live run: devices (half load)")
    p.add_argument("--seconds", type=int, default=20, help="seconds of records per device")
    p.add_argument("--live-seconds", type=int, default=24, help="length of each latency run")
    p.add_argument("--repeat", type=int, default=3, help="off/on rounds, alternated")
    p.add_argument("--live", action="store_true", help="also latency at half load (Kafka)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.devices, a.seconds, a.live_seconds, a.repeat = 8, 6, 6, 1
    torch.set_num_threads(torch_threads(0, "run"))
    media = make_media()
    seconds = a.seconds + a.seconds % 2
    t0 = (wall_clock_ms() // 2000) * 2000 - seconds * 1000 - 60_000
    records = stream(32 if not a.quick else 4, t0, seconds, media)
    runner = ModelRunner.load(None)
    raws = window_raws(records, build_engine(settings_for("unused:9092", None), runner).cfg)
    lines = [
        f"{len(raws)} windows; model {runner.model_id.name} on {runner.device}; torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"
    ]
    runs: dict[str, list[Timed]] = {}
    for n in range(a.repeat):
        print(f"round {n + 1} of {a.repeat}", file=sys.stderr, flush=True)
        for top in (0, TOP):
            for batch in (64, 8):
                runs.setdefault(f"model, batches of {batch}|{top}", []).append(
                    model_only(runner, raws, batch, top)
                )
            runs.setdefault(f"offline pipeline|{top}", []).append(offline(runner, records, top))
    names = dict.fromkeys(k.split("|")[0] for k in runs)
    lines.append(
        f"{'best of ' + str(a.repeat):<30}{'windows/s off':>14}{'on':>8}"
        f"{'CPU ms/window off':>19}{'on':>7}{'more':>7}"
    )
    for name in names:
        off, on = runs[f"{name}|0"], runs[f"{name}|{TOP}"]
        rate_off, rate_on = max(r.per_s for r, _ in off), max(r.per_s for r, _ in on)
        cpu_off, cpu_on = min(c for _, c in off), min(c for _, c in on)
        lines.append(
            f"{name:<30}{rate_off:>14.1f}{rate_on:>8.1f}{cpu_off:>19.2f}{cpu_on:>7.2f}"
            f"{(cpu_on - cpu_off) / cpu_off:>+7.0%}"
        )
    if a.live:
        with ExitStack() as stack:
            print("starting a local Kafka ...", file=sys.stderr, flush=True)
            bootstrap = stack.enter_context(LocalKafka(nodes=1)).bootstrap_servers
            live: dict[int, list[LiveRun]] = {0: [], TOP: []}
            for n in range(a.repeat):
                for top in (0, TOP):
                    print(f"live run {n + 1}, explain_telemetry_top={top}", file=sys.stderr)
                    run = live_latency(
                        bootstrap, None, raws[0], a.devices, a.live_seconds, media, top
                    )
                    live[top].append(run)
            for top, got in live.items():
                p99s = sorted(r.p99 for r in got)
                lines.append(
                    f"half load, {a.devices} devices, explain_telemetry_top={top}: p99 "
                    f"{', '.join(f'{v:.0f}' for v in p99s)} ms; p50 "
                    f"{', '.join(f'{np.percentile(r.measured, 50):.0f}' for r in got)} ms "
                    "(target p99 <= 250 ms)"
                )
                lines += [f"    {line}" for r in got for line in r.lines()[2:]]
    lines.append(f"load avg {os.getloadavg()[0]:.1f} at end")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
