"""inspect: counts, devices and labels of a simulated recording; the timeline PNG."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colors
from matplotlib.image import imread

from pipeline.cli import main
from pipeline.recordings.file import RecordingWriter
from pipeline.recordings.inspect import inspect_recording, topic_role
from pipeline.records import Record
from pipeline.settings import TopicSettings
from pipeline.simulate import ScenarioConfig, schedules, simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOPICS = {role: f"run7.{role}" for role in ("camera", "audio", "telemetry", "labels")}


@pytest.fixture(scope="module")
def simulated(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, ScenarioConfig, list[Record]]:
    """A recording of 3 simulated devices over 6 s, on prefixed topic names, plus one
    record that is not a label on the labels topic."""
    cfg = ScenarioConfig(seed=3, devices=3, duration_s=6, topics=TOPICS)
    records = list(simulate(cfg))
    records.append(Record(TOPICS["labels"], -1, -1, cfg.start_ms, b"cell-00", b"not json"))
    path = tmp_path_factory.mktemp("inspect") / "sim.iotrec"
    with RecordingWriter(path) as writer:
        for r in records:
            writer.write(r)
    return path, cfg, records


def test_inspect_json_gives_counts_devices_and_labels(
    simulated: tuple[Path, ScenarioConfig, list[Record]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, cfg, records = simulated
    assert main(["inspect", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    assert got["records"] == len(records) and not got["truncated"]
    counts = Counter(r.topic for r in records)
    assert {t: v["records"] for t, v in got["topics"].items()} == counts
    assert {t: v["role"] for t, v in got["topics"].items()} == {t: r for r, t in TOPICS.items()}
    assert got["topics"][TOPICS["camera"]]["value_bytes"] == sum(
        len(r.value or b"") for r in records if r.topic == TOPICS["camera"]
    )
    truth = schedules(cfg)
    assert got["devices"] == sorted(truth)
    stamps = [r.timestamp_ms for r in records]
    assert got["time_span"] == {
        "start_ms": min(stamps),
        "end_ms": max(stamps),
        "duration_ms": max(stamps) - min(stamps),
    }
    expected: dict[str, dict[str, int]] = {}
    for episodes in truth.values():
        for ep in episodes:
            e = expected.setdefault(ep.label, {"spans": 0, "duration_ms": 0, "devices": 0})
            e["spans"] += 1
            e["duration_ms"] += ep.end_ms - ep.start_ms
    for label in expected:
        expected[label]["devices"] = sum(
            any(ep.label == label for ep in eps) for eps in truth.values()
        )
    assert got["labels"] == {
        "topics": [TOPICS["labels"]],
        "by_label": expected,
        "invalid_records": 1,
    }
    assert got["digest"].startswith("sha256:")


def test_inspect_table_is_readable(
    simulated: tuple[Path, ScenarioConfig, list[Record]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _cfg, records = simulated
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for role, topic in TOPICS.items():
        assert lines[topic][1] == role
        assert int(lines[topic][2]) == sum(r.topic == topic for r in records)
    assert "1 records on the labels topic are not label JSON" in out
    assert "out of offset order" not in out  # simulator records carry no offsets


def test_plot_is_a_png_with_a_mark_colour_per_modality(
    simulated: tuple[Path, ScenarioConfig, list[Record]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _cfg, _records = simulated
    png = tmp_path / "timeline.png"
    assert main(["inspect", str(path), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    pixels = np.round(imread(png)[..., :3] * 255).astype(int)  # rows x cols x RGB
    assert pixels.shape[0] > 200 and pixels.shape[1] > 800
    for colour in ("tab:blue", "tab:orange", "tab:green"):  # camera, audio, telemetry marks
        rgb = np.round(np.array(colors.to_rgb(colour)) * 255).astype(int)
        assert (np.abs(pixels - rgb).sum(axis=-1) <= 3).sum() > 100, colour


def test_truncated_recording_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.iotrec"
    with RecordingWriter(path, block_bytes=2000) as writer:
        for i in range(40):
            writer.write(Record("a.telemetry", 0, i, 1000 + i, b"d1", b'{"t": %d}' % i * 20))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    info = inspect_recording(path, TopicSettings(), timeline_bins=50)
    assert info.summary.truncated and 0 < info.summary.records < 40
    marks = info.timeline.marks[("d1", "telemetry")] if info.timeline else bytearray()
    assert 0 < sum(marks) < 50


def test_inspect_memory_does_not_grow_with_records(tmp_path: Path) -> None:
    path = tmp_path / "big.iotrec"
    rng = random.Random(0)
    with RecordingWriter(path) as writer:  # ~24 MB of incompressible records, 8 devices
        for i in range(12_000):
            writer.write(
                Record("x.camera", i % 3, i, 1000 * i, b"dev-%d" % (i % 8), rng.randbytes(2048))
            )
    assert path.stat().st_size > 24_000_000
    tracemalloc.start()
    try:
        info = inspect_recording(path, TopicSettings(), timeline_bins=600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.summary.records == 12_000 and info.timeline is not None
    assert len(info.timeline.devices) == 8
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_topic_roles_from_settings_or_name_suffix() -> None:
    topics = TopicSettings(camera="cams")
    assert topic_role("cams", topics) == "camera"
    assert topic_role("iot.audio", topics) == "audio"
    assert topic_role("site3.labels", topics) == "labels"
    assert topic_role("iot.events", topics) is None
