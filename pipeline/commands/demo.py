"""`iotfuse demo`: a local Kafka, simulated devices live, the pipeline, events as they arrive.

A local broker and the contract's topics; the simulated records produced at their real-time
pace (--speed) from a thread while `iotfuse run`'s worker classifies them; every event shown
with the simulator's ground truth until each expected (device, window) has one, or QUIET_S
passed without a new one after the last record was sent; then the accuracy and a timeline
PNG in --out. Without Java or Maven, or with --offline, the same records go through the
offline pipeline (`run_offline`, as `iotfuse replay --offline`) with the same lines and report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.commands.common import count, positive
from pipeline.errors import UserError
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.commands.demo_report import WindowResult
    from pipeline.kafka.local.broker import LocalKafka
    from pipeline.records import Record
    from pipeline.simulate import Episode
    from pipeline.stream.model_runner import ModelRunner

DEMO_USER = "demo"  # the secured demo's only user besides the admin
QUIET_S = 30.0  # give up once no new event came for this long after the last record was sent
INCIDENTS_QUIET_S = 1.0  # after the last event, incidents are read until quiet this long
Window = tuple[str, int]  # device id, window start (epoch ms)


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=count, default=3, help="simulated devices (default 3)")
    p.add_argument(
        "--duration",
        type=positive,
        default=20.0,
        metavar="SECONDS",
        help="simulated seconds per device (default 20)",
    )
    p.add_argument("--seed", type=int, default=7, help="scenario seed (default 7)")
    p.add_argument(
        "--start-ms", type=int, metavar="EPOCH_MS", help="first simulated timestamp (default: now)"
    )
    p.add_argument("--model", metavar="DIR", help="model directory (default: shipped model)")
    p.add_argument("--device", help="torch device: auto (default), cpu, cuda, cuda:N")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=positive,
        default=1.0,
        help="live pace factor: 10 = ten times faster than real time (default 1)",
    )
    pace.add_argument("--max-speed", action="store_true", help="produce without pacing")
    p.add_argument(
        "--offline",
        action="store_true",
        help="no Kafka: run the scenario through the offline pipeline "
        "(what the demo does where Java or Maven is missing)",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="secure the local Kafka: TLS, SCRAM-SHA-512, and ACLs that allow the demo's "
        "user its topics and consumer group only",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        metavar="DIR",
        help="where the timeline PNG goes (default ./demo-output)",
    )


class EventTable:
    """Prints each event once, next to the ground truth; knows which windows are missing."""

    def __init__(self, truth: Mapping[str, Sequence[Episode]], expected: set[Window]) -> None:
        from pipeline.commands.demo_report import Incidents

        self.truth = truth
        self.expected = expected
        self.results: dict[Window, WindowResult] = {}
        self.incidents = Incidents(truth)

    def add_incident(self, record: Mapping[str, Any]) -> bool:
        """Show an incident opened or closed; False for an update or a repeat."""
        line = self.incidents.add(record)
        if line is not None:
            print(line, flush=True)
        return line is not None

    @property
    def complete(self) -> bool:
        return self.expected <= self.results.keys()

    def add(self, event: Mapping[str, Any]) -> bool:
        """Show an event; False if its window was shown already (a redelivery)."""
        from pipeline.commands.demo_report import WindowResult
        from pipeline.simulate import label_at

        start, end = int(event["window"]["start_ms"]), int(event["window"]["end_ms"])
        device = str(event["device_id"])
        if (device, start) in self.results:
            return False
        if not self.results:
            print(f"{'device':<10} {'window':<8}  {'label':<14} {'conf':>5}  truth")
        truth = label_at(self.truth, device, (start + end) // 2)
        r = WindowResult(device, start, end, str(event["label"]), float(event["confidence"]), truth)
        self.results[(device, start)] = r
        mark = "  <- differs" if truth is not None and truth != r.label else ""
        hms = datetime.fromtimestamp(start / 1000, UTC).strftime("%H:%M:%S")
        print(
            f"{device:<10} {hms:<8}  {r.label:<14} {r.confidence:>5.2f}  {truth or '-'}{mark}",
            flush=True,
        )
        return True


def demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.simulate import episodes_from_records
    from pipeline.stream.assembly import window_config
    from pipeline.stream.model_runner import ModelRunner

    runner = ModelRunner.load(settings.runtime.model or None, settings.runtime.device)
    windows = window_config(settings, runner.features.window_ms)
    if args.offline:
        print("demo: --offline: the scenario runs through the offline pipeline, no Kafka")
    kafka = None if args.offline else _local_kafka(args.secure)
    records = _scenario(args, settings)
    inputs = {settings.topics.camera, settings.topics.audio, settings.topics.telemetry}
    expected = {
        (r.key.decode(), windows.start_of(r.timestamp_ms))
        for r in records
        if r.topic in inputs and r.key is not None
    }
    devices = f"{args.devices} device{'s' if args.devices > 1 else ''}"
    print(
        f"demo: {len(records)} records from {devices} x {args.duration:g} s; "
        f"model {runner.model_id.name} ({runner.model_id.version[:19]}) on {runner.device}"
    )
    table = EventTable(episodes_from_records(records, settings.topics.labels), expected)
    if kafka is None:
        _run_offline(settings, runner, records, table)
    else:
        try:
            _run_live(
                kafka, settings, runner, records, table, None if args.max_speed else args.speed
            )
        finally:
            kafka.close()
    _report(args.out, table, runner.config.classes)
    _explain(args.out, records, settings, runner, table)
    return 0


def _explain(
    out: Path, records: list[Record], settings: Settings, runner: ModelRunner, table: EventTable
) -> None:
    """`iotfuse explain`'s report of the most confident window not labelled normal."""
    from pipeline.learn.explain_report import explain_window

    shown = [r for r in table.results.values() if r.label != "normal"]
    if not shown or runner.exported:
        why = "an exported model has no gradients" if shown else "every window was normal"
        print(f"demo: no explanation report: {why}")
        return
    r = max(shown, key=lambda r: r.confidence)
    png, _ = explain_window(out, records, settings, runner, r.device, r.start_ms)
    print(f"demo: explanation of {r.device} {r.label} ({r.confidence:.2f}) written to {png}")


