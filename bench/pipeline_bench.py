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
   A record of each modality per device 600 ms past the end closes the last windows by
   watermark; the windows it opens are not counted (the idle timeout is set to 10 min so
   that only watermark-closed windows are counted);
4. offline with max_batch=1 (at most 20 s a run: the windows done by then);
5. per-message loop via Kafka: consume a record, decode it, classify it alone (a one-record
   window), produce its event, flush(); over whole windows of a few devices;
6. half load (bench/live_latency.py), `--live-runs` times (the best p99 is judged, the
   others printed): devices = stage 3's windows/s (a device gives 0.5 window/s) produce in
   real time to a worker in a child process (own GIL and RSS); every window-close ->
   event-ack latency is kept. The first 6 s are a warm-up (the worker's first batches, the producer
   and the new topics' first seconds, when the producer falls up to 0.3 s behind and the
   worker gets a camera frame after a later telemetry record; reported apart: events are
   acknowledged in window order).
   Devices go on sending to a camera frame 600 ms past the last measured window, so it
   closes by watermark like every other one (the windows that tail opens are not counted).
A worker that acknowledges nothing for 30 s is reported as STALLED and its run left out.
Seen with kafka-python 3.0.12: after the worker pauses a partition running ahead and
resumes it, the partition is never fetched again (its parked records are only restored
while the fetcher's in-line slot is None, which it no longer is after the first fetch), so
the worker no longer pauses single partitions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from fleet import (
    PARTITIONS,
    PER_WINDOW,
    MeasuredWorker,
    Rate,
    Raw,
    Stalled,
    closing,
    make_media,
    memory_mib,
    produced,
    settings_for,
    stream,
)
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from live_latency import LiveRun, live_latency

from pipeline.cli import torch_threads
from pipeline.clock import wall_clock_ms
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.config import MAX_RECORD_BYTES, producer_config
from pipeline.kafka.local.broker import LocalKafka
from pipeline.kafka.messages import to_record
from pipeline.metrics import Metrics
from pipeline.records import Record
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.engine import EngineConfig
from pipeline.stream.features import window_inputs
from pipeline.stream.ingest import ingest
from pipeline.stream.model_runner import ModelRunner
from pipeline.stream.outputs import event_output, event_value
from pipeline.stream.windows import Window, Windower


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


def offline(
    runner: ModelRunner, records: list[Record], max_batch: int, budget_s: float = float("inf")
) -> tuple[Rate, str]:
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
    model, features = (
        metrics.value("iotfuse_stage_seconds_sum", {"stage": s}) / rate.seconds
        for s in ("model", "features")
    )
    return rate, (
        f"model {model:.0%}, features (frame decode) {features:.0%}, "
        f"ingest+align+window+outputs {1 - model - features:.0%}"
    )


# -- stages through the broker --------------------------------------------------------------
def end_to_end(
    bootstrap: str, runner: ModelRunner, names: TopicNames, windows: int
) -> tuple[Rate, Rate]:
    """A worker of a new consumer group reads the topics from the beginning: the drain (from
    its first record) and the whole run (from its start, group join included)."""
    start = time.perf_counter()
    run = MeasuredWorker(settings_for(bootstrap, names), runner)
    run.wait_acked(windows)
    assert run.first_at is not None  # events were acknowledged: records came in first
    return (
        Rate(windows, run.latency.last_at - run.first_at),
        Rate(windows, run.latency.last_at - start),
    )


def per_message(bootstrap: str, runner: ModelRunner, records: list[Record]) -> Rate:
    """The naive loop: one record at a time, one model call and one flush() per record."""
    names = produced(bootstrap, records)
    settings = settings_for(bootstrap, names)
    cfg = build_engine(settings, runner).cfg
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
    )
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
    p.add_argument("--live-runs", type=int, default=2, help="latency runs (the best is judged)")
    p.add_argument("--repeat", type=int, default=4, help="runs of stages 1-4, alternated")
    p.add_argument("--skip-kafka", action="store_true", help="stages 1, 2 and 4 only")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument(
        "--threads",
        type=int,
        default=torch_threads(0, "run"),
        help="torch threads, the worker's too (default: as `iotfuse run` sets them)",
    )
    p.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    a = p.parse_args()
    if a.quick:
        a.devices, a.seconds, a.live_seconds, a.repeat, a.live_runs = 4, 6, 6, 1, 1
    seconds, live_seconds = a.seconds + a.seconds % 2, a.live_seconds + a.live_seconds % 2
    torch.set_num_threads(a.threads)
    media = make_media()
    t0 = (wall_clock_ms() // 2000) * 2000 - seconds * 1000 - 60_000
    records, windows = stream(a.devices, t0, seconds, media), a.devices * seconds // 2
    lines = [
        f"{a.devices} devices x {seconds} s: {windows} device-windows, {len(records)} "
        f"records ({sum(len(r.value or b'') for r in records) / 1e6:.0f} MB, JPEG "
        f"{np.mean([len(f) for f in media[0]]) / 1e3:.0f} KB); torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load avg "
        f"{os.getloadavg()[0]:.1f} at start"
    ]
    runs: dict[str, list[Rate]] = {"model": [], "b64": [], "e2e": [], "e2e+join": [], "b1": []}
    splits, naive, live, stalls = {}, None, list[LiveRun](), list[str]()
    with ExitStack() as stack:
        directory = a.model
        runner = ModelRunner.load(directory)
        lines.append(
            f"model {runner.model_id.name} ({runner.model_id.version[:19]}) on {runner.device}"
        )
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
        lines += [
            row("1 model only (classify, batches of 64)", runs["model"]),
            row("2 offline pipeline, max_batch 64", runs["b64"]),
            f"    {splits['b64']}",
        ]
        if runs["e2e"]:
            lines += [
                row("3 end to end via Kafka, max_batch 64", runs["e2e"]),
                row("    the same, group join included", runs["e2e+join"]),
            ]
        lines += [row("4 offline pipeline, max_batch 1", runs["b1"]), f"    {splits['b1']}"]
        if bootstrap is not None and runs["e2e"]:
            print("per-message loop ...", file=sys.stderr, flush=True)
            few = {f"dev-{d:03d}".encode() for d in range(1 if a.quick else min(a.devices, 4))}
            until = t0 + (2000 if a.quick else 4000)  # whole windows of those devices
            naive = per_message(
                bootstrap, runner, [r for r in records if r.key in few and r.timestamp_ms < until]
            )
            lines.append(
                row("5 per-message loop via Kafka", [naive], "records")
                + f" = {naive.per_s / PER_WINDOW:.2f} windows/s"
            )
            devices = max(1, round(max(r.per_s for r in runs["e2e"])))  # = half load
            for n in range(a.live_runs):
                print(
                    f"live run {n + 1} of {a.live_runs}: {devices} devices, {live_seconds} s",
                    file=sys.stderr,
                    flush=True,
                )
                run = live_latency(bootstrap, directory, raws[0], devices, live_seconds, media)
                live.append(run)
                stalls += [run.note] if run.note else []
                lines += run.lines()
    lines.append(
        f"bench process peak RSS {memory_mib():.0f} MiB; load avg {os.getloadavg()[0]:.1f} at end"
    )
    best = {k: max((r.per_s for r in v), default=0.0) for k, v in runs.items()}
    lines += [
        "ratios of the best runs, and targets:",
        check("pipeline / model-only (offline)", best["b64"] / best["model"], 0.7),
        check("batched / unbatched (offline)", best["b64"] / best["b1"], 3.5),
    ]
    if naive is not None and live:
        p99s = sorted(r.p99 for r in live)
        per_msg = naive.per_s / PER_WINDOW
        lines += [
            check("end to end, windows/s", best["e2e"], 100),
            check("batched e2e / per-message (both via Kafka)", best["e2e"] / per_msg, 10),
            f"  {'(batched offline / per-message':<46}{best['b64'] / per_msg:>8.2f})",
            check("p99 latency at half load, ms", p99s[0], 250, less=True)
            + (
                f" (other runs: {', '.join(f'{v:.0f}' for v in p99s[1:])})" if len(p99s) > 1 else ""
            ),
        ]
    lines += [f"STALLED, left out of the figures: {stall}" for stall in stalls]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
