"""Liveness without a broker (issue 15, parts 1 and 5): the rule that makes a worker out of
its group, or fetching nothing while its partitions have records, rejoin and then stop;
the metrics endpoint's health and group gauges; a metrics port already taken."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.structs import ConsumerGroupMetadata, MemberState

from pipeline.cli import main
from pipeline.commands.run import work
from pipeline.errors import UserError
from pipeline.kafka.liveness import GroupStalledError, GroupWatch, Liveness
from pipeline.metrics import Metrics
from pipeline.testing import FakeClock

STALL = 60_000


def test_out_of_the_group_past_the_timeout_rejoins_then_stops() -> None:
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    rule.polled("stable", fetched=True)
    rule.polled("rebalancing", fetched=False)  # a rebalance starts
    clock.now += STALL - 1
    rule.checked(answered=True, behind=False)
    assert rule.verdict().action == "ok"  # a rebalance may take this long
    clock.now += 1
    first = rule.verdict()
    assert first.action == "rejoin" and "out of its consumer group (rebalancing) 60 s" in (
        first.problem
    )
    clock.now += STALL - 1
    assert rule.verdict().action == "ok"  # the rejoin's own time
    clock.now += 1
    assert rule.verdict().action == "fail"


def test_an_episode_that_recovers_starts_over() -> None:
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    rule.polled("rebalancing", fetched=False)
    clock.now += STALL
    assert rule.verdict().action == "rejoin"
    rule.polled("stable", fetched=True)  # the rejoin worked
    assert rule.verdict().action == "ok"
    rule.polled("rebalancing", fetched=False)  # much later, again: a rejoin first, not a stop
    clock.now += STALL
    assert rule.verdict().action == "rejoin"


def test_fetching_nothing_while_partitions_have_records_rejoins_then_stops() -> None:
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    rule.polled("stable", fetched=True)
    rule.checked(answered=True, behind=True)  # fetched since the last check: not starving
    for _ in range(STALL // 1000):
        clock.now += 1000
        rule.polled("stable", fetched=False)
        rule.checked(answered=True, behind=True)
    assert rule.verdict().action == "ok"  # 59 s since the first check that saw it starve
    clock.now += 1000
    rule.checked(answered=True, behind=True)
    verdict = rule.verdict()
    assert verdict.action == "rejoin" and verdict.problem.startswith("fetched nothing for 60 s")
    clock.now += STALL
    rule.checked(answered=True, behind=True)
    assert rule.verdict().action == "fail"


def test_a_busy_worker_behind_the_log_end_and_an_idle_one_are_alive() -> None:
    clock = FakeClock()
    busy, idle = Liveness(STALL, clock), Liveness(STALL, clock)
    for _ in range(3 * STALL // 1000):
        clock.now += 1000
        busy.polled("stable", fetched=True)  # always behind (a backlog), always fetching
        busy.checked(answered=True, behind=True)
        idle.polled("stable", fetched=False)  # nothing to read
        idle.checked(answered=True, behind=False)
        assert busy.verdict().action == idle.verdict().action == "ok"
    assert busy.health()[0] and idle.health()[0]
    assert idle.seconds_since_fetch() == 3 * STALL / 1000 + 0.0  # and still healthy


def test_a_broker_that_does_not_answer_is_waited_out_but_unhealthy() -> None:
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    rule.polled("stable", fetched=True)
    rule.polled("rebalancing", fetched=False)
    for _ in range(5 * STALL // 1000):  # five minutes without an answer
        clock.now += 1000
        rule.polled("rebalancing", fetched=False)
        rule.checked(answered=False, behind=False)
        assert rule.verdict().action == "ok"  # a restart brings no broker back
    ok, why = rule.health()
    assert not ok and why.startswith("the broker has not answered for 299 s")
    rule.checked(answered=True, behind=False)  # back: the clock runs from now
    clock.now += STALL - 1
    assert rule.verdict().action == "ok"
    clock.now += 1
    assert rule.verdict().action == "rejoin"


def test_health_says_why_the_worker_is_not_consuming() -> None:
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    assert rule.health() == (False, "starting: the worker has not polled yet")
    rule.polled("rebalancing", fetched=False)
    assert rule.health()[0]  # joining: not yet past the timeout
    clock.now += STALL + 1000
    rule.polled("rebalancing", fetched=False)
    ok, why = rule.health()
    assert not ok and why == (
        "out of its consumer group (rebalancing) 61 s (kafka.stall_timeout_ms 60000)"
    )
    rule.polled("stable", fetched=True)
    assert rule.health() == (True, "ok: stable, last fetch 0.0 s ago")
    clock.now += STALL + 1  # the loop stopped coming round (stuck in a call)
    ok, why = rule.health()
    assert not ok and why.startswith("the worker loop has not polled for 60 s")


def test_a_stall_timeout_of_zero_judges_nothing() -> None:
    clock = FakeClock()
    rule = Liveness(0, clock)
    rule.polled("rebalancing", fetched=False)
    clock.now += 10 * STALL
    rule.checked(answered=True, behind=True)
    assert rule.verdict().action == "ok" and rule.health()[0]


# -- the worker's side: a consumer stuck out of its group -----------------------------------


class _StuckCoordinator:
    """kafka-python's coordinator as the bug left it, and deaf to rejoin requests."""

    rejoining = True

    def __init__(self) -> None:
        self.rejoin_requests = 0

    def need_rejoin(self) -> bool:
        return False

    def request_rejoin(self) -> None:
        self.rejoin_requests += 1


