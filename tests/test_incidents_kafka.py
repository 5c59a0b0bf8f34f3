"""Incidents across kill -9, against the real broker: `iotfuse run` processes are killed in
the middle of open incidents and started again. Whatever was re-read, the incidents topic
holds exactly the incidents the events make (the pure tracker over the events is the
reference): each opened once, each closed, and with --exactly-once no record twice."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from encoders.modality import Modality
from pipeline.incidents.records import window_obs
from pipeline.incidents.rules import IncidentRules
from pipeline.incidents.tracker import IncidentTracker
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.incident_state import build_live_engine
from pipeline.kafka.worker import KafkaWorker
from pipeline.settings import load_settings
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import WorkerThread
from tests.contract import Published
from tests.factory import T0, device_stream, make_model, number
from tests.kafka_util import produce, read_until, settings_for, to_topics, wait_until
from tests.mqtt_util import Mosquitto, retained

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# every window is a fire hit and none falls below close: an incident per device opens at
# its second window and stays open until its device sends nothing for m=2 windows
# (no_data) or for IDLE_MS of wall-clock time (idle)
IDLE_MS = 6000
RULES = {
    "per_class": "fire: open=0 close=0 k=2 n=3 m=2",
    "ignore_classes": "normal,intrusion",
    "update_every": "2",
    "idle_close_ms": str(IDLE_MS),
}
DEVICES = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), (Modality.TELEMETRY,))


class Runs:
    """`iotfuse run` processes on this test's topics, each logging to its own file."""

    def __init__(self, bootstrap: str, topics: TopicNames, model: Path, logs: Path) -> None:
        self.bootstrap, self.topics, self.model, self.logs = bootstrap, topics, model, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        t = self.topics
        sets = [
            f"topics.{f}={getattr(t, f)}"
            for f in ("camera", "audio", "telemetry", "events", "deadletter")
            + ("incidents", "incident_state")
        ]
        sets += [f"incidents.{k}={v}" for k, v in RULES.items()]
        sets += ["windows.idle_timeout_ms=1500", "runtime.commit_interval_ms=200"]
        sets += ["kafka.session_timeout_ms=6000"]  # a killed worker leaves the group soon
        sets += [f"kafka.group_id=g-{t.camera}"]
        cmd = [sys.executable, "-m", "pipeline.cli", "run", "--bootstrap-servers", self.bootstrap]
        cmd += ["--model", str(self.model), "--metrics-port", "0", "--device", "cpu"]
        cmd += [a for s in sets for a in ("--set", s)] + list(extra)
        log = open(self.logs / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        return self.procs[-1]

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() not in (None, -signal.SIGKILL, 0):
                tail = (self.logs / f"worker-{i}.log").read_text()[-3000:]
                raise AssertionError(f"worker {i} exited with {p.returncode}:\n{tail}")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def runs(bootstrap: str, topics: TopicNames, model_dir: Path, tmp_path: Path) -> Iterator[Runs]:
    r = Runs(bootstrap, topics, model_dir, tmp_path)
    yield r
    r.stop_all()


def batch(start_s: int, seconds: int, skip: dict[int, int] | None = None) -> list:
    """DEVICES devices' telemetry from T0 + start_s; `skip` {device: seconds}: that device
    starts this many seconds later (a gap in its windows)."""
    recs = []
    for d in range(DEVICES):
        late = (skip or {}).get(d, 0)
        start = T0 + (start_s + late) * 1000
        recs += device_stream(f"dev-{d}", start, seconds - late, (Modality.TELEMETRY,))
    return number(sorted(recs, key=lambda r: r.timestamp_ms))


def committed(bootstrap: str, group: str, topic: str) -> int:
    """The sum of `group`'s committed offsets on `topic` (asked without joining the group;
    a transaction's offsets count once it committed)."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = reader.partitions_for_topic(topic) or set()
        return sum(reader.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        reader.close()


def values(got: list[Published], topic: str) -> list[dict]:
    return [json.loads(p.value or b"") for p in got if p.topic == topic]


def reference(events: list[dict]) -> list[tuple[str, int, str, str | None]]:
    """The incident records the events make, by the pure tracker: (id, seq, change, reason),
    each device's incidents still open closed as idle (the test waits for those)."""
    settings = load_settings(None, environ={}, cli={"incidents": RULES}).incidents
    rules = IncidentRules.from_settings(settings, 2000)
    tracker = IncidentTracker(rules)
    once = {(e["device_id"], e["window"]["start_ms"]): e for e in events}
    out = []
    for _, e in sorted(once.items()):
        device, obs = window_obs(e, rules)
        out += tracker.observe(device, obs, 0)
    out += tracker.idle(2**62)
    return [(c.incident.incident_id, c.incident.seq, c.kind, c.reason) for c in out]


def kill_mid_incident_and_restart(
    bootstrap: str, topics: TopicNames, runs: Runs, isolation: str, *extra: str
) -> tuple[list[dict], list[dict]]:
    """Devices with incidents open; SIGKILL; more windows (one device with a gap that closes
    its incident); a new worker; until every incident closed as idle. (events, incidents)"""
    produce(bootstrap, to_topics(batch(0, 8), topics))
    victim = runs.start(*extra)
    read_until(
        bootstrap,
        [topics.incidents],
        lambda got: len({i["device_id"] for i in values(got, topics.incidents)}) == DEVICES,
        timeout_s=120,
        poll=runs.check_alive,
    )
    # once it committed past the windows that opened them: the restart re-reads only what
    # follows, and must go on from the saved state (without it, it opens them again)
    group, opened_by = f"g-{topics.camera}", DEVICES * 2 * 20  # two windows of 10 Hz
    wait_until(lambda: committed(bootstrap, group, topics.telemetry) >= opened_by, 60, "a commit")
    os.kill(victim.pid, signal.SIGKILL)  # incidents open, their state saved
    victim.wait(timeout=30)
    # dev-3 sends nothing for windows 4 and 5 (m=2): its incident closes, a new one opens
    produce(bootstrap, to_topics(batch(8, 8, skip={3: 4}), topics))
    runs.start(*extra)

    def every_incident_closed(got: list[Published]) -> bool:
        events = values(got, topics.events)
        done = {(e["device_id"], e["window"]["start_ms"]) for e in events}
        if len(done) < DEVICES * 8 - 2:  # dev-3 has no windows 4 and 5
            return False
        closed = [i for i in values(got, topics.incidents) if i["close_reason"] == "idle"]
        return len({i["incident_id"] for i in closed}) >= DEVICES  # each device's last one

    got = read_until(
        bootstrap,
        [topics.events, topics.incidents],
        every_incident_closed,
        timeout_s=180,
        isolation_level=isolation,
        poll=runs.check_alive,
    )
    return values(got, topics.events), values(got, topics.incidents)


def check_same_incidents(events: list[dict], incidents: list[dict]) -> None:
    expected = reference(events)
    got = [(i["incident_id"], i["seq"], i["change"], i["close_reason"]) for i in incidents]
    assert set(got) == set(expected), "the incidents topic differs from what the events make"
    opened = [i for i, _, change, _ in expected if change == "open"]
    closed = [i for i, _, change, _ in expected if change == "close"]
    assert sorted(opened) == sorted(set(opened)) == sorted(closed)  # each opened once, closed
    assert len(opened) == DEVICES + 1  # dev-3's second incident after its gap
    reasons = sorted(r for *_, change, r in expected if change == "close")
    assert reasons == ["idle"] * DEVICES + ["no_data"]


def test_kill_9_mid_incident_neither_opens_twice_nor_misses_a_close(
    bootstrap: str, topics: TopicNames, runs: Runs
) -> None:
    events, incidents = kill_mid_incident_and_restart(bootstrap, topics, runs, "read_uncommitted")
    check_same_incidents(events, incidents)
    # at-least-once: a record may come twice after the crash, but only as itself
    by_key: dict[tuple[str, int], set[str]] = {}
    for i in incidents:
        by_key.setdefault((i["incident_id"], i["seq"]), set()).add(i["change"])
    assert all(len(changes) == 1 for changes in by_key.values())


def test_exactly_once_kill_9_leaves_no_duplicate_incident(
    bootstrap: str, topics: TopicNames, runs: Runs
) -> None:
    extra = ("--exactly-once", "--transactional-id", f"tx-{topics.camera}")
    events, incidents = kill_mid_incident_and_restart(
        bootstrap, topics, runs, "read_committed", *extra
    )
    check_same_incidents(events, incidents)
    keys = [(i["incident_id"], i["seq"]) for i in incidents]
    assert len(keys) == len(set(keys)), "a read_committed reader saw an incident record twice"


def test_a_running_worker_sends_its_incidents_to_mqtt_and_a_webhook(
    bootstrap: str, topics: TopicNames, model_dir: Path, mosquitto: Mosquitto
) -> None:
    """`iotfuse run`'s engine with both sinks on: every device's incident reaches the MQTT
    broker (retained, per device and class) and the webhook (signed), although the webhook
    fails at first."""
    posted: list[tuple[str, bytes]] = []
    failures = [2]

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = failures[0] == 0
            failures[0] = max(0, failures[0] - 1)
            if ok:
                posted.append((self.headers["X-Iotfuse-Signature"], body))
            self.send_response(200 if ok else 500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = settings_for(bootstrap, topics)
    prefix = f"it/{topics.camera}"
    s = load_settings(
        None,
        environ={},
        cli={
            "incidents": RULES,
            "sinks": {
                "mqtt_host": "127.0.0.1",
                "mqtt_port": mosquitto.port,
                "mqtt_topic_prefix": prefix,
                "webhook_url": f"http://127.0.0.1:{server.server_port}/hook",
                "webhook_secret": "s3cret",
                "retry_initial_ms": 50,
            },
        },
    )
    s = replace(base, incidents=s.incidents, sinks=s.sinks)
    runner = ModelRunner.load(model_dir, "cpu")
    worker = WorkerThread(KafkaWorker(s, build_live_engine(s, runner)))
    try:
        produce(bootstrap, to_topics(batch(0, 6), topics))
        wait_until(lambda: len(posted) >= DEVICES, 120, "the webhook to get every open")
        mqtt_sent = {"sink": "mqtt"}
        metrics = worker.worker.metrics
        sent = lambda: metrics.value("iotfuse_sink_sent_total", mqtt_sent)  # noqa: E731
        wait_until(lambda: sent() >= DEVICES, 60, "the MQTT broker to acknowledge")
        got = retained(mosquitto.port, f"{prefix}/#", DEVICES)  # a dashboard coming late
        assert set(got) == {f"{prefix}/dev-{d}/fire" for d in range(DEVICES)}
    finally:
        worker.close()
        server.shutdown()
        server.server_close()
    opens = [json.loads(body) for _, body in posted if json.loads(body)["change"] == "open"]
    assert sorted(o["device_id"] for o in opens) == [f"dev-{d}" for d in range(DEVICES)]
    for signature, body in posted:
        assert signature == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
