"""Delivery guarantees with real `iotfuse run` processes: SIGKILL, exactly-once, two workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from encoders.modality import Modality
from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.fetch import FETCHERS
from pipeline.kafka.local.broker import LocalKafka
from tests.contract import Published, expected_windows
from tests.factory import T0, device_stream, make_model, number
from tests.kafka_util import produce, read_until, settings_for, to_topics, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), (Modality.TELEMETRY, Modality.AUDIO))


class Workers:
    def __init__(self, bootstrap: str, topics: TopicNames, model: Path, log_dir: Path) -> None:
        self.bootstrap, self.topics, self.model, self.log_dir = bootstrap, topics, model, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        t = self.topics
        sets = [
            f"topics.{f}={getattr(t, f)}"
            for f in ("camera", "audio", "telemetry", "events", "deadletter")
        ]
        sets += [
            "windows.idle_timeout_ms=1500",
            "runtime.commit_interval_ms=200",
            f"kafka.group_id=g-{t.camera}",
        ]
        cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--bootstrap-servers",
            self.bootstrap,
            "--model",
            str(self.model),
            "--metrics-port",
            "0",
            "--device",
            "cpu",
            *[a for s in sets for a in ("--set", s)],
            *extra,
        ]
        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() not in (None, -signal.SIGKILL, 0):
                log = (self.log_dir / f"worker-{i}.log").read_text()[-3000:]
                raise AssertionError(f"worker {i} exited with {p.returncode}:\n{log}")

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
def workers(
    bootstrap: str, topics: TopicNames, model_dir: Path, tmp_path: Path
) -> Iterator[Workers]:
    w = Workers(bootstrap, topics, model_dir, tmp_path)
    yield w
    w.stop_all()


def fleet(seconds: int, devices: int = 6, start: int = T0) -> list:
    recs = []
    for d in range(devices):
        recs += device_stream(
            f"dev-{d}", start + 37 * d, seconds, (Modality.TELEMETRY, Modality.AUDIO)
        )
    recs.sort(key=lambda r: r.timestamp_ms)
    return number(recs)


def windows_of(events: list[Published]) -> Counter[tuple[str, int]]:
    return Counter(
        (json.loads(e.value)["device_id"], json.loads(e.value)["window"]["start_ms"])
        for e in events
    )


def assert_whole_windows(events: list[Published], sent: list, topics: TopicNames) -> None:
    """Every event, duplicate or not, was computed from all records of its window."""
    settings = settings_for("x", topics)
    counts = expected_windows(sent, [], settings.topics)
    for e in events:
        v = json.loads(e.value)
        for m in ("telemetry", "audio"):
            key = (v["device_id"], v["window"]["start_ms"], Modality(m))
            assert v["modalities"][m]["records"] == counts[key], f"split window {key}"


def run_kill_restart(
    bootstrap: str, topics: TopicNames, workers: Workers, *extra: str
) -> tuple[list, list[Published]]:
    first, second = fleet(8), fleet(6, start=T0 + 10000)  # no window spans both
    sent = produce(bootstrap, to_topics(first, topics))
    victim = workers.start(*extra)
    read_until(
        bootstrap,
        [topics.events],
        lambda got: len(got) >= 6,
        timeout_s=90,
        poll=workers.check_alive,
    )
    os.kill(victim.pid, signal.SIGKILL)  # mid-stream: windows open, offsets uncommitted
    victim.wait(timeout=30)
    sent += produce(bootstrap, to_topics(second, topics))
    workers.start(*extra)
    expected = {(d, s) for d, s, _ in expected_windows(sent, [], settings_for("x", topics).topics)}
    isolation = "read_committed" if "--exactly-once" in extra else "read_uncommitted"
    events = read_until(
        bootstrap,
        [topics.events],
        lambda got: expected <= set(windows_of(got)),
        timeout_s=120,
        isolation_level=isolation,
        poll=workers.check_alive,
    )
    return sent, events


# with the model thread, commits go on while a batch is with the model (Engine.progress);
# librdkafka fetching (kafka.fetcher) with the model thread, as the exported model runs
THREAD = pytest.mark.parametrize(
    ("thread", "fetcher"), [("off", "kafka-python"), ("on", "kafka-python"), ("on", "librdkafka")]
)


@THREAD
def test_sigkill_and_restart_loses_no_window(
    bootstrap, topics, workers, thread: str, fetcher: str
) -> None:
    sent, events = run_kill_restart(
        bootstrap,
        topics,
        workers,
        *("--set", f"runtime.model_thread={thread}", "--set", f"kafka.fetcher={fetcher}"),
    )
    assert_whole_windows(events, sent, topics)


@THREAD
def test_exactly_once_survives_sigkill_without_duplicates(
    bootstrap, topics, workers, thread: str, fetcher: str
) -> None:
    sent, events = run_kill_restart(
        bootstrap,
        topics,
        workers,
        "--exactly-once",
        "--transactional-id",
        f"tx-{topics.camera}",
        *("--set", f"runtime.model_thread={thread}", "--set", f"kafka.fetcher={fetcher}"),
    )
    workers.stop_all()  # SIGTERM: commits the last transaction
    events = read_until(
        bootstrap, [topics.events], lambda got: True, timeout_s=5, isolation_level="read_committed"
    )
    assert_whole_windows(events, sent, topics)
    dupes = [k for k, n in windows_of(events).items() if n > 1]
    assert dupes == [], f"read_committed consumer saw duplicates: {dupes[:5]}"


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_two_workers_share_partitions_and_hand_over(bootstrap, topics, workers, fetcher) -> None:
    # The whole backlog is in the log before the workers start: records produced while a
    # caught-up worker consumes may land seconds apart across topics (big audio batches
    # trail small telemetry ones) and then are late by the contract, which is not what
    # this test is about. Here the handover happens in the middle of the backlog.
    sent = produce(bootstrap, to_topics(fleet(30, devices=9), topics))
    expected = {(d, s) for d, s, _ in expected_windows(sent, [], settings_for("x", topics).topics)}
    a = workers.start("--set", f"kafka.fetcher={fetcher}")
    b = workers.start("--set", f"kafka.fetcher={fetcher}")
    early = read_until(
        bootstrap,
        [topics.events],
        lambda got: len(got) >= 9,
        timeout_s=120,
        poll=workers.check_alive,
    )
    a.send_signal(signal.SIGTERM)  # graceful: publishes closed windows, commits, leaves
    assert a.wait(timeout=60) == 0
    assert len(set(windows_of(early))) < len(expected), "handover happened after the backlog"
    events = read_until(
        bootstrap,
        [topics.events],
        lambda got: expected <= set(windows_of(got)),
        timeout_s=120,
        poll=workers.check_alive,
    )
    assert_whole_windows(events, sent, topics)
    dupes = [k for k, n in windows_of(events).items() if n > 1]
    assert dupes == [], f"windows emitted twice across the handover: {dupes[:5]}"
    assert b.poll() is None


def test_a_stop_while_starting_up_exits_cleanly(workers: Workers, tmp_path: Path) -> None:
    """docker stop / Ctrl-C while the worker still loads torch and the model: exit 0."""
    proc = workers.start()
    log, deadline = tmp_path / "worker-0.log", time.monotonic() + 60
    while "starting; loading the model" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.02)  # polling the log file for a condition, with a deadline
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert "stopped cleanly" in log.read_text()


def test_a_broker_outage_is_waited_out_without_losing_a_window(
    model_dir: Path, tmp_path: Path, show_broker_logs
) -> None:
    """The broker is killed mid-stream and started again on its data: the worker says the
    broker is unreachable, keeps running, and every window gets its event, computed from all
    of its records (before: the first commit during the outage raised KafkaConnectionError,
    or a log-end query KafkaTimeoutError, and the worker exited)."""
    with show_broker_logs(LocalKafka(nodes=1, log_dir=tmp_path)) as kafka:
        bootstrap = kafka.bootstrap_servers
        topics = TopicNames.prefixed(f"outage-{uuid.uuid4().hex[:8]}")
        ensure_topics(bootstrap, topics, partitions=3, replication_factor=1)
        workers = Workers(bootstrap, topics, model_dir, tmp_path)
        try:
            sent = produce(bootstrap, to_topics(fleet(8), topics))
            workers.start()
            read_until(
                bootstrap,
                [topics.events],
                lambda got: len(got) >= 6,
                timeout_s=90,
                poll=workers.check_alive,
            )
            kafka.stop_node(0, kill=True)
            log = tmp_path / "worker-0.log"

            def noticed() -> bool:
                workers.check_alive()
                return "Is the broker reachable" in log.read_text(errors="replace")

            wait_until(noticed, 60, "the worker to report the unreachable broker")
            kafka.start_node(0)
            sent += produce(bootstrap, to_topics(fleet(6, start=T0 + 10000), topics))
            expected = {
                (d, s) for d, s, _ in expected_windows(sent, [], settings_for("x", topics).topics)
            }
            events = read_until(
                bootstrap,
                [topics.events],
                lambda got: expected <= set(windows_of(got)),
                timeout_s=120,
                poll=workers.check_alive,
            )
        finally:
            workers.stop_all()
    assert_whole_windows(events, sent, topics)
