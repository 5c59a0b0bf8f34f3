"""`iotfuse demo`: every expected window gets an event line with its ground truth, then the
accuracy and a timeline PNG; live through a local Kafka, offline without one."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.commands.demo_report import WindowResult, draw_timeline, summary_lines
from pipeline.simulate import DEFAULT_TOPICS, Episode, ScenarioConfig, simulate
from pipeline.stream.model_runner import default_model_dir

START_MS = 1767225600000  # 2026-01-01T00:00:00Z
EVENT_LINE = re.compile(r"^(cell-\d\d)\s+(\d\d:\d\d:\d\d)\s+(\w+)\s+(\d\.\d\d)\s+(\S+)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def expected_windows(devices: int, duration_s: float, start_ms: int) -> set[tuple[str, str]]:
    """(device, window start as HH:MM:SS UTC) of every window holding an input record."""
    window_ms = json.loads((default_model_dir() / "config.json").read_text())["window_ms"]
    inputs = {DEFAULT_TOPICS[m] for m in ("camera", "audio", "telemetry")}
    cfg = ScenarioConfig(seed=7, devices=devices, duration_s=duration_s, start_ms=start_ms)
    return {
        (r.key.decode(), _hms(r.timestamp_ms // window_ms * window_ms))
        for r in simulate(cfg)
        if r.topic in inputs and r.key is not None
    }


def _hms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def check_demo_output(out: str, expected: set[tuple[str, str]], png: Path) -> None:
    shown = [m.groups() for line in out.splitlines() if (m := EVENT_LINE.match(line))]
    assert len(shown) == len(expected), out
    assert {(device, start) for device, start, *_ in shown} == expected
    assert f"{len(expected)} events for {len(expected)} expected windows" in out
    accuracy = re.search(r"accuracy (\d+\.\d+)", out)
    assert accuracy is not None, out
    assert 0.0 <= float(accuracy.group(1)) <= 1.0
    assert f"timeline written to {png}" in out
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 150 and len(data) > 5000


def test_offline_demo_shows_every_window_and_writes_the_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "demo",
                "--offline",
                "--devices",
                "2",
                "--duration",
                "6",
                "--seed",
                "7",
                "--start-ms",
                str(START_MS),
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Kafka at" not in out
    check_demo_output(out, expected_windows(2, 6, START_MS), tmp_path / "timeline.png")


def test_without_java_the_demo_says_so_and_runs_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java, no mvn
    assert (
        main(
            [
                "demo",
                "--devices",
                "1",
                "--duration",
                "2",
                "--seed",
                "7",
                "--start-ms",
                str(START_MS),
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "no local Kafka" in line]
    assert len(notes) == 1 and "Java" in notes[0] and "offline" in notes[0]
    check_demo_output(out, expected_windows(1, 2, START_MS), tmp_path / "timeline.png")


@pytest.mark.kafka
def test_live_demo_through_a_local_kafka(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.time_ns() // 1_000_000  # stamped with the present, as the demo does
    assert (
        main(
            [
                "demo",
                "--max-speed",
                "--devices",
                "2",
                "--duration",
                "6",
                "--seed",
                "7",
                "--start-ms",
                str(start),
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "local Kafka at 127.0.0.1:" in out and "no local Kafka" not in out
    check_demo_output(out, expected_windows(2, 6, start), tmp_path / "timeline.png")


def test_timeline_and_summary_of_known_results(tmp_path: Path) -> None:
    truth = {
        "cell-00": [Episode(0, 3000, "normal"), Episode(3000, 6000, "fire")],
        "cell-01": [Episode(0, 6000, "intrusion")],
    }
    results = [
        WindowResult("cell-00", 0, 2000, "normal", 0.9, "normal"),
        WindowResult("cell-00", 2000, 4000, "normal", 0.6, "fire"),
        WindowResult("cell-00", 4000, 6000, "fire", 0.8, "fire"),
        WindowResult("cell-01", 0, 2000, "intrusion", 0.7, "intrusion"),
        WindowResult("cell-01", 6000, 8000, "normal", 0.5, None),
    ]
    lines = summary_lines(results, expected=6)
    assert lines[0] == "5 events for 6 expected windows"
    assert lines[1] == "4 windows with ground truth, 3 matching: accuracy 0.75"
    assert lines[2] == "per class (right/true): fire 1/2, intrusion 1/1, normal 1/1"
    png = tmp_path / "timeline.png"
    draw_timeline(png, truth, results, ("normal", "fire", "intrusion"), "known results")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
