"""Issue 15: a modality delivered after the others, through the real broker, is not late.

A gateway that flushes one topic after another (after a reconnect) delivers a device's
camera frames of its last windows first and its audio and telemetry later. Under contract
v1 the device's watermark was the largest event time of any modality, so the first topic
closed the windows and the others' records were late (dropped): events of those windows
reported 0 audio or telemetry records. Under v1.1 each modality has a watermark and the
device's is the smallest over its active modalities.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest

from encoders.modality import Modality
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.worker import KafkaWorker
from pipeline.records import Record
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import WorkerThread
from tests.factory import T0, TOPICS, device_stream
from tests.kafka_util import produce, read_until, settings_for, to_topics, wait_until, worker_thread

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CAM, AUD, TEL = Modality.CAMERA, Modality.AUDIO, Modality.TELEMETRY
TOPIC = {CAM: TOPICS.camera, AUD: TOPICS.audio, TEL: TOPICS.telemetry}
# each device's gateway flushes its topics in its own order: every topic comes first, second
# and third for one of them
ORDERS = {"gw-a": (CAM, AUD, TEL), "gw-b": (TEL, CAM, AUD), "gw-c": (AUD, TEL, CAM)}
APART_S = 2.0  # between one topic's flush and the next
PER_WINDOW = {"camera": 10, "audio": 4, "telemetry": 20}  # device_stream's rates, 2 s windows


def records_in(worker: WorkerThread[KafkaWorker]) -> float:
    worker.check()
    metrics = worker.worker.metrics
    return sum(metrics.value("iotfuse_records_in_total", {"modality": m}) for m in PER_WINDOW)


@pytest.fixture
def worker(
    bootstrap: str, topics: TopicNames, runner: ModelRunner
) -> Iterator[WorkerThread[KafkaWorker]]:
    settings = settings_for(bootstrap, topics)
    # windows close by watermark only here: the idle timeout outlasts the delays
    settings = replace(settings, windows=replace(settings.windows, idle_timeout_ms=60_000))
    started = worker_thread(settings, runner)
    yield started
    started.stop.set()
    started.thread.join(timeout=60)


def deliver(
    bootstrap: str, topics: TopicNames, worker: WorkerThread[KafkaWorker], records: list[Record]
) -> None:
    """Produce, then wait until the worker has taken every record (so what comes next is
    read after them, not merged with them in event time as a backlog would be)."""
    expected = records_in(worker) + len(records)
    produce(bootstrap, to_topics(records, topics))
    wait_until(lambda: records_in(worker) >= expected, 60, f"{len(records)} records taken")


def test_modalities_flushed_per_topic_seconds_apart_are_all_in_their_windows(
    bootstrap: str, topics: TopicNames, worker: WorkerThread[KafkaWorker]
) -> None:
    wait_until(lambda: bool(worker.worker.consumer.assignment()), 60, "partition assignment")
    streams = {d: device_stream(d, T0, 8) for d in ORDERS}
    # the devices have been sending all three modalities: their first window arrives live
    first = [r for s in streams.values() for r in s if r.timestamp_ms < T0 + 2000]
    deliver(bootstrap, topics, worker, first)
    # then windows [2 s, 8 s) come back one topic at a time, APART_S apart
    for k in range(3):
        due = time.monotonic() + APART_S
        flush = [
            r
            for d, s in streams.items()
            for r in s
            if r.timestamp_ms >= T0 + 2000 and r.topic == TOPIC[ORDERS[d][k]]
        ]
        deliver(bootstrap, topics, worker, flush)
        if k < 2:
            time.sleep(max(0.0, due - time.monotonic()))  # the scenario's gap, not a wait
    # one more record of each modality at 8.6 s: [6 s, 8 s) closes too
    deliver(
        bootstrap,
        topics,
        worker,
        [r for d in ORDERS for r in device_stream(d, T0 + 8600, 1)[:3]],
    )
    got = read_until(
        bootstrap,
        [topics.events],
        lambda got: len(got) >= 4 * len(ORDERS),
        poll=worker.check,
    )
    worker.close()
    late = {
        m: worker.worker.metrics.value("iotfuse_late_records_total", {"modality": m})
        for m in PER_WINDOW
    }
    assert late == {m: 0 for m in PER_WINDOW}
    counts = Counter(
        (e["device_id"], e["window"]["start_ms"] - T0, m, d["records"])
        for e in map(json.loads, (p.value for p in got))
        for m, d in e["modalities"].items()
    )
    assert counts == Counter(
        (d, s, m, n) for d in ORDERS for s in range(0, 8000, 2000) for m, n in PER_WINDOW.items()
    )
