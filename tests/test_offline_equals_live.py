"""`replay --offline` computes what the live pipeline publishes: one recording, replayed
into Kafka and consumed by a `KafkaWorker`, and run offline, gives the same events."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.replay import ReplayOptions, replay_to_kafka
from pipeline.recordings.file import RecordingWriter
from pipeline.records import Record
from pipeline.settings import KafkaSettings
from pipeline.stream.model_runner import ModelRunner
from tests.contract import Published
from tests.factory import T0, TOPICS, device_stream, make_model, record, telemetry
from tests.kafka_util import read_until, settings_for, worker_thread

pytestmark = pytest.mark.kafka

TOLERANCE = 1e-4
Window = tuple[str, int]  # device, start_ms


def recorded_streams() -> tuple[list[Record], list[Record]]:
    """Three devices x 10 s, starts off the window grid, as the simulator records them (no
    partition: Kafka partitions by key; no offset), plus two records that are rejected."""
    records: list[Record] = []
    for n, start in enumerate((130, 700, 1500)):
        records += device_stream(f"cell-{n:02d}", T0 + start, 10)
    bad = [
        record(TOPICS.telemetry, None, T0 + 4321, telemetry(temperature_c=1.0)),
        record(TOPICS.camera, "cell-01", T0 + 5555, b"not an image at all"),
    ]
    records = sorted(records + bad, key=lambda r: r.timestamp_ms)
    return [replace(r, partition=-1, offset=-1) for r in records], bad


def windows_of(records: list[Record], bad: list[Record]) -> set[Window]:
    return {
        (r.key.decode(), r.timestamp_ms // 2000 * 2000)
        for r in records
        if r.key is not None and r.value not in {b.value for b in bad}
    }


def by_window(events: list[dict[str, Any]]) -> dict[Window, dict[str, Any]]:
    keyed = Counter((e["device_id"], e["window"]["start_ms"]) for e in events)
    assert all(n == 1 for n in keyed.values()), f"duplicate events: {keyed.most_common(3)}"
    return {(e["device_id"], e["window"]["start_ms"]): e for e in events}


def differences(live: dict[str, Any], offline: dict[str, Any]) -> list[str]:
    out = [
        f"{field}: live {live[field]} offline {offline[field]}"
        for field in ("schema", "window", "label", "modalities", "model")
        if live[field] != offline[field]
    ]
    for field in ("scores", "attribution"):
        if set(live[field]) != set(offline[field]) or any(
            abs(live[field][k] - offline[field][k]) > TOLERANCE for k in live[field]
        ):
            out.append(f"{field}: live {live[field]} offline {offline[field]}")
    if abs(live["confidence"] - offline["confidence"]) > TOLERANCE:
        out.append(f"confidence: live {live['confidence']} offline {offline['confidence']}")
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def test_offline_replay_publishes_what_the_live_pipeline_publishes(
    bootstrap: str, topics: TopicNames, model_dir: Path, tmp_path: Path
) -> None:
    records, bad = recorded_streams()
    path = tmp_path / "cells.iotrec"
    with RecordingWriter(path, block_bytes=64 * 1024) as writer:
        for r in records:
            writer.write(r)
    expected = windows_of(records, bad)

    # live: replay into this test's topics at max speed, then a worker consumes them
    to_test = {
        TOPICS.camera: topics.camera,
        TOPICS.audio: topics.audio,
        TOPICS.telemetry: topics.telemetry,
    }
    sent = replay_to_kafka(
        path,
        KafkaSettings(bootstrap_servers=bootstrap),
        ReplayOptions(speed=None, topic_map=to_test),
        threading.Event(),
    )
    assert sent.records == len(records)
    worker = worker_thread(settings_for(bootstrap, topics), ModelRunner.load(model_dir, "cpu"))

    def complete(got: list[Published]) -> bool:
        windows = {
            (
                json.loads(p.value or b"")["device_id"],
                json.loads(p.value or b"")["window"]["start_ms"],
            )
            for p in got
            if p.topic == topics.events
        }
        return windows >= expected and sum(p.topic == topics.deadletter for p in got) >= len(bad)

    published = read_until(
        bootstrap, [topics.events, topics.deadletter], complete, timeout_s=120, poll=worker.check
    )
    worker.close()
    live = by_window([json.loads(p.value or b"") for p in published if p.topic == topics.events])
    live_dead = sorted(
        (p.key or b"", p.header("iotfuse.error.reason"), p.header("iotfuse.error.stage"))
        for p in published
        if p.topic == topics.deadletter
    )

    # offline: the same recording and model, no broker
    events, dead = tmp_path / "events.jsonl", tmp_path / "dead.jsonl"
    assert (
        main(
            [
                "replay",
                str(path),
                "--offline",
                "--out",
                str(events),
                "--deadletters",
                str(dead),
                "--model",
                str(model_dir),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    offline = by_window([json.loads(line) for line in events.read_text().splitlines()])
    offline_dead = sorted(
        ((d["key"] or "").encode(), d["reason"], d["stage"])
        for d in map(json.loads, dead.read_text().splitlines())
    )

    assert set(offline) == expected
    assert set(live) == set(offline), (
        f"only live: {sorted(set(live) - set(offline))}; "
        f"only offline: {sorted(set(offline) - set(live))}"
    )
    differ = {w: d for w in sorted(live) if (d := differences(live[w], offline[w]))}
    assert not differ, f"{len(differ)} of {len(live)} windows differ: {differ}"
    assert live_dead == offline_dead
