"""`iotfuse incidents`: the board (open on top with their age, closed below), one line per
record into a pipe, `--json` for scripts; against the real broker with `--once`."""

from __future__ import annotations

import io
import json

import pytest

from pipeline.cli import main
from pipeline.commands.incidents import Board, follow
from pipeline.kafka.admin import TopicNames
from pipeline.records import Record
from tests.kafka_util import produce

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def incident(device: str, cls: str, start_s: int, seq: int, change: str, end_s: int) -> dict:
    closed = change == "close"
    return {
        "schema": "iotfuse.incident/v1",
        "incident_id": f"{device}/{cls}/{T0 + start_s * 1000}",
        "seq": seq,
        "device_id": device,
        "class": cls,
        "state": "closed" if closed else "open",
        "change": change,
        "close_reason": "below_threshold" if closed else None,
        "start_ms": T0 + start_s * 1000,
        "end_ms": T0 + end_s * 1000 if closed else None,
        "last_window": {"start_ms": T0 + (end_s - 2) * 1000, "end_ms": T0 + end_s * 1000},
        "peak_score": 0.91,
        "mean_score": 0.8,
        "windows": (end_s - start_s) // 2,
        "attribution": {"audio": 0.3},
        "model": {"name": "m", "version": "sha256:x"},
        "processed_at_ms": 0,
    }


RECORDS = [
    incident("cell-01", "fire", 10, 0, "open", 14),
    incident("cell-02", "intrusion", 4, 0, "open", 8),
    incident("cell-02", "intrusion", 4, 1, "close", 20),
    incident("cell-01", "fire", 10, 1, "update", 24),
    incident("cell-03", "machine_fault", 30, 0, "open", 34),
    incident("cell-01", "fire", 10, 0, "open", 14),  # repeated after a restart
]


def test_the_board_puts_open_incidents_on_top_with_their_age_and_closed_below() -> None:
    board = Board()
    news = [board.add(r) for r in RECORDS]
    assert news == [True, True, True, True, True, False]  # a repeat, or an older seq: no news
    lines = board.lines(now_ms=T0 + 100_000)
    assert lines[0] == "OPEN (2)" and lines[4] == "CLOSED (1)"
    # the oldest open first, with its age and latest peak and windows
    assert lines[2].split() == ["00:00:10", "1m30s", "0.91", "7", "cell-01", "/", "fire"]
    assert lines[3].split() == ["00:00:30", "1m10s", "0.91", "2", "cell-03", "/", "machine_fault"]
    assert lines[6].split() == [
        "00:00:04", "00:00:20", "16s", "0.91", "below_threshold", "cell-02", "/", "intrusion"
    ]  # fmt: skip


def shown(values: list[bytes], as_json: bool, once: bool) -> list[str]:
    """What `follow` prints for one poll returning `values` (then nothing, and a stop)."""
    batches = [values, []]
    out = io.StringIO()
    follow(lambda _ms: batches.pop(0), lambda: True, lambda: not batches, as_json, once, out)
    return out.getvalue().splitlines()


def test_into_a_pipe_each_new_record_is_a_line_and_json_keeps_the_published_bytes() -> None:
    values = [json.dumps(r).encode() for r in RECORDS] + [b"not json"]
    assert shown(values, as_json=True, once=True) == [v.decode() for v in values[:-1]]
    board = shown(values, as_json=False, once=True)  # the board, once caught up
    assert board[0] == "OPEN (2)" and "CLOSED (1)" in board
    piped = shown(values, as_json=False, once=False)
    assert len(piped) == 5  # the repeat is not news
    assert piped[0].startswith("00:00:14  cell-01 / fire opened: since 00:00:10, peak 0.91")
    assert "cell-02 / intrusion closed (below_threshold)" in piped[2]


@pytest.mark.kafka
def test_iotfuse_incidents_reads_the_topic_from_the_broker(
    bootstrap: str, topics: TopicNames, capsys: pytest.CaptureFixture[str]
) -> None:
    produce(
        bootstrap,
        [
            Record(topics.incidents, -1, -1, T0, r["device_id"].encode(), json.dumps(r).encode())
            for r in RECORDS
        ],
    )
    common = ["--bootstrap-servers", bootstrap, "--set", f"topics.incidents={topics.incidents}"]
    assert main(["incidents", *common, "--once"]) == 0
    board = capsys.readouterr().out.splitlines()
    assert board[0] == "OPEN (2)" and "CLOSED (1)" in board
    assert main(["incidents", *common, "--once", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["incident_id"], r["seq"]) for r in lines) == sorted(
        (r["incident_id"], r["seq"]) for r in RECORDS
    )


@pytest.mark.kafka
def test_a_missing_incidents_topic_is_one_line_with_the_fix(
    bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = ["--set", "topics.incidents=no-such-topic-xyz", "--set", "kafka.topic_wait_ms=0"]
    assert main(["incidents", "--bootstrap-servers", bootstrap, "--once", *missing]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "iotfuse topics" in err
