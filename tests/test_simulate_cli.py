"""`iotfuse simulate`: deterministic recordings with ground truth, paced Kafka output."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.clock import send_paced
from pipeline.kafka.admin import TopicNames
from pipeline.kafka.replay import Pacer
from pipeline.recordings.file import read_records
from pipeline.records import Record
from pipeline.simulate import CLASSES, ScenarioConfig, episodes_from_records, simulate
from pipeline.testing import FakeSeconds
from tests.factory import T0, TOPICS
from tests.kafka_util import read_until


def _simulate(path: Path, seed: int, *extra: str) -> None:
    assert (
        main(
            [
                "simulate",
                "--seed",
                str(seed),
                "--devices",
                "2",
                "--duration",
                "4",
                "--out",
                str(path),
                *extra,
            ]
        )
        == 0
    )


def test_recording_is_identical_for_a_seed_and_labels_cover_every_device(tmp_path: Path) -> None:
    _simulate(tmp_path / "a.iotrec", 11)
    _simulate(tmp_path / "b.iotrec", 11)
    _simulate(tmp_path / "c.iotrec", 12)
    a = (tmp_path / "a.iotrec").read_bytes()
    assert a == (tmp_path / "b.iotrec").read_bytes()
    assert a != (tmp_path / "c.iotrec").read_bytes()

    records = list(read_records(tmp_path / "a.iotrec"))
    truth = episodes_from_records(records, TOPICS.labels)
    assert set(truth) == {"cell-00", "cell-01"}
    for episodes in truth.values():  # the labels tile the simulated time without gaps
        assert episodes[0].start_ms == T0 and episodes[-1].end_ms == T0 + 4000
        assert all(x.end_ms == y.start_ms for x, y in zip(episodes, episodes[1:], strict=False))
        assert {e.label for e in episodes} <= set(CLASSES)
    inputs = Counter((r.topic, r.key) for r in records if r.topic != TOPICS.labels)
    for topic in (TOPICS.camera, TOPICS.audio, TOPICS.telemetry):
        for device in (b"cell-00", b"cell-01"):
            assert inputs[(topic, device)] > 0


def test_profile_and_start_reach_the_scenario(tmp_path: Path) -> None:
    _simulate(tmp_path / "u.iotrec", 11, "--profile", "unseen", "--start-ms", str(T0 + 2000))
    got = list(read_records(tmp_path / "u.iotrec"))
    want = list(
        simulate(
            ScenarioConfig(seed=11, devices=2, duration_s=4, profile="unseen", start_ms=T0 + 2000)
        )
    )
    assert got == want


def test_an_existing_file_is_kept_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.iotrec"
    path.write_bytes(b"keep me")
    assert (
        main(["simulate", "--seed", "1", "--devices", "1", "--duration", "1", "--out", str(path)])
        == 1
    )
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == b"keep me"
    _simulate(path, 1, "--overwrite")
    assert path.read_bytes() != b"keep me"


def _rec(ts: int) -> Record:
    return Record(TOPICS.telemetry, -1, -1, ts, b"cell-00", b"{}")


def test_send_paced_waits_the_timestamp_gaps_divided_by_speed() -> None:
    clock, sent = FakeSeconds(100.0), []
    n, size = send_paced(
        [_rec(T0), _rec(T0 + 1000), _rec(T0 + 3000)],
        sent.append,
        Pacer(2.0, clock, clock.sleep),
        threading.Event(),
        lambda n, b: None,
    )
    assert (n, size) == (3, 3 * len(b"cell-00{}"))
    assert [r.timestamp_ms for r in sent] == [T0, T0 + 1000, T0 + 3000]
    assert clock.sleeps == [0.5, 1.0]


def test_send_paced_stops_when_asked() -> None:
    clock, stop, sent = FakeSeconds(100.0), threading.Event(), []

    def send(record: Record) -> None:
        sent.append(record)
        stop.set()

    n, _ = send_paced(
        [_rec(T0), _rec(T0 + 1000)], send, Pacer(None, clock, clock.sleep), stop, lambda n, b: None
    )
    assert n == 1 and len(sent) == 1 and clock.sleeps == []


@pytest.mark.kafka
def test_simulate_to_kafka_produces_the_scenario(bootstrap: str, topics: TopicNames) -> None:
    names = [
        f"--set=topics.{f}={getattr(topics, f)}" for f in ("camera", "audio", "telemetry", "labels")
    ]
    assert (
        main(
            [
                "simulate",
                "--seed",
                "4",
                "--devices",
                "2",
                "--duration",
                "3",
                "--bootstrap-servers",
                bootstrap,
                "--max-speed",
                "--start-ms",
                str(T0),
                *names,
            ]
        )
        == 0
    )
    cfg = ScenarioConfig(seed=4, devices=2, duration_s=3, start_ms=T0)
    want = Counter((r.topic, r.key, r.timestamp_ms, r.value) for r in simulate(cfg))
    rename = {
        TOPICS.camera: topics.camera,
        TOPICS.audio: topics.audio,
        TOPICS.telemetry: topics.telemetry,
        TOPICS.labels: topics.labels,
    }
    want = Counter({(rename[t], *rest): n for (t, *rest), n in want.items()})
    got = read_until(
        bootstrap, list(rename.values()), lambda rs: len(rs) >= sum(want.values()), timeout_s=60
    )
    assert Counter((r.topic, r.key, r.timestamp_ms, r.value) for r in got) == want