def _local_kafka(secure: bool) -> LocalKafka | None:
    """A started local broker, or None (said in one line) where Java or Maven is missing."""
    from pipeline.kafka.local.broker import LocalKafka
    from pipeline.kafka.local.runtime import KafkaRuntimeError
    from pipeline.kafka.local.security import SecurityConfig, new_password

    print("demo: starting a local Kafka (first start takes ~10 s)", flush=True)
    security = SecurityConfig(users={DEMO_USER: new_password()}) if secure else None
    kafka = LocalKafka(security=security)
    try:
        kafka.start()
    except KafkaRuntimeError as exc:
        reason = str(exc).split(": ", 1)[0].split(". ", 1)[0]
        print(
            f"demo: no local Kafka ({reason}); running the same scenario offline instead, "
            "the pipeline without a broker as `iotfuse replay --offline` runs it"
        )
        return None
    return kafka


def _scenario(args: argparse.Namespace, settings: Settings) -> list[Record]:
    """The simulated records, stamped from now (or --start-ms) on, on the configured topics."""
    from pipeline.simulate import ScenarioConfig, simulate

    t = settings.topics
    start = args.start_ms if args.start_ms is not None else time.time_ns() // 1_000_000
    topics = {role: getattr(t, role) for role in ("camera", "audio", "telemetry", "labels")}
    cfg = ScenarioConfig(
        seed=args.seed,
        devices=args.devices,
        duration_s=args.duration,
        start_ms=start,
        topics=topics,
    )
    return list(simulate(cfg))


def _run_offline(
    settings: Settings, runner: ModelRunner, records: list[Record], table: EventTable
) -> None:
    from pipeline.stream.assembly import build_engine, run_offline

    engine = build_engine(settings, runner)
    for out in run_offline(engine, records):
        if out.topic == engine.cfg.events_topic and out.value is not None:
            table.add(json.loads(out.value))
        elif out.topic == settings.topics.incidents and out.value is not None:
            table.add_incident(json.loads(out.value))


