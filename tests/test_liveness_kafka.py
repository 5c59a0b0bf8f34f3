"""A worker that silently stopped consuming (issue 15, part 1), through the real broker.

kafka-python 3.0.12 lets a rebalance that only a metadata change asked for (partitions
added; at start, a first assignment made from metadata the coordinator had not seen yet)
finish on its I/O thread after `poll()` stopped waiting for it: the member then stayed
REBALANCING for good, heartbeats off, every commit failing with [Error 27], until the
broker evicted it. The worker re-arms such a join (pipeline/kafka/liveness.py).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace

import pytest
from kafka.admin import KafkaAdminClient, NewPartitions
from kafka.structs import MemberState

from pipeline.clock import Clock, wall_clock_ms
from pipeline.kafka import liveness
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.fetch import FETCHERS
from pipeline.kafka.worker import KafkaWorker
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import FakeClock
from tests.factory import T0, device_stream
from tests.kafka_util import produce, settings_for, to_topics, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _broker_group_state(admin: KafkaAdminClient, group: str) -> str:
    return str(admin.describe_groups([group])[group]["group_state"])


def _step_until(worker: KafkaWorker, done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        worker.step()


def _stable(worker: KafkaWorker) -> bool:
    return bool(worker.consumer.group_metadata().state == MemberState.STABLE)


def _worker(s: Settings, runner: ModelRunner, clock: Clock = wall_clock_ms) -> KafkaWorker:
    """A worker of a small session timeout (an evicted member shows soon), in its group."""
    s = replace(s, kafka=replace(s.kafka, session_timeout_ms=6000))
    worker = KafkaWorker(s, build_engine(s, runner), clock)
    _step_until(
        worker,
        lambda: _stable(worker) and len(worker.consumer.assignment()) == 9,
        30,
        "the first assignment",
    )
    return worker


def _lose_a_rebalance(worker: KafkaWorker, admin: KafkaAdminClient, topics: TopicNames) -> None:
    """What left workers consuming nothing: a rebalance asked for by metadata alone (one
    more partition on every input topic, seen at once: consumer.topics() fetches fresh
    metadata) whose JoinGroup/SyncGroup answers come after the poll gave up (timeout 0);
    the join completes on the client's I/O thread (the broker's group is stable again)."""
    admin.create_partitions({t: NewPartitions(4) for t in topics.inputs})
    wait_until(
        lambda: (
            worker.consumer.topics() is not None
            and all(len(worker.consumer.partitions_for_topic(t)) == 4 for t in topics.inputs)
        ),
        10,
        "the consumer to see the new partitions",
    )
    worker.step(poll_timeout_ms=0)
    wait_until(
        lambda: _broker_group_state(admin, worker.settings.kafka.group_id) == "Stable",
        15,
        "the broker to complete the rebalance",
    )


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_a_rejoin_that_finished_unobserved_is_rejoined_and_consumption_resumes(
    bootstrap: str, topics: TopicNames, runner: ModelRunner, fetcher: str
) -> None:
    s = settings_for(bootstrap, topics, fetcher=fetcher)
    # the liveness rule stays out of it: this is the worker's own guard at every poll
    s = replace(s, kafka=replace(s.kafka, stall_timeout_ms=600_000))
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    worker = _worker(s, runner)
    try:
        _lose_a_rebalance(worker, admin, topics)
        produce(bootstrap, to_topics(device_stream("cam-1", T0, 2), topics))
        # before the guard: REBALANCING for good, nothing consumed, commits [Error 27]
        _step_until(
            worker,
            lambda: (
                _stable(worker)
                and worker.metrics.value("iotfuse_records_in_total", {"modality": "camera"}) > 0
            ),
            20,
            "the worker to rejoin and consume",
        )
        assert len(worker.consumer.assignment()) == 12
        rearmed = worker.metrics.value(
            "iotfuse_consumer_forced_rejoins_total", {"reason": "join_unobserved"}
        )
        assert rearmed >= 1
        # and commits go through again: the device's windows close (idle timeout), their
        # event is acknowledged, and its input offsets are committed
        _step_until(
            worker,
            lambda: any(
                (worker.consumer.committed(tp) or 0) > 0 for tp in worker.consumer.assignment()
            ),
            20,
            "an offset commit",
        )
        assert _broker_group_state(admin, worker.settings.kafka.group_id) == "Stable"
    finally:
        admin.close()
        worker.close()


def test_a_worker_left_out_of_its_group_rejoins_then_stops_unhealthy(
    bootstrap: str, topics: TopicNames, runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever keeps a worker out of its group: here the same lost rebalance with the
    guard and the rule's rejoin both disabled, so that nothing brings it back."""
    monkeypatch.setattr(liveness, "rearm_unobserved_join", lambda consumer: False)
    rejoins: list[object] = []
    monkeypatch.setattr(liveness, "request_rejoin", rejoins.append)
    stall_ms = 20_000
    s = settings_for(bootstrap, topics)
    s = replace(s, kafka=replace(s.kafka, stall_timeout_ms=stall_ms))
    clock = FakeClock(wall_clock_ms())  # the worker's clock: liveness and commit intervals
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    worker = _worker(s, runner, clock)
    port = worker.metrics.serve(0, "127.0.0.1")
    try:
        _lose_a_rebalance(worker, admin, topics)
        assert _healthz(port)[0] == 200
        lost_at, answers = clock.now, []
        with pytest.raises(liveness.GroupStalledError) as stalled:
            while clock.now - lost_at <= 3 * stall_ms:
                clock.now += 5000
                worker.step()
                answers.append(_healthz(port))
        assert "out of its consumer group (rebalancing)" in str(stalled.value)
        assert rejoins == [worker.consumer]  # the rule asked once, stall_ms in
        assert 2 * stall_ms <= clock.now - lost_at <= 2 * stall_ms + 10_000
        status, why = answers[-1]
        assert status == 503 and why.startswith("out of its consumer group (rebalancing)")
    finally:
        admin.close()
        worker.metrics.close()
        worker.close()