class _StuckConsumer:
    def __init__(self) -> None:
        self._coordinator = _StuckCoordinator()

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata("g", 2, "m", None, MemberState.REBALANCING)

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        raise AssertionError("positions are not asked while out of the group")


class _Ends:
    """LogEnd's end_offsets: the broker answers (or not)."""

    def __init__(self) -> None:
        self.answers = True

    def end_offsets(self, partitions: list[TopicPartition], call: str) -> dict[Any, int]:
        return {tp: 10 for tp in partitions} if self.answers else {}


def test_a_worker_stuck_out_of_its_group_rejoins_then_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, metrics, consumer = FakeClock(), Metrics(), _StuckConsumer()
    watch = GroupWatch(consumer, _Ends(), metrics, STALL, clock, TopicPartition("cam", 0))  # type: ignore[arg-type]
    assert watch.poll_timeout(20) == 1000  # out of the group: polls wait for the join

    def step() -> None:  # what KafkaWorker.step does, once a second
        clock.now += 1000
        watch.polled(fetched=False)
        watch.check(set(), set())

    step()
    re_armed = metrics.value("iotfuse_consumer_forced_rejoins_total", {"reason": "join_unobserved"})
    assert re_armed == 1 and "completed while no poll waited" in caplog.text
    while metrics.value("iotfuse_consumer_forced_rejoins_total", {"reason": "out_of_group"}) == 0:
        step()
        assert clock.now <= 1_000 + STALL + 1000
    assert metrics.value("iotfuse_consumer_seconds_out_of_group") == STALL / 1000
    assert "rejoining the group" in caplog.text
    with pytest.raises(GroupStalledError, match=r"still so 60 s after rejoining") as stalled:
        for _ in range(STALL // 1000):
            step()
    assert "\n" not in str(stalled.value)
    assert clock.now == 1_000 + 2 * STALL  # 60 s out, then 60 s after the rejoin


# -- the metrics endpoint -------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics()
    port = metrics.serve(0, "127.0.0.1")
    yield metrics, port
    metrics.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_answers_503_on_a_worker_that_is_not_consuming(
    served: tuple[Metrics, int],
) -> None:
    metrics, port = served
    assert _get(port, "/healthz") == (503, "starting: no worker yet\n")
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    metrics.watch(rule)
    rule.polled("stable", fetched=True)
    assert _get(port, "/healthz") == (200, "ok: stable, last fetch 0.0 s ago\n")
    rule.polled("rebalancing", fetched=False)
    clock.now += STALL + 1000  # the loop goes on polling, out of the group
    rule.polled("rebalancing", fetched=False)
    status, body = _get(port, "/healthz")
    assert status == 503 and body.startswith("out of its consumer group (rebalancing) 61 s")
    # the gauges are computed when scraped: right even with the loop blocked
    clock.now += 30_000
    _, text = _get(port, "/metrics")
    assert 'iotfuse_consumer_group_state{state="rebalancing"} 1.0' in text
    assert 'iotfuse_consumer_group_state{state="stable"} 0.0' in text
    assert "iotfuse_consumer_seconds_out_of_group 91.0" in text
    assert "iotfuse_consumer_seconds_since_fetch 91.0" in text


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something on this host listens on (as a first worker's metrics would)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_metrics_port_in_use_is_one_line_naming_the_setting(taken_port: int) -> None:
    with pytest.raises(UserError) as exc:
        Metrics().serve(taken_port, "127.0.0.1")
    message = str(exc.value)
    assert f"metrics port {taken_port} is already in use" in message and "\n" not in message
    assert "runtime.metrics_port" in message and "--metrics-port" in message
    assert "0 to turn the endpoint off" in message


def test_a_second_iotfuse_run_on_a_taken_port_exits_1_with_one_line(
    taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # before the model loads or the broker is asked: nothing here listens on that broker
    code = main(["run", "--metrics-port", str(taken_port), "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"iotfuse run: metrics port {taken_port} is already in use")


def test_a_worker_that_stops_itself_is_one_error_line_and_exit_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    why = "out of its consumer group (rebalancing) 60 s, and still so"

    class Stalled:
        def run(self, stop: threading.Event) -> None:
            raise GroupStalledError(why)

    class Stops:
        def run(self, stop: threading.Event) -> None:
            assert stop.is_set()

    stop = threading.Event()
    assert not work(Stalled(), stop)  # type: ignore[arg-type]  # _run returns 1 then
    [line] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert (
        line.getMessage() == "stopped: out of its consumer group (rebalancing) 60 s, and still so"
    )
    assert line.exc_info is None  # no traceback
    stop.set()
    assert work(Stops(), stop)  # type: ignore[arg-type]


def test_a_worker_that_cannot_reach_the_broker_waits_and_reports_unhealthy() -> None:
    clock, metrics, ends = FakeClock(), Metrics(), _Ends()
    ends.answers = False
    consumer = _StuckConsumer()
    consumer._coordinator.rejoining = False
    watch = GroupWatch(consumer, ends, metrics, STALL, clock, TopicPartition("cam", 0))  # type: ignore[arg-type]
    for _ in range(3 * STALL // 1000):  # three minutes, no error raised
        clock.now += 1000
        watch.polled(fetched=False)
        watch.check(set(), set())
    assert metrics.value("iotfuse_consumer_forced_rejoins_total", {"reason": "out_of_group"}) == 0
    assert watch.rule.health() == (
        False,
        "the broker has not answered for 179 s (kafka.stall_timeout_ms 60000)",
    )


def _image_healthchecks() -> list[list[str]]:
    """The exec-form command of every HEALTHCHECK in docker/Dockerfile (each image's)."""
    text = (Path(__file__).resolve().parents[1] / "docker" / "Dockerfile").read_text()
    found = re.findall(r"^HEALTHCHECK .*\\\n\s*CMD (\[.*\])$", text, re.MULTILINE)
    assert found, "no exec-form HEALTHCHECK in docker/Dockerfile"
    commands = [[str(c) for c in json.loads(f)] for f in found]
    return [[sys.executable if c[0] == "python" else c[0], *c[1:]] for c in commands]


def test_the_image_health_check_fails_on_a_worker_that_is_not_consuming(
    served: tuple[Metrics, int],
) -> None:
    metrics, port = served
    env = {**os.environ, "IOTFUSE_RUNTIME__METRICS_PORT": str(port)}
    clock = FakeClock()
    rule = Liveness(STALL, clock)
    metrics.watch(rule)
    for command in _image_healthchecks():
        rule.polled("stable", fetched=True)
        assert subprocess.run(command, env=env, timeout=30).returncode == 0
        rule.polled("rebalancing", fetched=False)
        clock.now += STALL + 1
        checked = subprocess.run(command, env=env, timeout=30, capture_output=True)
        assert checked.returncode != 0 and b"503" in checked.stderr
