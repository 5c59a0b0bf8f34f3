"""The streaming pipeline against the real broker: the contract suite, delivery, operations."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from encoders.modality import Modality
from pipeline.errors import UserError
from pipeline.kafka.admin import TopicNames, auto_creates_topics, ensure_topics
from pipeline.kafka.fetch import FETCHERS
from pipeline.kafka.local.broker import LocalKafka
from pipeline.kafka.worker import KafkaWorker
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import WorkerThread
from tests.contract import Published, check_contract, scenario
from tests.factory import CLASSES, T0, device_stream, make_model
from tests.kafka_util import (
    produce,
    read_until,
    settings_for,
    to_topics,
    wait_until,
    worker_thread,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner.load(model_dir, "cpu")


@pytest.fixture
def start_worker(runner: ModelRunner) -> Iterator:
    started: list[WorkerThread[KafkaWorker]] = []

    def start(settings: Settings) -> WorkerThread[KafkaWorker]:
        started.append(worker_thread(settings, runner))
        return started[-1]

    yield start
    for w in started:
        w.stop.set()
    for w in started:
        w.thread.join(timeout=60)


def event_windows(published: list[Published], topic: str) -> list[tuple[str, int]]:
    return [
        (json.loads(p.value)["device_id"], json.loads(p.value)["window"]["start_ms"])
        for p in published
        if p.topic == topic
    ]


@pytest.mark.parametrize(
    ("model_thread", "fetcher"),
    [("off", "kafka-python"), ("on", "kafka-python"), ("on", "librdkafka")],
)
def test_contract_through_the_broker(
    bootstrap, topics, runner, start_worker, model_thread: str, fetcher: str
) -> None:
    records, bad = scenario()
    settings = settings_for(bootstrap, topics, fetcher=fetcher)
    settings = replace(settings, runtime=replace(settings.runtime, model_thread=model_thread))
    sent = produce(bootstrap, to_topics(records, topics))
    worker = start_worker(settings)
    n_windows = len(
        {(r.key, r.timestamp_ms // 2000) for r in sent}
        - {(r.key, r.timestamp_ms // 2000) for r, _ in bad}
    )
    got = read_until(
        bootstrap,
        [topics.events, topics.deadletter],
        lambda got: (
            len([p for p in got if p.topic == topics.events]) >= n_windows
            and len([p for p in got if p.topic == topics.deadletter]) >= len(bad)
        ),
        poll=worker.check,
    )
    worker.close()
    bad_sent = [
        (next(s for s in sent if s.key == r.key and s.value == r.value), reason)
        for r, reason in bad
    ]
    check_contract(sent, bad_sent, got, CLASSES, runner.version, settings.topics)


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_back_pressure_pauses_and_reads_on_without_losing_a_record(
    bootstrap, topics, runner, start_worker, fetcher: str
) -> None:
    """12 devices need 12-24 open windows (each stays open for the allowed lateness past
    its end), always more than the cap of 6: the worker pauses while it can close windows
    without reading, and reads on over capacity when they close only with more input.
    Every window gets an event with every record it was sent (waiting for the paused
    partitions: a few of the 48 windows, then nothing; taking them as caught up: frames late)."""
    devices = [f"dev-{i:02d}" for i in range(12)]
    records = sorted(
        (r for d in devices for r in device_stream(d, T0, 8)), key=lambda r: r.timestamp_ms
    )
    produce(bootstrap, to_topics(records, topics))
    settings = settings_for(bootstrap, topics, fetcher=fetcher)
    settings = replace(
        settings,
        windows=replace(settings.windows, max_open_windows=6),
        kafka=replace(settings.kafka, max_poll_records=20),
    )  # many steps
    worker = start_worker(settings)
    windows = len(devices) * 4
    got = read_until(bootstrap, [topics.events], lambda got: len(got) >= windows, poll=worker.check)
    worker.close()
    counts = Counter(
        (e["device_id"], e["window"]["start_ms"], m, d["records"])
        for e in map(json.loads, (p.value for p in got))
        for m, d in e["modalities"].items()
    )
    per_window = {"camera": 10, "audio": 4, "telemetry": 20}
    assert counts == Counter(
        (d, T0 + 2000 * k, m, n) for d in devices for k in range(4) for m, n in per_window.items()
    )
    metrics = worker.worker.metrics
    assert metrics.value("iotfuse_backpressure_pauses_total") > 0
    assert metrics.value("iotfuse_over_capacity_total") > 0


@pytest.mark.parametrize(("topic_mib", "value_mib"), [(1, 2), (20, 12)])
def test_a_dead_letter_too_large_to_send_goes_without_its_value(
    bootstrap, runner, start_worker, topic_mib, value_mib
) -> None:
    """A dead-letter topic made elsewhere with the broker's 1 MiB limit and a 2 MiB
    non-image; or topics that take 20 MiB and a 12 MiB one, more than the worker's producer
    sends (10.5 MiB). Sent whole, the broker (or the producer) refused it, the worker
    stopped, and after a restart it read the same record and stopped again. Now it goes
    without its value and the stream goes on."""
    names = TopicNames.prefixed(f"big-dlq-{uuid.uuid4().hex[:8]}")
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        admin.create_topics(
            [
                NewTopic(t, 3, 1, topic_configs={"max.message.bytes": str(mib << 20)})
                for t, mib in ((names.camera, 20), (names.deadletter, topic_mib))
            ]
        )
    ensure_topics(bootstrap, names, partitions=3, replication_factor=1)  # keeps those
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=21 << 20)
    producer.send(
        names.camera,
        key=b"cam-9",
        value=b"\x00" * (value_mib << 20),
        partition=0,
        timestamp_ms=T0 + 500,
    ).get(timeout=30)
    producer.close()
    stream = [replace(r, partition=0) for r in to_topics(device_stream("cam-9", T0, 4), names)]
    produce(bootstrap, stream)
    worker = start_worker(settings_for(bootstrap, names))
    got = read_until(
        bootstrap, [names.events, names.deadletter], lambda got: len(got) >= 3, poll=worker.check
    )  # 2 windows, 1 dead letter
    worker.close()
    [letter] = [p for p in got if p.topic == names.deadletter]
    assert letter.key == b"cam-9" and letter.value == b""
    too_large = value_mib > 8  # the camera limit: refused on its size before its format
    assert letter.header("iotfuse.error.reason") == (
        "image_too_large_bytes" if too_large else "unsupported_format"
    )
    assert letter.header("iotfuse.error.value_omitted") == str(value_mib << 20)
    assert len(event_windows(got, names.events)) == 2


class RawHeaderKey(str):
    """A header key kafka-python sends as these bytes: not UTF-8 (as a C producer may)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe"


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_a_record_the_client_cannot_parse_is_dead_lettered_and_skipped(
    bootstrap, topics, runner, start_worker, fetcher: str
) -> None:
    """kafka-python cannot parse a header key that is not UTF-8 and raised from poll(): the
    worker stopped, and stopped again after every restart. Now the record is found, its
    position dead-lettered, and the stream goes on. (confluent-kafka raises reading the
    headers: the same, and the records before it in the same fetch are kept.)"""
    stream = to_topics(device_stream("dev-1", T0, 4), topics)
    first = produce(bootstrap, [r for r in stream if r.timestamp_ms < T0 + 2000])
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    bad = producer.send(
        topics.telemetry,
        key=b"dev-1",
        value=b"{}",
        timestamp_ms=T0 + 2050,
        headers=[(RawHeaderKey("x"), b"v")],
        partition=first[0].partition,
    ).get(timeout=30)
    producer.close()
    produce(bootstrap, [r for r in stream if r.timestamp_ms >= T0 + 2000])  # read after it
    worker = start_worker(settings_for(bootstrap, topics, fetcher=fetcher))
    got = read_until(
        bootstrap, [topics.events, topics.deadletter], lambda got: len(got) >= 3, poll=worker.check
    )  # 2 windows, 1 dead letter
    worker.close()
    [letter] = [p for p in got if p.topic == topics.deadletter]
    assert letter.header("iotfuse.error.reason") == "unreadable_record"
    assert (
        letter.header("iotfuse.error.topic"),
        letter.header("iotfuse.error.partition"),
        letter.header("iotfuse.error.offset"),
    ) == (topics.telemetry, str(bad.partition), str(bad.offset))
    telemetry = sorted(
        json.loads(p.value)["modalities"]["telemetry"]["records"]
        for p in got
        if p.topic == topics.events
    )
    assert telemetry == [20, 20]  # every record after the skipped one was read


