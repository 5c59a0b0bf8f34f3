"""`iotfuse replay FILE --offline`: the whole pipeline over a recording, no broker."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from encoders.modality import ALL_MODALITIES, Modality
from pipeline.cli import main
from pipeline.recordings.file import RecordingWriter
from pipeline.records import Record
from tests.contract import Published, check_event, expected_windows, scenario
from tests.factory import CLASSES, T0, TOPICS, device_stream, jpeg_header_only, make_model, record


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def write_recording(path: Path, records: Iterable[Record]) -> Path:
    with RecordingWriter(path, block_bytes=64 * 1024) as writer:  # several blocks
        for r in records:
            writer.write(r)
    return path


def offline(recording: Path, model: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "replay",
            str(recording),
            "--offline",
            "--out",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
            *extra,
        ]
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def unnumbered(records: list[Record]) -> list[Record]:
    """As the simulator writes them: no partition, no offset."""
    return [replace(r, partition=-1, offset=-1) for r in records]


def test_one_event_per_window_with_its_counts_and_dead_letters_without_payload(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records, bad = scenario()  # numbered 0, 1, ... per topic in this (file) order
    labels = record(TOPICS.labels, "cell-01", T0, b'{"label": "fire"}')
    path = write_recording(tmp_path / "rec.iotrec", unnumbered(records) + [labels])
    events, dead = tmp_path / "events.jsonl", tmp_path / "dead.jsonl"

    assert offline(path, model_dir, events, "--deadletters", str(dead)) == 0

    from pipeline.stream.model_runner import ModelRunner

    version = ModelRunner.load(model_dir, "cpu").version
    got = lines(events)
    counts = expected_windows(records, bad)
    assert sorted((e["device_id"], e["window"]["start_ms"]) for e in got) == sorted(
        {(d, s) for d, s, _ in counts}
    ), "exactly one event per window"
    for e in got:
        check_event(
            Published(
                TOPICS.events,
                e["device_id"].encode(),
                json.dumps(e).encode(),
                (),
                e["window"]["end_ms"],
            ),
            counts,
            CLASSES,
            version,
        )
    dead_letters = lines(dead)
    assert sorted((d["reason"], d["topic"], d["offset"]) for d in dead_letters) == sorted(
        (reason, r.topic, r.offset) for r, reason in bad
    ), "offsets numbered as a broker would"
    for d in dead_letters:
        assert d["stage"] in ("validate", "decode") and d["message"] and d["partition"] == -1
        assert "value" not in d
    err = capsys.readouterr().err
    assert f"{len(got)} events" in err and "records/s" in err
    assert f"{len(bad)} dead letters into {dead}" in err


def test_a_frame_that_fails_to_decode_in_an_unnumbered_recording_is_dead_lettered(
    tmp_path: Path, model_dir: Path
) -> None:
    """Simulator recordings carry offset -1 on every record; the engine tells records apart
    by position, so one damaged frame among many must still name itself (and not crash)."""
    recs = device_stream("cam-1", T0, 4, (Modality.CAMERA,))
    damaged = record(TOPICS.camera, "cam-1", T0 + 3999, jpeg_header_only(160, 120))
    recs = sorted(recs + [damaged], key=lambda r: r.timestamp_ms)
    path = write_recording(tmp_path / "sim.iotrec", unnumbered(recs))
    events, dead = tmp_path / "events.jsonl", tmp_path / "dead.jsonl"

    assert offline(path, model_dir, events, "--deadletters", str(dead)) == 0

    [letter] = lines(dead)
    assert (letter["reason"], letter["stage"]) == ("image_corrupt", "decode")
    assert letter["offset"] == recs.index(damaged) and letter["timestamp_ms"] == T0 + 3999
    second = [e for e in lines(events) if e["window"]["start_ms"] == T0 + 2000]
    assert second[0]["modalities"]["camera"]["records"] == 10, "the damaged frame is excluded"


def test_two_runs_give_the_same_events_except_processed_at(tmp_path: Path, model_dir: Path) -> None:
    recs: list[Record] = []
    for d in range(3):
        recs += device_stream(f"dev-{d}", T0 + 300 * d, 3)
    path = write_recording(tmp_path / "rec.iotrec", sorted(recs, key=lambda r: r.timestamp_ms))
    runs = []
    for name in ("a.jsonl", "b.jsonl"):
        assert offline(path, model_dir, tmp_path / name) == 0
        runs.append(
            [{k: v for k, v in e.items() if k != "processed_at_ms"} for e in lines(tmp_path / name)]
        )
    assert len(runs[0]) == len({(r.key, r.timestamp_ms // 2000) for r in recs})
    assert runs[0] == runs[1]


def test_topic_map_feeds_recorded_topics_to_the_pipeline(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rename = {TOPICS.camera: "t.cam", TOPICS.audio: "t.mic", TOPICS.telemetry: "t.tel"}
    original = device_stream("dev", T0, 2)  # one window
    recs = [replace(r, topic=rename[r.topic]) for r in original]
    path = write_recording(tmp_path / "rec.iotrec", recs)

    assert offline(path, model_dir, tmp_path / "none.jsonl") == 0
    assert lines(tmp_path / "none.jsonl") == []
    assert "--topic-map" in capsys.readouterr().err, "says why nothing came out"

    maps = [f"{old}={new}" for new, old in rename.items()]
    assert offline(path, model_dir, tmp_path / "mapped.jsonl", "--topic-map", *maps) == 0
    [event] = lines(tmp_path / "mapped.jsonl")
    modality = {TOPICS.camera: "camera", TOPICS.audio: "audio", TOPICS.telemetry: "telemetry"}
    assert {m: event["modalities"][m]["records"] for m in ALL_MODALITIES} == Counter(
        modality[r.topic] for r in original
    )


def test_offline_argument_mistakes_are_one_clear_line(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recording(tmp_path / "rec.iotrec", device_stream("dev", T0, 1))
    existing = tmp_path / "events.jsonl"
    existing.write_text("keep me\n")
    cases = [
        (["replay", str(path), "--offline"], "--offline needs --out"),
        (
            ["replay", str(path), "--offline", "--out", str(existing), "--model", str(model_dir)],
            "already exists",
        ),
        (["replay", str(path), "--out", str(tmp_path / "x.jsonl")], "only apply with --offline"),
        (
            ["replay", str(path), "--offline", "--speed", "2", "--out", str(tmp_path / "y")],
            "--speed does not apply",
        ),
        (
            ["replay", str(tmp_path / "missing.iotrec"), "--offline", "--out", str(tmp_path / "z")],
            "missing.iotrec",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert existing.read_text() == "keep me\n"
    assert offline(path, model_dir, existing, "--overwrite") == 0
    assert len(lines(existing)) == 1
