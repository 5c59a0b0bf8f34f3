"""A fixed-seed fuzz of hostile records through the real broker, beside a normal device
(issue 19, "Done when").

A few hundred records of many classes: every bad-input class of the contract, damaged
images and audio, telemetry of extreme or broken JSON, forged `iotfuse.error.*` and empty
headers, invalid keys and timestamps, a flood of one device, a record at the topic's size
limit, a header key the client cannot parse and a compression bomb. Each must end as the
dead letter with the reason the offline engine gives it (the client-level ones: the reason
of their class), or in its device's event with the records the offline engine counts there;
none late, none lost. The normal device's windows are complete, and the worker is alive.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import pytest
from kafka import KafkaProducer

from encoders.modality import Modality
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.decompress import MAX_BATCH_BYTES
from pipeline.kafka.fetch import FETCHERS
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.model_runner import ModelRunner
from tests.contract import Published, bad_inputs
from tests.factory import T0, TOPICS, device_stream, jpeg, mutate, number, png, record, wav
from tests.kafka_util import produce, read_until, settings_for, to_topics, worker_thread

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SEED = 19
NORMAL = "normal-a"  # on partition 2 of 3
PER_WINDOW = {"camera": 10, "audio": 4, "telemetry": 20}  # device_stream's, 2 s windows
TOPIC = {Modality.CAMERA: TOPICS.camera, Modality.AUDIO: TOPICS.audio}
CONTENT_TYPES = [None, b"image/jpeg", b"audio/wav", b"application/json", b"\xff\xfe"]
BAD_KEYS = [None, b"", b"\xff\xfe", b"d" * 300, b"bad key!"]
EXTREMES = [0.0, 1e-320, 1e300, -3.5e38, 10**40, True, None, "21.5", [], {"n": 1e308}]


class RawHeaderKey(str):
    """A header key kafka-python sends as these bytes: not UTF-8 (as a C producer may)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe"


def hostile(rng: random.Random, i: int) -> Record:
    """One damaged or odd record of a device of its own (`fz-i`): none can be late."""
    modality = rng.choice(list(Modality))
    if modality is Modality.TELEMETRY:
        names = rng.sample(["temperature_c", "vibration_rms", "door_open", "x"], 2)
        value: bytes | None = json.dumps({n: rng.choice(EXTREMES) for n in names}).encode()
        topic = TOPICS.telemetry
    else:
        media = [jpeg(seed=i), png()] if modality is Modality.CAMERA else [wav(), wav(0.5, 8000)]
        value, topic = rng.choice(media), TOPIC[modality]
    if rng.random() < 0.6:
        value = mutate(value, rng)
    if rng.random() < 0.05:
        value = rng.choice([None, b"", rng.randbytes(rng.randint(1, 300))])
    key = rng.choice(BAD_KEYS) if rng.random() < 0.05 else f"fz-{i}".encode()
    ts = T0 + rng.randrange(6000) if rng.random() > 0.03 else rng.choice([-1, 0])
    headers: list[tuple[str, bytes | None]] = []
    ctype = rng.choice(CONTENT_TYPES)
    if ctype is not None:
        headers.append(("content-type", ctype))
    if rng.random() < 0.1:
        headers += [("iotfuse.error.reason", b"forged"), ("trace", b"")]
    return Record(topic, 0, -1, ts, key, value, tuple(headers))


def hostile_records(rng: random.Random) -> list[Record]:
    records = [r for r, _ in bad_inputs(T0 + 1000)]  # the contract's classes
    records += [hostile(rng, i) for i in range(240)]
    records += [  # a flood of one device
        record(TOPICS.telemetry, "flood", T0 + 2000 + i, b'{"t": %d}' % i) for i in range(60)
    ]
    # at the camera topic's size limit, in a header (issue 19, part 1)
    records.append(
        record(TOPICS.camera, "fz-pad", T0 + 900, b"not an image", (("pad", b"P" * 10_485_299),))
    )
    return records


def outcomes(
    letters: list[Published], events: list[Published], where: dict[tuple[str, int, int], int]
) -> tuple[dict[int, str], dict[str, dict[str, int]]]:
    """Which record each dead letter is (by its position) with its reason; and per device,
    the records each modality has in its events."""
    dead = {}
    for p in letters:
        pos = (p.header("iotfuse.error.topic"), int(p.header("iotfuse.error.partition")))
        index = where[(*pos, int(p.header("iotfuse.error.offset")))]
        assert index not in dead, f"two dead letters for record {index}"
        dead[index] = p.header("iotfuse.error.reason")
    counts: dict[str, Counter[str]] = {}
    for p in events:
        e = json.loads(p.value or b"")
        for m, d in e["modalities"].items():
            counts.setdefault(e["device_id"], Counter())[m] += d["records"]
    return dead, {d: dict(+c) for d, c in counts.items()}