class _Task(threading.Thread):
    """A daemon thread that keeps the exception its function raised, for the main thread."""

    def __init__(self, name: str, fn: Callable[[], object]) -> None:
        super().__init__(name=f"demo-{name}", daemon=True)
        self.fn = fn
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.fn()
        except Exception as exc:  # handed to the main thread by `check`
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _run_live(
    kafka: LocalKafka,
    settings: Settings,
    runner: ModelRunner,
    records: list[Record],
    table: EventTable,
    speed: float | None,
) -> None:
    from pipeline.kafka.admin import TopicNames, ensure_topics
    from pipeline.kafka.produce import simulate_to_kafka
    from pipeline.kafka.worker import KafkaWorker
    from pipeline.stream.assembly import build_engine

    live = _live_settings(settings, kafka, speed)
    names = TopicNames.from_settings(live.topics)
    admin = kafka.admin_security()
    ensure_topics(kafka.bootstrap_servers, names, live.topics.partitions, 1, client_config=admin)
    secured = ""
    if kafka.security is not None:
        kafka.allow(DEMO_USER, _demo_grants(live))
        secured = f" (TLS, SCRAM-SHA-512 user {DEMO_USER}, ACLs for its topics and group only)"
    pace = "as fast as possible" if speed is None else f"at {speed:g}x real time"
    print(f"demo: local Kafka at {kafka.bootstrap_servers}{secured}; producing {pace}", flush=True)
    stop = threading.Event()
    worker = KafkaWorker(live, build_engine(live, runner))
    tasks = [
        _Task("worker", lambda: worker.run(stop)),
        _Task(
            "producer", lambda: simulate_to_kafka(records, live, speed, stop, lambda _n, _b: None)
        ),
    ]
    for task in tasks:
        task.start()
    try:
        _follow_events(live, table, tasks)
    finally:
        stop.set()
        for task in tasks:
            task.join(timeout=60)
    for task in tasks:
        task.check()


def _live_settings(settings: Settings, kafka: LocalKafka, speed: float | None) -> Settings:
    """The local broker (as the demo's user when secured: whatever [kafka] says about
    another cluster's security does not apply), no metrics port, and an idle timeout that
    suits the pace."""
    idle = max(2000, round(2000 / speed)) if speed else 2000
    user = DEMO_USER if kafka.security is not None else None
    return dataclasses.replace(
        settings,
        kafka=dataclasses.replace(settings.kafka, **kafka.client_settings(user)),
        windows=dataclasses.replace(settings.windows, idle_timeout_ms=idle),
        runtime=dataclasses.replace(settings.runtime, metrics_port=0),
    )


def _demo_grants(live: Settings) -> list[tuple[str, str, str]]:
    """The demo's user: the worker's ACLs, Write on the inputs and labels (the simulated
    devices), Read on the events and incidents (the lines shown)."""
    from pipeline.kafka.access import worker_grants
    from pipeline.kafka.config import transactional_id

    t = live.topics
    tid = transactional_id(live.kafka) if live.kafka.exactly_once else None
    grants = worker_grants(live, tid)
    grants += [("topic", name, "write") for name in (t.camera, t.audio, t.telemetry, t.labels)]
    return [*grants, ("topic", t.events, "read"), ("topic", t.incidents, "read")]


def _follow_events(
    settings: Settings,
    table: EventTable,
    tasks: list[_Task],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Show events (and incidents) until each expected window has one, or QUIET_S without a
    new one; then the incidents that follow the last events."""
    from pipeline.kafka.follow import TopicFollower

    deadline = clock() + QUIET_S
    with (
        TopicFollower(settings.kafka, settings.topics.events) as events,
        TopicFollower(settings.kafka, settings.topics.incidents) as incidents,
    ):
        while not table.complete and clock() < deadline:
            if any([table.add(json.loads(value)) for value in events.poll(timeout_ms=200)]):
                deadline = clock() + QUIET_S
            for value in incidents.poll(timeout_ms=0):
                table.add_incident(json.loads(value))
            for task in tasks:
                task.check()
            if tasks[-1].is_alive():  # still producing: silence is not the end yet
                deadline = max(deadline, clock() + QUIET_S)
        quiet = clock() + INCIDENTS_QUIET_S  # the last windows' incidents are right behind
        while clock() < quiet:
            for value in incidents.poll(timeout_ms=200):
                table.add_incident(json.loads(value))
                quiet = clock() + INCIDENTS_QUIET_S
    if not table.complete:
        print(
            f"demo: no new event for {QUIET_S:.0f} s; stopping with "
            f"{len(table.results)} of {len(table.expected)} windows"
        )


def _report(out: Path, table: EventTable, classes: Sequence[str]) -> None:
    from pipeline.commands.demo_report import draw_timeline, summary_lines

    results = sorted(table.results.values(), key=lambda r: (r.device, r.start_ms))
    for line in [*summary_lines(results, len(table.expected)), table.incidents.summary()]:
        print(f"demo: {line}")
    path = out / "timeline.png"
    try:
        out.mkdir(parents=True, exist_ok=True)
        draw_timeline(path, table.truth, results, classes, incidents=table.incidents.spans)
    except OSError as exc:
        raise UserError(f"cannot write the timeline into {out}: {exc}") from exc
    print(f"demo: timeline written to {path}")
