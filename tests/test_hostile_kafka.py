"""Hostile producers against the real broker (issue 19): a record at the topic's size limit
(parts 1), a compression bomb (part 2), one device's flood beside a normal one (part 3).

Each must leave the worker running, the hostile records dead-lettered or in events, and a
normal device's windows complete.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterator

import pytest

from pipeline.kafka.admin import TopicNames
from pipeline.kafka.worker import KafkaWorker
from pipeline.settings import Settings
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import WorkerThread
from tests.contract import Published
from tests.factory import T0, TOPICS, device_stream, jpeg_header_only, record
from tests.kafka_util import produce, read_until, settings_for, to_topics, worker_thread

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PER_WINDOW = {"camera": 10, "audio": 4, "telemetry": 20}  # device_stream's, 2 s windows
MiB = 1 << 20


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


def windows_of(got: list[Published], events: str, devices: set[str]) -> Counter:
    """(device, window start - T0, modality, records) of each event of `devices`."""
    return Counter(
        (e["device_id"], e["window"]["start_ms"] - T0, m, d["records"])
        for e in (json.loads(p.value or b"") for p in got if p.topic == events)
        if e["device_id"] in devices
        for m, d in e["modalities"].items()
    )


def complete(devices: set[str], seconds: int) -> Counter:
    """Every window of `devices` holding every record device_stream sent it."""
    return Counter(
        (d, s, m, n)
        for d in devices
        for s in range(0, seconds * 1000, 2000)
        for m, n in PER_WINDOW.items()
    )


def large_jpeg(nbytes: int) -> bytes:
    """A JPEG of about `nbytes` that passes the checks made on arrival (4000x3000, SOI..EOI,
    the bulk in comment segments); it fails to decode if a window ever uses it."""
    base = jpeg_header_only(4000, 3000)
    segment = b"\xff\xfe" + struct.pack(">H", 65535) + b"\x00" * 65533
    return base[:2] + segment * ((nbytes - len(base)) // len(segment)) + base[2:]


# -- part 3: one device's flood beside a normal one ---------------------------------------

# on partition 2 of 3 (murmur2, as kafka-python and Java producers place keys): the normal
# device shares its partition with the flood and the large frames; normal-b is on partition 1
SHARED, OTHER, FLOOD, FRAMES = "normal-a", "normal-b", "flood", "big-cam"


def test_one_devices_flood_leaves_a_normal_devices_windows_complete(
    bootstrap: str, topics: TopicNames, start_worker
) -> None:
    """A backlog (the worker starting after the attack, as after a restart): on one
    partition, 8 frames of 8 MiB of one device ahead of a normal device's camera frames, and
    10,000 tiny telemetry records of another after its telemetry. The camera was read one
    8 MiB frame a fetch, the rest at once; past 5,000 records held the aligner released the
    partition's oldest without waiting: the normal device's telemetry and audio went ahead
    of its camera, its windows closed on them, and the camera frames of three of its four
    windows were late (events with 0 frames). Now the telemetry is paused until the camera
    catches up, and both normal devices' windows are complete."""
    frames = [record(TOPICS.camera, FRAMES, T0 + 100 * i, large_jpeg(8 * MiB)) for i in range(8)]
    flood = [record(TOPICS.telemetry, FLOOD, T0 + i // 5, b'{"t":1}') for i in range(10_000)]
    normal = [r for d in (SHARED, OTHER) for r in device_stream(d, T0, 8)]
    for batch in (frames, normal, flood):  # in the logs in this order
        produce(bootstrap, to_topics(batch, topics))
    worker = start_worker(settings_for(bootstrap, topics))
    devices = {SHARED, OTHER}
    got = read_until(
        bootstrap,
        [topics.events],
        lambda got: sum(windows_of(got, topics.events, devices).values()) >= 3 * 8,
        poll=worker.check,
    )
    worker.close()
    assert windows_of(got, topics.events, devices) == complete(devices, 8)
