"""Latency as a user sees it (issue 15): a real `iotfuse run`, measured from outside.

    .venv/bin/python bench/outside.py --devices 50 --seconds 120 [--model DIR]
        [--iotfuse PATH] [--bootstrap-servers HOST:PORT]
    IOTFUSE_KAFKA__FETCHER=librdkafka .venv/bin/python bench/outside.py ...  # its fetcher

The worker is `iotfuse run` in its own process (this venv's, or `--iotfuse`, e.g.
build/edge-venv/bin/iotfuse), configured through IOTFUSE_* variables: fresh prefixed topics,
its own group, a free metrics port. Once its metrics say its group is stable, a consumer of
the events topic (a process of its own, from the end) stamps each event's arrival, and the
fleet of bench/fleet.py sends in real time (bench/live_latency.py `produce_live`: a warm-up,
then `--seconds`). User-seen latency = arrival - (window.end_ms + allowed lateness): from when
a live window can close to its event reaching a consumer. Beside it, the same arrival
measured from when the window could close under contract v1.1 (every modality past end +
lateness: its last modality's first record past that, as the fleet sent it; with this
fleet's 5 fps camera, 100 ms after end + lateness) or from when that record was handed to
the Kafka client, if later (the bench's one producer stands in for every device and may
fall behind): what the pipeline itself adds. Every 10 s the worker's RSS
(/proc/PID/status VmRSS) is sampled; at the end its late records are read from its metrics
endpoint, and it is stopped with SIGTERM, which it must answer by exiting 0.

Reports events received against the windows the fleet sent (none may be lost), p50/p99/max
latency over the run after the warm-up and over its first and last minute, the RSS slope
(least squares, MB/min, from warm-up + 30 s), late records, and how far the producer fell
behind schedule. bench/soak.py is this at half load for 10 minutes, with its targets.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from prometheus_client.parser import text_string_to_metric_families

from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.local.broker import LocalKafka

# Light imports only at the top: the events consumer's spawned process imports this module,
# and needs neither torch nor the fleet (bench/fleet.py; imported in `measure`).
SAMPLE_S = 10.0  # RSS sample and progress line
STALL_S = 30.0  # no new event for this long after the fleet stopped: the rest is lost
START_S = 300.0  # the worker loads its model and joins its group within this
WINDOW_MS = 2000  # the fleet's model's window (bench/fleet.py)
WARM_UP_MS = 6000  # bench/live_latency.py WARM_UP_MS (checked in `measure`)
LATE = "iotfuse_late_records_total"  # docs/metrics.md
# a 15-minute soak at 100 devices writes ~20 GB of frames (one filled the disk): keep at
# most this much of each camera and audio partition (the worker reads live)
INPUT_RETENTION = {"retention.bytes": str(1 << 30), "segment.bytes": str(128 << 20)}
Arrival = tuple[str, int, int, int]  # device id, window start_ms, end_ms, arrival (wall ms)


# -- the worker ------------------------------------------------------------------------------
class Worker:
    """`iotfuse run` as a user starts it; settings in its environment, output in a log."""

    def __init__(
        self, iotfuse: str, bootstrap: str, names: TopicNames, lateness_ms: int, model: Path | None
    ) -> None:
        with socket.socket() as s:  # a free port for its metrics endpoint
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        # this run's settings only; the allocator as asked (IOTFUSE_RUNTIME__ALLOCATOR=system
        # keeps glibc's malloc where the machine has jemalloc), and the input's fetcher
        keep = ("IOTFUSE_RUNTIME__ALLOCATOR", "IOTFUSE_KAFKA__FETCHER")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTFUSE_") or k in keep}
        roles = ("camera", "audio", "telemetry", "labels", "events", "deadletter", "incidents")
        env |= {f"IOTFUSE_TOPICS__{r.upper()}": getattr(names, r) for r in roles}
        env |= {
            "IOTFUSE_TOPICS__INCIDENT_STATE": names.incident_state,
            "IOTFUSE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "IOTFUSE_KAFKA__GROUP_ID": names.events.rsplit(".", 1)[0],  # this run's prefix
            "IOTFUSE_WINDOWS__ALLOWED_LATENESS_MS": str(lateness_ms),
            "IOTFUSE_RUNTIME__METRICS_PORT": str(self.port),
            "IOTFUSE_RUNTIME__METRICS_HOST": "127.0.0.1",
        }
        argv = [iotfuse, "run"] + (["--model", str(model.resolve())] if model else [])
        self.log_path = Path(tempfile.gettempdir()) / f"outside-worker-{self.port}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir()
            )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of its metrics endpoint: (name, sorted labels) -> value."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (a local URL)
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_consuming(self, timeout_s: float, progress: Callable[[str], None]) -> None:
        """Until its consumer group is stable (it owns its partitions), per its metrics."""
        stable = ("iotfuse_consumer_group_state", (("state", "stable"),))
        start = time.monotonic()
        said = start
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"iotfuse run exited {self.proc.returncode}: {self.tail()}")
            try:
                if self.metrics().get(stable) == 1.0:
                    return
            except OSError:
                pass  # not serving yet (loading)
            now = time.monotonic()
            if now - start > timeout_s:
                raise RuntimeError(f"iotfuse run not consuming after {timeout_s:.0f} s")
            if now - said >= SAMPLE_S:
                said = now
                progress(f"  {now - start:.0f} s: waiting for the worker to consume")
            time.sleep(0.2)  # polling its endpoint with a deadline

    def allocator(self) -> str:
        """What it allocates with: `iotfuse run` starts again on jemalloc where the
        machine has it (runtime.allocator=auto), so its own memory map says."""
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return "jemalloc" if "libjemalloc" in maps else "glibc malloc"

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM; its exit status (killed, -9, if it outlives the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])


# -- the user's consumer ---------------------------------------------------------------------
def tap(bootstrap: str, topic: str, ready: Event, stop: Event, out: Any, count: Any) -> None:
    """Child process: reads `topic` from its end until `stop`; puts lists of events
    (device, start_ms, end_ms, arrival wall ms) on `out`, then None."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    deadline = time.monotonic() + 60
    while not (parts := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no partitions of {topic} after 60 s")
        time.sleep(0.1)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # resolves the end now, before anything is produced
    ready.set()
    try:
        while not stop.is_set():
            got = consumer.poll(timeout_ms=100)
            arrival = time.time_ns() // 1_000_000
            batch = []
            for msgs in got.values():
                for m in msgs:
                    e = json.loads(m.value)
                    w = e["window"]
                    batch.append((e["device_id"], w["start_ms"], w["end_ms"], arrival))
            if batch:
                out.put(batch)
                with count.get_lock():
                    count.value += len(batch)
    finally:
        consumer.close()
        out.put(None)


class Tap:
    """`tap` in a process of its own: this one's GIL (the fleet) does not delay arrivals."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stopping = ctx.Event(), ctx.Event()
        self.queue: Any = ctx.Queue()
        self.count: Any = ctx.Value("q", 0)
        args = (bootstrap, topic, self.ready, self.stopping, self.queue, self.count)
        self.proc = ctx.Process(target=tap, args=args, daemon=True)
        self.proc.start()
        self.events: list[Arrival] = []

    def drain(self, timeout_s: float) -> bool:
        """Take what arrived, waiting up to timeout_s for more; False once it has stopped."""
        try:
            batch = self.queue.get(timeout=timeout_s)
            while batch is not None:
                self.events += batch
                batch = self.queue.get_nowait()
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.stopping.set()
        deadline = time.monotonic() + 60
        while self.drain(1.0) and self.proc.is_alive() and time.monotonic() < deadline:
            pass
        self.proc.join(timeout=10)


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    devices: int
    seconds: int
    lateness_ms: int
    t0_ms: int  # the fleet's first window start
    expected: int  # windows the fleet sent, warm-up included
    lost: list[tuple[str, int]]  # (device, end_ms) of expected windows without an event
    duplicates: int
    extra: int  # events of other windows (the tail's, closed by the idle timeout)
    end_ms: np.ndarray  # per window received (first arrival), its end ...
    latency_ms: np.ndarray  # ... and arrival - (end + lateness)
    from_ready_ms: np.ndarray  # ... and arrival - when it could close, as sent (module doc)
    rss: list[tuple[float, float]]  # (s since the fleet was started, MiB), while it sent
    late: float
    behind_s: float
    exit_code: int
    log: Path
    allocator: str

    def part(
        self, since_s: float = 0, until_s: float | None = None, source: np.ndarray | None = None
    ) -> np.ndarray:
        """Latencies (`source`: of another kind) of the windows ending in (warm-up + since_s,
        warm-up + until_s]."""
        start = self.t0_ms + WARM_UP_MS
        until = self.seconds if until_s is None else until_s
        keep = (self.end_ms > start + since_s * 1000) & (self.end_ms <= start + until * 1000)
        return (self.latency_ms if source is None else source)[keep]

    @property
    def first(self) -> np.ndarray:
        return self.part(0, 60)

    @property
    def last(self) -> np.ndarray:
        return self.part(max(0, self.seconds - 60))

    def p99_by_minute(self) -> str:
        """Each whole minute's p99 after the warm-up (a trend, not two ends)."""
        parts = (self.part(60 * k, 60 * (k + 1)) for k in range(self.seconds // 60))
        return " ".join(f"{np.percentile(p, 99):.0f}" for p in parts if p.size) or "-"

    def rss_after(self, since_s: float) -> list[tuple[float, float]]:
        """The RSS samples taken later than `since_s` after the warm-up."""
        return [(s, m) for s, m in self.rss if s > WARM_UP_MS / 1000 + since_s]

    def slope_after(self, since_s: float) -> float:
        """RSS MB/min by least squares over `rss_after` (nan: fewer than 3 samples)."""
        samples = self.rss_after(since_s)
        if len(samples) < 3:
            return float("nan")
        t, mib = np.array(samples).T
        return float(np.polyfit(t / 60, mib * 1.048576, 1)[0])

    @property
    def slope(self) -> float:
        """RSS MB/min after warm-up + 30 s."""
        return self.slope_after(30)

    def lines(self) -> list[str]:
        def stats(lat: np.ndarray) -> str:
            if not lat.size:
                return "no events"
            p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
            return f"{lat.size} events, p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {lat.max():.0f} ms"

        mib = [m for _, m in self.rss] or [float("nan")]
        lost = ", ".join(f"{d}@{e}" for d, e in self.lost[:5])
        return [
            f"  events: {self.expected - len(self.lost)} of {self.expected} windows sent "
            f"(lost {len(self.lost)}{': ' + lost if lost else ''}; duplicates "
            f"{self.duplicates}; events of other windows {self.extra})",
            f"  user-seen latency, arrival - (window end + {self.lateness_ms} ms):",
            f"    after the warm-up: {stats(self.part())}",
            f"    first minute: {stats(self.first)}",
            f"    last minute: {stats(self.last)}",
            f"    warm-up windows included: {stats(self.latency_ms)}",
            f"    p99 by minute, ms: {self.p99_by_minute()}",
            "  the pipeline's own, arrival - when the window could close (contract v1.1, as sent):",
            f"    after the warm-up: {stats(self.part(source=self.from_ready_ms))}",
            f"  worker RSS {min(mib):.0f}-{max(mib):.0f} MiB over {len(self.rss)} samples; "
            f"slope {self.slope:+.2f} MB/min (after warm-up + 30 s; nan: under 3 samples)",
            f"  late records: {self.late:.0f}; producer behind schedule <= "
            f"{self.behind_s * 1000:.0f} ms; worker exit on SIGTERM: {self.exit_code} "
            f"(log {self.log})",
        ]


def sampler(
    worker: Worker, events: Tap, stop: threading.Event, progress: Callable[[str], None]
) -> list[tuple[float, float]]:
    """Every SAMPLE_S until `stop`: the worker's RSS, and a progress line; the samples (s
    from now, MiB) fill in."""
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            try:
                rss.append((time.monotonic() - t0, worker.rss_mib()))
            except (OSError, IndexError):
                return  # it exited
            at, mib = rss[-1]
            progress(f"  {at:.0f} s: {events.count.value} events, worker RSS {mib:.0f} MiB")

    threading.Thread(target=sample, name="rss", daemon=True).start()
    return rss


def bound_disk(bootstrap: str, topics: tuple[str, ...]) -> None:
    """INPUT_RETENTION on `topics`: the oldest segments go once a partition holds more."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, dict(INPUT_RETENTION)) for t in topics]
        )
    finally:
        admin.close()


def measure(
    bootstrap: str,
    devices: int,
    seconds: int,
    model: Path | None = None,
    iotfuse: str | None = None,
    lateness_ms: int = 500,
    progress: Callable[[str], None] = print,
) -> Outcome:
    """Runs `iotfuse run` against fresh topics on `bootstrap` and a live fleet (module doc)."""
    import live_latency  # heavy (torch, the fleet): see the imports above
    from fleet import PARTITIONS, make_media

    assert live_latency.WARM_UP_MS == WARM_UP_MS, "bench/live_latency.py changed its warm-up"
    if seconds % (WINDOW_MS // 1000):
        raise ValueError(f"--seconds must be a multiple of {WINDOW_MS // 1000}: got {seconds}")
    names = TopicNames.prefixed(f"outside-{time.time_ns()}")
    ensure_topics(bootstrap, names, PARTITIONS, 1)
    bound_disk(bootstrap, (names.camera, names.audio))
    media = make_media()
    events = Tap(bootstrap, names.events)
    program = (
        str(Path(iotfuse).absolute()) if iotfuse else str(Path(sys.executable).parent / "iotfuse")
    )
    worker = Worker(program, bootstrap, names, lateness_ms, model)
    stop = threading.Event()
    try:
        progress(f"outside: started `iotfuse run` (pid {worker.proc.pid}, log {worker.log_path})")
        worker.wait_consuming(START_S, progress)
        allocator = worker.allocator()
        if not events.ready.wait(60):
            raise RuntimeError("the events consumer was not ready within 60 s")
        rss = sampler(worker, events, stop, progress)
        sent: dict[int, int] = {}
        behind, _ = live_latency.produce_live(bootstrap, names, devices, seconds, media, sent)
        stop.set()  # RSS of the live run only, not of an idle worker after it
        per_device = (WARM_UP_MS + seconds * 1000) // WINDOW_MS
        expected_n, since = devices * per_device, time.monotonic()
        while len(events.events) < expected_n and time.monotonic() - since < STALL_S:
            n = len(events.events)
            if not events.drain(1.0) or worker.proc.poll() is not None:
                break
            if len(events.events) > n:
                since = time.monotonic()
        late = sum(v for (n, _), v in worker.metrics().items() if n == LATE)
    finally:
        stop.set()
        code = worker.stop()
        events.close()
    if code != 0:
        progress(f"outside: iotfuse run exited {code}: {worker.tail()}")
    first: dict[tuple[str, int], tuple[int, int]] = {}
    for device, start, end, arrival in events.events:
        first.setdefault((device, end), (start, arrival))
    t0 = min((s for s, _ in first.values()), default=0)
    want = {
        (f"dev-{d:03d}", t0 + WINDOW_MS * (k + 1))
        for d in range(devices)
        for k in range(per_device)
    }
    got = sorted((key[1], arrival) for key, (_, arrival) in first.items() if key in want)
    return Outcome(
        devices,
        seconds,
        lateness_ms,
        t0,
        len(want),
        sorted(want - first.keys(), key=lambda k: (k[1], k[0])),
        len(events.events) - len(first),
        len(first.keys() - want),
        np.array([e for e, _ in got], dtype=np.int64),
        np.array([a - (e + lateness_ms) for e, a in got], dtype=np.float64),
        np.array([a - can_close(e + lateness_ms, t0, sent) for e, a in got], dtype=np.float64),
        rss,
        late,
        behind,
        code,
        worker.log_path,
        allocator,
    )


def can_close(past_ms: int, t0_ms: int, sent: dict[int, int]) -> int:
    """When a window whose modalities must pass `past_ms` can close (contract v1.1): the
    fleet's first tick at or after it with a camera frame, and the one with an audio chunk
    (telemetry comes every tick), or when that tick was sent, if later."""
    from fleet import AUDIO_EVERY, CAMERA_EVERY, TICK_MS

    k = -(-(past_ms - t0_ms) // TICK_MS)  # ceil: the first tick at or after it
    ticks = [-(-k // every) * every for every in (CAMERA_EVERY, AUDIO_EVERY)]
    ready = t0_ms + max(ticks) * TICK_MS
    return max(ready, sent.get(ready, ready))


def arguments(p: argparse.ArgumentParser) -> None:
    """What outside.py and soak.py share."""
    p.add_argument("--devices", type=int, default=50, help="devices sending in real time")
    p.add_argument("--model", type=Path, help="model dir: torch, or from `iotfuse export`")
    p.add_argument("--iotfuse", help="the iotfuse to run (default: this venv's)")
    p.add_argument("--bootstrap-servers", help="an existing broker (default: a local one)")


def with_broker(bootstrap: str | None, job: Callable[[str], Outcome]) -> Outcome:
    if bootstrap:
        return job(bootstrap)
    with LocalKafka() as kafka:
        return job(kafka.bootstrap_servers)


def heading(a: argparse.Namespace, seconds: int, out: Outcome) -> str:
    return (
        f"{a.devices} devices, {seconds} s after a {WARM_UP_MS // 1000} s warm-up; "
        f"{a.iotfuse or 'iotfuse'} run, model {a.model or 'shipped'}, {out.allocator}, "
        f"fetcher {os.environ.get('IOTFUSE_KAFKA__FETCHER', 'kafka-python')}; "
        f"load avg {os.getloadavg()[0]:.1f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments(p)
    p.add_argument("--seconds", type=int, default=120, help="after the warm-up; even")
    a = p.parse_args()
    if a.seconds % 2 or a.seconds <= 0:
        p.error(f"--seconds must be a positive even number: got {a.seconds}")

    def job(bootstrap: str) -> Outcome:
        return measure(bootstrap, a.devices, a.seconds, a.model, a.iotfuse)

    out = with_broker(a.bootstrap_servers, job)
    print(f"outside: {heading(a, a.seconds, out)}", *out.lines(), sep="\n")
    return 0 if not out.lost and out.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
