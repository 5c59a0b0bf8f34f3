"""`iotfuse demo` shows incidents: a line for each one opened and closed beside the events,
a summary, and the timeline PNG marks them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.commands.demo_report import Incidents, IncidentSpan, WindowResult, draw_timeline
from pipeline.simulate import Episode

START_MS = 1767225600000  # 2026-01-01T00:00:00Z
OPENED = re.compile(r"^  >> incident opened: (cell-\d\d) (\w+) since (\S+) \(truth: (\w+)\)$")
CLOSED = re.compile(r"^  >> incident closed: (cell-\d\d) (\w+) (\S+)-(\S+) \((\d+) s, peak")


def test_the_offline_demo_prints_incidents_beside_its_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--offline", "--devices", "2", "--duration", "40", "--seed", "7"]
    args += ["--start-ms", str(START_MS), "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    opened = [m.groups() for line in out if (m := OPENED.match(line))]
    closed = [m.groups() for line in out if (m := CLOSED.match(line))]
    # seed 7: maintenance on cell-01 and alarm_test on cell-00 from 00:00:10-12 to 00:00:26,
    # then machine_fault on cell-01 from 00:00:36, still open when the scenario ends
    assert [(d, c) for d, c, *_ in opened] == [
        ("cell-01", "maintenance"),
        ("cell-00", "alarm_test"),
        ("cell-01", "machine_fault"),
    ]
    assert all(cls == truth for _, cls, _, truth in opened)  # each what the labels say
    assert sorted((d, c) for d, c, *_ in closed) == [
        ("cell-00", "alarm_test"),
        ("cell-01", "maintenance"),
    ]
    first_close = next(i for i, line in enumerate(out) if CLOSED.match(line))
    assert out[first_close - 1].startswith("cell-")  # beside the event that closed it
    assert "demo: incidents: 3 opened (2 closed, 1 still open) for 4 true incidents" in "\n".join(
        out
    )


def test_the_timeline_marks_incidents(tmp_path: Path) -> None:
    truth = {"cell-00": [Episode(START_MS, START_MS + 8000, "fire")]}
    results = [
        WindowResult("cell-00", START_MS + i * 2000, START_MS + (i + 1) * 2000, "fire", 0.9, "fire")
        for i in range(4)
    ]
    plain, marked = tmp_path / "plain.png", tmp_path / "marked.png"
    draw_timeline(plain, truth, results, ["normal", "fire"])
    spans = [IncidentSpan("cell-00", "fire", START_MS, START_MS + 6000, START_MS + 8000)]
    draw_timeline(marked, truth, results, ["normal", "fire"], incidents=spans)
    assert marked.read_bytes() != plain.read_bytes()


def test_an_update_or_a_repeat_prints_nothing() -> None:
    incidents = Incidents({})
    record = {
        "incident_id": "cell-00/fire/0",
        "seq": 0,
        "device_id": "cell-00",
        "class": "fire",
        "change": "open",
        "state": "open",
        "start_ms": START_MS,
        "end_ms": None,
        "last_window": {"start_ms": START_MS, "end_ms": START_MS + 2000},
        "peak_score": 0.9,
        "close_reason": None,
    }
    assert incidents.add(record) == "  >> incident opened: cell-00 fire since 00:00:00 (truth: -)"
    assert incidents.add(record) is None
    assert incidents.add({**record, "seq": 1, "change": "update"}) is None
    [span] = incidents.spans
    assert span.end_ms is None and span.last_end_ms == START_MS + 2000