def offline(records: list[Record], runner: ModelRunner) -> tuple[dict[int, str], dict]:
    """What the offline engine makes of `records` (the oracle: same decoders, windows)."""
    numbered = number(records)
    where = {(r.topic, r.partition, r.offset): i for i, r in enumerate(numbered)}
    settings = Settings()
    engine = build_engine(settings, runner, clock=lambda: T0 + 60_000)
    out = list(run_offline(engine, numbered))
    as_published = [Published(o.topic, o.key, o.value, o.headers, o.timestamp_ms) for o in out]
    return outcomes(
        [p for p in as_published if p.topic == settings.topics.deadletter],
        [p for p in as_published if p.topic == settings.topics.events],
        where,
    )


def produce_bomb(bootstrap: str, topic: str) -> tuple[int, int]:
    """One camera record of zeros past the decompression bound, gzip: (partition, offset)."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, compression_type="gzip", max_request_size=80 << 20
    )
    size = MAX_BATCH_BYTES + (4 << 20)
    md = producer.send(topic, key=b"fz-bomb", value=bytes(size), timestamp_ms=T0).get(60)
    producer.close()
    return md.partition, md.offset


def produce_unreadable(bootstrap: str, topic: str) -> tuple[int, int]:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    md = producer.send(
        topic, key=b"fz-raw", value=b"{}", timestamp_ms=T0, headers=[(RawHeaderKey("x"), b"v")]
    ).get(60)
    producer.close()
    return md.partition, md.offset


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_a_fixed_seed_of_hostile_records_each_ends_as_it_should_beside_a_normal_device(
    bootstrap: str, topics: TopicNames, runner: ModelRunner, fetcher: str
) -> None:
    records = hostile_records(random.Random(SEED))
    want_dead, want_counts = offline(records, runner)
    assert len(set(want_dead.values())) >= 15, "the mix covers many reasons"
    normal = to_topics(device_stream(NORMAL, T0, 6), topics)
    produce(bootstrap, [r for r in normal if r.timestamp_ms < T0 + 3000])
    sent = produce(bootstrap, to_topics(records, topics))
    bomb = produce_bomb(bootstrap, topics.camera)
    raw = produce_unreadable(bootstrap, topics.telemetry)
    produce(bootstrap, [r for r in normal if r.timestamp_ms >= T0 + 3000])
    where = {(r.topic, r.partition, r.offset): i for i, r in enumerate(sent)}
    where[(topics.camera, *bomb)] = len(records)
    where[(topics.telemetry, *raw)] = len(records) + 1
    want_dead = {
        **want_dead,
        len(records): "batch_too_large_decompressed",
        len(records) + 1: "unreadable_record",
    }
    settings = settings_for(bootstrap, topics, fetcher=fetcher)
    settings = replace(settings, windows=replace(settings.windows, idle_timeout_ms=1000))
    worker = worker_thread(settings, runner)
    devices = set(want_counts) | {NORMAL}

    def done(got: list[Published]) -> bool:
        ids = [json.loads(p.value or b"")["device_id"] for p in got if p.topic == topics.events]
        letters = sum(p.topic == topics.deadletter for p in got)
        # the normal device's 3 windows too: its last closes at the idle timeout, which may
        # come after the last dead letter (with librdkafka's timing it did)
        return set(ids) >= devices and ids.count(NORMAL) >= 3 and letters >= len(want_dead)

    try:
        got = read_until(
            bootstrap, [topics.events, topics.deadletter], done, timeout_s=90, poll=worker.check
        )
    finally:
        worker.close()  # raises what stopped it, if anything did
    dead, counts = outcomes(
        [p for p in got if p.topic == topics.deadletter],
        [p for p in got if p.topic == topics.events],
        where,
    )
    if fetcher == "librdkafka":  # it may decompress the bomb whole: then its image is too
        # large (docs/contract.md: the decompression bound is kafka-python's)
        bombed = {"batch_too_large_decompressed", "image_too_large_bytes"}
        assert dead.pop(len(records), None) in bombed
        del want_dead[len(records)]
    assert dead == want_dead
    assert counts.pop(NORMAL) == {m: n * 3 for m, n in PER_WINDOW.items()}
    assert counts == want_counts
    metrics = worker.worker.metrics
    assert (
        sum(metrics.value("iotfuse_late_records_total", {"modality": m}) for m in PER_WINDOW) == 0
    )
    normal_windows = Counter(
        (e["window"]["start_ms"], m, d["records"])
        for e in (json.loads(p.value or b"") for p in got if p.topic == topics.events)
        if e["device_id"] == NORMAL
        for m, d in e["modalities"].items()
    )
    assert normal_windows == Counter(
        (T0 + s, m, n) for s in (0, 2000, 4000) for m, n in PER_WINDOW.items()
    )