def with_topic_wait(settings: Settings, wait_ms: int) -> Settings:
    return replace(settings, kafka=replace(settings.kafka, topic_wait_ms=wait_ms))


def kafka_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("kafka-")}


def test_a_missing_input_topic_stops_the_worker_with_advice(bootstrap, runner) -> None:
    names = TopicNames.prefixed(f"absent-{uuid.uuid4().hex[:8]}")  # never created
    settings = with_topic_wait(settings_for(bootstrap, names), 0)
    before = kafka_threads()
    with pytest.raises(UserError, match=rf"{names.camera}.*do not exist.*iotfuse topics"):
        KafkaWorker(settings, build_engine(settings, runner))
    # the clients it opened are closed (their network threads ran on, reconnecting forever)
    wait_until(lambda: kafka_threads() <= before, 10, "the failed worker's client threads")


def test_a_missing_output_topic_is_named_when_the_broker_creates_none(
    runner, show_broker_logs
) -> None:
    """As in the docker stack (auto.create.topics.enable=false): before, the worker started,
    its first send waited 60 s for metadata and it stopped with "Failed to update metadata",
    naming no topic."""
    strict = LocalKafka(nodes=1, properties={"auto.create.topics.enable": "false"})
    with show_broker_logs(strict) as kafka:
        names = TopicNames.prefixed("strict")
        settings = with_topic_wait(settings_for(kafka.bootstrap_servers, names), 0)
        with KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers) as admin:
            assert auto_creates_topics(admin) is False
            present = (*names.inputs, names.events, names.incidents, names.incident_state)
            admin.create_topics([NewTopic(t, 1, 1) for t in present])
            with pytest.raises(
                UserError,
                match=rf"output topics {names.deadletter} do not "
                r"exist.*auto.create.topics.enable=false.*iotfuse topics",
            ):
                KafkaWorker(settings, build_engine(settings, runner))
            admin.create_topics([NewTopic(names.deadletter, 1, 1)])
        waits = with_topic_wait(settings, 30_000)  # for the broker's metadata to show it
        KafkaWorker(waits, build_engine(waits, runner)).close()


