"""`iotfuse incidents`: follow the incidents topic in the terminal.

Open incidents on top, oldest first, with their age; closed ones below, the latest first.
On a terminal the board is redrawn every second; into a pipe each record is one line as it
arrives; `--json` prints each record as it was published, one per line, for scripts;
`--once` reads what the topic holds, prints, and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from pipeline.clock import Clock, wall_clock_ms
from pipeline.commands.common import bootstrap_arg
from pipeline.commands.console import stop_on_signals
from pipeline.settings import Settings

REDRAW_S = 1.0
CLOSED_SHOWN = 20  # closed incidents on the board at most


def incidents_args(p: argparse.ArgumentParser) -> None:
    bootstrap_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON record per line, as published")
    p.add_argument("--once", action="store_true", help="print what the topic holds now and exit")


def _hms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def _span(ms: int) -> str:
    s = max(0, ms // 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Board:
    """The latest record of every incident (a record repeated after a restart, or older than
    one already seen, changes nothing)."""

    def __init__(self, closed_shown: int = CLOSED_SHOWN) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.closed_shown = closed_shown

    def add(self, record: Mapping[str, Any]) -> bool:
        """Take a record; False when it is not news."""
        key = str(record["incident_id"])
        seen = self.latest.get(key)
        if seen is not None and int(seen["seq"]) >= int(record["seq"]):
            return False
        self.latest[key] = dict(record)
        if len(self.latest) > 10 * self.closed_shown:  # memory: forget old closed ones
            closed = sorted((i for i in self.latest.values() if i["state"] == "closed"), key=_ended)
            for old in closed[: len(closed) - self.closed_shown]:
                del self.latest[old["incident_id"]]
        return True

    def lines(self, now_ms: int) -> list[str]:
        """The board: open incidents (oldest first, with their age), then closed ones."""
        opened = sorted(
            (i for i in self.latest.values() if i["state"] != "closed"), key=lambda i: i["start_ms"]
        )
        closed = sorted(
            (i for i in self.latest.values() if i["state"] == "closed"), key=_ended, reverse=True
        )
        out = [f"OPEN ({len(opened)})", "  since     age       peak  windows  device / class"]
        out += [
            f"  {_hms(i['start_ms'])}  {_span(now_ms - int(i['start_ms'])):<8}  "
            f"{i['peak_score']:.2f}  {i['windows']:>7}  {i['device_id']} / {i['class']}"
            for i in opened
        ]
        out += [f"CLOSED ({len(closed)})", "  from      to        lasted    peak  reason"]
        out += [
            f"  {_hms(i['start_ms'])}  {_hms(i['end_ms'])}  "
            f"{_span(int(i['end_ms']) - int(i['start_ms'])):<8}  {i['peak_score']:.2f}  "
            f"{i['close_reason']:<15}  {i['device_id']} / {i['class']}"
            for i in closed[: self.closed_shown]
        ]
        return out


def _ended(record: Mapping[str, Any]) -> int:
    return int(record.get("end_ms") or 0)


def one_line(record: Mapping[str, Any]) -> str:
    """A record as a line of its own (into a pipe)."""
    verb = {"open": "opened", "update": "still open", "close": "closed"}[record["change"]]
    at = record["end_ms"] if record["change"] == "close" else record["last_window"]["end_ms"]
    why = f" ({record['close_reason']})" if record["change"] == "close" else ""
    return (
        f"{_hms(at)}  {record['device_id']} / {record['class']} {verb}{why}: since "
        f"{_hms(record['start_ms'])}, peak {record['peak_score']:.2f}, {record['windows']} windows"
    )


def incidents(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.incident_log import IncidentLog

    with (
        stop_on_signals(lambda _name: None) as stop,
        IncidentLog(settings.kafka, settings.topics.incidents) as log,
    ):
        follow(log.poll, log.caught_up, stop.is_set, args.json, args.once, sys.stdout)
    return 0


def follow(
    poll: Callable[[int], list[bytes]],
    caught_up: Callable[[], bool],
    stopped: Callable[[], bool],
    as_json: bool,
    once: bool,
    out: TextIO,
    clock: Clock = wall_clock_ms,
    redraw_s: float = REDRAW_S,
) -> Board:
    """Read records until `stopped` (or, with `once`, until caught up) and show them."""
    board = Board()
    live = out.isatty() and not as_json and not once
    shown_at = 0.0
    while not stopped():
        for value in poll(200):
            try:
                record = json.loads(value)
                news = board.add(record)
            except (ValueError, KeyError, TypeError):
                print(f"iotfuse incidents: skipped a record that is not one: {value[:80]!r}",
                      file=sys.stderr)  # fmt: skip
                continue
            if as_json:
                out.write(value.decode("utf-8", "replace") + "\n")
            elif not live and not once and news:
                out.write(one_line(record) + "\n")
        if once and caught_up():
            break
        if live and time.monotonic() - shown_at >= redraw_s:
            shown_at = time.monotonic()
            out.write("\x1b[H\x1b[2J" + "\n".join(board.lines(clock())) + "\n")
        out.flush()
    if once and not as_json:
        out.write("\n".join(board.lines(clock())) + "\n")
        out.flush()
    return board
