"""Shared fixtures: one real local Kafka broker for the session, fresh topics per test; the
models (a small random one per module, the shipped one); one torch thread for tiny models.

A test marked `kafka` that fails gets the log tail of every LocalKafka it used appended to
its report (the session broker, and clusters registered with `show_broker_logs`).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
import torch

from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.local.broker import LocalKafka
from pipeline.stream.model_runner import ModelRunner
from tests.factory import make_model
from tests.mqtt_util import Mosquitto

_EXTRA_BROKERS = pytest.StashKey[list[LocalKafka]]()


def _jvm_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process; on Linux also that it is a Kafka JVM."""
    stat, cmdline = Path(f"/proc/{pid}/stat"), Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self/stat").exists():  # not Linux
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"kafka.Kafka" in cmdline.read_bytes()
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def jvm_alive() -> Callable[[int], bool]:
    return _jvm_alive


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_jvms() -> Iterator[list[int]]:
    """Collects the pids of broker JVMs started by fixtures; none may outlive the session."""
    pids: list[int] = []
    yield pids
    alive = [pid for pid in pids if _jvm_alive(pid)]
    assert not alive, f"local Kafka JVMs still running after the session: pids {alive}"


@pytest.fixture(scope="session")
def kafka(_no_leftover_jvms: list[int]) -> Iterator[LocalKafka]:
    """A started single-node LocalKafka shared by the whole session."""
    broker = LocalKafka(nodes=1)
    try:
        with broker:
            yield broker
    finally:
        _no_leftover_jvms.extend(broker.started_pids)


@pytest.fixture(scope="session")
def shipped() -> ModelRunner:
    """The shipped default model (fusion/default_model), on the CPU."""
    return ModelRunner.load(None, "cpu")


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    """A small random model (tests/factory.py `make_model`, every modality), one per module."""
    return ModelRunner.load(make_model(tmp_path_factory.mktemp("model")), "cpu")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and OpenMP threads on a busy 2-core machine
    wait for each other (milliseconds become tens of ms). Restored after each test. A module
    of tiny-model tests uses it for all its tests:
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def bootstrap(kafka: LocalKafka) -> str:
    return kafka.bootstrap_servers


@pytest.fixture
def topics(request: pytest.FixtureRequest, bootstrap: str) -> TopicNames:
    """This test's own set of contract topics, created with 3 partitions."""
    stem = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:60]
    names = TopicNames.prefixed(f"{stem}-{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, names, partitions=3, replication_factor=1)
    return names


@pytest.fixture
def show_broker_logs(request: pytest.FixtureRequest) -> Callable[[LocalKafka], LocalKafka]:
    """Register a test's own LocalKafka so a failure report shows its log tail."""

    def register(broker: LocalKafka) -> LocalKafka:
        request.node.stash.setdefault(_EXTRA_BROKERS, []).append(broker)
        return broker

    return register


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and item.get_closest_marker("kafka") is not None:
        funcargs = getattr(item, "funcargs", {})
        brokers = [v for v in funcargs.values() if isinstance(v, LocalKafka)]
        extra: list[LocalKafka] = item.stash.get(_EXTRA_BROKERS, [])
        brokers += extra
        for broker in dict.fromkeys(brokers):  # unique, in order
            title = f"local Kafka log tail ({broker.nodes} node(s))"
            report.sections.append((title, broker.log_tail(lines=50)))
    return report


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """A real MQTT broker (Mosquitto, tests/mqtt_util.py) shared by the session."""
    with Mosquitto() as broker:
        yield broker
