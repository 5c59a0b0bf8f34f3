"""`iotfuse explain`: what in the camera, the audio and the telemetry made a window's label.

    iotfuse explain --data run.iotrec --device cell-01 --at 2026-01-01T00:00:10Z --out expl/
    iotfuse explain --data run.iotrec --event event.json --out expl/     # '-': stdin
    iotfuse explain --data run.iotrec --class fire --limit 8 --out expl/

Writes `<stem>.png` (the report a person reads) and `<stem>.json` (the numbers) into --out;
the methods and baselines are in pipeline/learn/explain.py and fusion/explain.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.commands.common import count
from pipeline.errors import UserError
from pipeline.settings import Settings


def explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", type=Path, required=True, metavar="REC", help="the recording with the inputs"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--device",
        dest="device_id",
        metavar="ID",
        help="the device of the window (with --at); the torch device is --set runtime.device=",
    )
    which.add_argument(
        "--event",
        metavar="FILE",
        help="an event JSON of iot.events ('-': read it from stdin); explains its window",
    )
    which.add_argument(
        "--class",
        dest="label",
        metavar="CLASS",
        help="explain the --limit windows the model labels CLASS most confidently",
    )
    p.add_argument(
        "--at",
        metavar="TIME",
        help="with --device: a time inside the window, epoch ms or ISO 8601 (UTC by default)",
    )
    p.add_argument("--limit", type=count, default=6, help="with --class: windows (default 6)")
    p.add_argument("--model", metavar="DIR", help="model directory (default: shipped model)")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where the PNG and JSON go"
    )


def _read_event(source: str) -> tuple[str, int, dict[str, Any]]:
    """(device id, window start, the event) of one iot.events value."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UserError(f"cannot read --event {source}: {exc}") from exc
    try:
        event = json.loads(text)
        return str(event["device_id"]), int(event["window"]["start_ms"]), event
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"--event {source} holds no iot.events value (a JSON object with device_id and "
            "window.start_ms); pass one event, as `kcat -C -t iot.events -f '%s\\n' -c 1` prints"
        ) from None


def explain(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.learn.explain import (
        MAX_WINDOWS,
        explain_windows,
        most_confident,
        parse_time,
        window_at,
    )
    from pipeline.learn.explain_report import write_report
    from pipeline.recordings.file import RecordingError, read_records
    from pipeline.stream.model_runner import ModelRunner

    if args.device_id is not None and args.at is None:
        raise UserError("--device needs --at TIME: a time inside the window to explain")
    if args.label is not None and args.limit > MAX_WINDOWS:
        raise UserError(f"--limit {args.limit}: one report holds at most {MAX_WINDOWS} windows")
    if not args.data.exists():
        raise UserError(f"recording {args.data} does not exist")
    runner = ModelRunner.load(settings.runtime.model or None, settings.runtime.device)
    if runner.exported:
        raise UserError(
            "explain needs the torch model (gradients, Captum); an exported ONNX model has "
            "neither: pass --model with the directory it was exported from"
        )
    event: dict[str, Any] | None = None
    try:
        records = read_records(args.data)
        if args.label is not None:
            windows = most_confident(records, settings, runner, args.label, args.limit)
            stem = f"explain-{args.label}-top{len(windows)}"
        else:
            if args.event is not None:
                name, start, event = _read_event(args.event)
            else:
                name, start = args.device_id, parse_time(args.at)
            windows = [window_at(records, settings, runner.features, name, start)]
            stem = f"explain-{name}-{windows[0].start_ms}"
    except (RecordingError, OSError) as exc:
        raise UserError(f"cannot read recording {args.data}: {exc}") from exc
    print(f"explaining {len(windows)} window(s) with model {runner.model_id.name} ...", flush=True)
    explanations = explain_windows(runner, windows)
    png, data = write_report(args.out, stem, runner, explanations)
    for e in explanations:
        top = ", ".join(f"{n} {v:+.3f}" for n, v in e.ranking()[:3])
        print(
            f"{e.window.device_id} {e.window.start_ms}: {e.label} {e.confidence:.3f}"
            + (f" (truth {e.window.truth})" if e.window.truth else "")
            + (f"; telemetry (log-odds): {top}" if top else "")
        )
    if event is not None:
        for note in _event_notes(event, explanations[0].label, runner.model_id.version):
            print(f"note: {note}")
    print(f"wrote {png} and {data}")
    return 0


def _event_notes(event: dict[str, Any], label: str, version: str) -> list[str]:
    """Where the event and this explanation may disagree, said plainly."""
    notes = []
    got = event.get("model", {}).get("version") if isinstance(event.get("model"), dict) else None
    if got is not None and got != version:
        notes.append(
            f"the event came from model {got[:19]}, this explanation from {version[:19]}: "
            "pass --model with the model that produced the event"
        )
    if event.get("label") is not None and event.get("label") != label:
        notes.append(
            f"the event says {event.get('label')}, the model says {label} now: the recording "
            "may hold records the worker had not read (or found late) when it published"
        )
    return notes
