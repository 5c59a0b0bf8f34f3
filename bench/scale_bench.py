"""What the worker's bookkeeping costs as a fleet grows: per record, per step, per commit.

    .venv/bin/python bench/scale_bench.py                      # 1,000 / 10,000 / 100,000
    .venv/bin/python bench/scale_bench.py --devices 1000 300000

For each fleet size, one engine (the shipped model's windows and features; no broker, no
model calls, no incident stage) takes one telemetry record from each device, all on
partition 0 (the worst case for one partition's commit), then:
- per record: `Engine.process` of a device's first record (a new device, a new window);
- per step: `Engine.tick`, which the worker calls after every poll (idle-timeout check),
  first with every device's window open and heard from just now, then after the windows
  closed, their events left (`Engine.run_batch`, not timed) and every device has been
  silent past the idle timeout (once; what it finds);
- per commit: `Engine.progress(0)` + the offset metadata of partition 0 (`ProgressMetadata`),
  which the worker builds every `runtime.commit_interval_ms` for each owned partition;
- memory: Python heap (tracemalloc) per device with its window open, after the window
  closed (idle) and was emitted, and after `windows.forget_after_ms` of silence (what is
  left then is the hash tables' capacity, as Python's dicts do not shrink, and the window
  progress of the newest 4,096 devices; bounded by the most devices heard from within
  that time, not by all devices ever seen).
Each figure is the best of `--repeat` runs (the VM is noisy).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import replace

from pipeline.clock import Clock
from pipeline.metrics import Metrics
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.engine import Engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.stream.outputs import Decision
from pipeline.stream.window_progress import ProgressMetadata
from pipeline.testing import FakeClock

T0 = 1_767_225_600_000  # a multiple of the 2 s window
NOW = T0 + 10_000  # the clock starts at the records' time: none is stamped in the future
WARM_UP = 4096  # windows emitted before the heap is traced, at most
NORMAL = Decision("normal", 1.0, {"normal": 1.0}, {})


def no_model(windows: Sequence[object]) -> list[Decision]:
    """Every window is normal: emitting windows costs their bookkeeping, no model call."""
    return [NORMAL] * len(windows)


def bookkeeping_engine(runner: ModelRunner, clock: Clock) -> Engine:
    """The engine `iotfuse run` builds for `runner` (its windows, features and limits),
    with `no_model` and without the incident stage: what is measured is the engine's own
    bookkeeping, and its windows' events can leave (`emit_all`) at little cost. One feature
    thread: batches are prepared inline, leaving no thread-pool garbage on the heap."""
    s = Settings()
    s = replace(s, runtime=replace(s.runtime, feature_threads=1))
    cfg = build_engine(s, runner, clock=clock).cfg
    return Engine(cfg, no_model, Metrics(), clock)


def emit_all(engine: Engine) -> None:
    """Classify and emit every closed window, as the worker does; the events are dropped."""
    while engine.queued():
        engine.run_batch()


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def warm_up(runner: ModelRunner, records: list[Record]) -> None:
    """Emit windows once before the heap is traced: what emitting leaves in the free lists
    and caches of CPython and numpy (a fixed 0.1 MB or so) is then not counted per device."""
    clock = FakeClock(NOW)
    engine = bookkeeping_engine(runner, clock)
    for r in records[:WARM_UP]:
        engine.process(r)
    clock.now += Settings().windows.idle_timeout_ms
    engine.tick()
    emit_all(engine)


def heap_per_device(runner: ModelRunner, records: list[Record]) -> tuple[float, float, float]:
    """Python heap per device of an engine that took `records` (a second engine: tracing
    allocations slows `process` several times): windows open; closed (idle) and emitted;
    after `windows.forget_after_ms` of silence."""
    warm_up(runner, records)
    clock = FakeClock(NOW)
    engine = bookkeeping_engine(runner, clock)
    tracemalloc.start()
    heap0 = tracemalloc.get_traced_memory()[0]
    for r in records:
        engine.process(r)
    heaps = [tracemalloc.get_traced_memory()[0] - heap0]
    for wait_ms in (Settings().windows.idle_timeout_ms, Settings().windows.forget_after_ms):
        clock.now += wait_ms
        engine.tick()
        emit_all(engine)
        engine.take_released()  # as the worker does
        heaps.append(tracemalloc.get_traced_memory()[0] - heap0)
    tracemalloc.stop()
    opened, closed, forgotten = (h / len(records) for h in heaps)
    return opened, closed, forgotten


def one_fleet(runner: ModelRunner, devices: int, repeat: int) -> str:
    clock = FakeClock(NOW)
    engine = bookkeeping_engine(runner, clock)
    records = [
        Record(
            "iot.telemetry",
            0,
            i,
            T0 + i % 1000,
            f"dev-{i:07d}".encode(),
            b'{"temperature_c": 21.5}',
        )
        for i in range(devices)
    ]
    start = time.perf_counter()
    for r in records:
        engine.process(r)
    per_record = (time.perf_counter() - start) / devices
    heaps = heap_per_device(runner, records)
    tick_open = best(engine.tick, repeat)
    clock.now += 10 * Settings().windows.idle_timeout_ms
    start = time.perf_counter()
    engine.tick()  # closes every window (idle)
    tick_expire = time.perf_counter() - start
    emit_all(engine)  # the windows' events are not what is measured here
    tick_idle = best(engine.tick, repeat)
    metadata = ProgressMetadata()
    commit = best(lambda: metadata(0, engine.progress(0)), repeat)
    return (
        f"{devices:>8} {per_record * 1e6:>9.1f} us {tick_open * 1e3:>9.3f} ms "
        f"{tick_expire * 1e3:>9.1f} ms {tick_idle * 1e3:>9.3f} ms {commit * 1e3:>9.1f} ms "
        + " ".join(f"{h:>8.0f} B" for h in heaps)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    a = p.parse_args()
    logging.disable(logging.WARNING)  # "progress does not fit" is expected at these sizes
    runner = ModelRunner.load(a.model, "cpu")
    print(
        f"{'devices':>8} {'record':>12} {'tick, open':>12} {'expire all':>12} "
        f"{'tick, idle':>12} {'commit':>12}   heap/device: open, closed, forgotten"
    )
    for n in a.devices:
        print(one_fleet(runner, n, a.repeat), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