def test_missing_output_topics_are_left_to_a_broker_that_creates_them(bootstrap, runner) -> None:
    names = TopicNames.prefixed(f"autocreate-{uuid.uuid4().hex[:8]}")
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        assert auto_creates_topics(admin) is True  # the local broker's default
        admin.create_topics([NewTopic(t, 1, 1) for t in names.inputs])
    settings = with_topic_wait(settings_for(bootstrap, names), 0)
    KafkaWorker(settings, build_engine(settings, runner)).close()  # no wait, no error


def test_input_topics_of_different_partition_counts_are_refused(bootstrap, runner) -> None:
    names = TopicNames.prefixed(f"uneven-{uuid.uuid4().hex[:8]}")
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        admin.create_topics([NewTopic(t, 3 if t == names.audio else 2, 1) for t in names.inputs])
    settings = with_topic_wait(settings_for(bootstrap, names), 30_000)
    with pytest.raises(UserError, match=rf"not co-partitioned.*{names.audio}: 3"):
        KafkaWorker(settings, build_engine(settings, runner))


def test_acknowledgements_carry_the_time_they_arrived_not_when_drained(bootstrap, topics) -> None:
    from kafka import KafkaProducer

    from pipeline.kafka.producer import BoundedProducer

    now = {"ms": 1_000}
    out: BoundedProducer[int] = BoundedProducer(
        KafkaProducer(bootstrap_servers=bootstrap, acks="all"), 1 << 20, lambda: now["ms"]
    )
    for i in range(3):
        out.send(i, topics.events, b"k", b"v%d" % i)
    out.flush()  # every acknowledgement has arrived, at 1000
    now["ms"] = 9_000  # the worker drains them later
    assert sorted(out.completed_at()) == [(0, None, 1_000), (1, None, 1_000), (2, None, 1_000)]
    out.close()


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_frames_are_decoded_ahead_once_the_worker_has_nothing_to_read(
    bootstrap: str, topics: TopicNames, start_worker, runner: ModelRunner, fetcher: str
) -> None:
    """The frames an open window will pick are decoded when a poll finds nothing to read
    (`Engine.idle`), not as they arrive nor only at close."""
    s = settings_for(bootstrap, topics)
    s = replace(s, kafka=replace(s.kafka, fetcher=fetcher))
    # two windows of frames: the first one's count predicts the second's picks, and the
    # second stays open (no frame past its end)
    produce(bootstrap, to_topics(device_stream("dev-0", T0, 4, (Modality.CAMERA,)), topics))
    prefetch = start_worker(s).worker.engine.prefetch
    k = runner.features.num_frames
    wait_until(lambda: prefetch.started >= k, 60, f"{k} frames of the open window decoded")
