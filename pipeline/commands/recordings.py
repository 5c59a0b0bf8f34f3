"""`iotfuse record`, `iotfuse replay`, `iotfuse inspect`: recordings of Kafka topics."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pipeline.commands.common import bootstrap_arg, positive
from pipeline.commands.console import ProgressLine, stop_on_signals
from pipeline.errors import UserError
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.recordings.offline import OfflineResult


@contextmanager
def _user_errors(path: Path) -> Iterator[None]:
    from pipeline.recordings.file import RecordingError

    try:
        yield
    except RecordingError as exc:
        raise UserError(str(exc)) from exc
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from exc


def record_args(p: argparse.ArgumentParser) -> None:
    bootstrap_arg(p)
    p.add_argument(
        "--topics",
        nargs="+",
        required=True,
        metavar="TOPIC",
        help="topics to record (every partition)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="recording to write")
    until = p.add_mutually_exclusive_group()
    until.add_argument(
        "--duration",
        type=positive,
        metavar="SECONDS",
        help="stop after this long (default: until SIGINT/SIGTERM)",
    )
    until.add_argument(
        "--until-end",
        action="store_true",
        help="stop once every partition reached its end offset at start",
    )
    p.add_argument(
        "--from",
        dest="start",
        default="earliest",
        metavar="POSITION",
        help="earliest (default), latest or a timestamp in epoch milliseconds",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def record(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.record import RecordOptions, parse_start, record_to_file

    options = RecordOptions(
        tuple(args.topics), parse_start(args.start), args.duration, args.until_end
    )
    progress = ProgressLine("record", sys.stderr)
    with _user_errors(args.out), stop_on_signals() as stop:
        result = record_to_file(
            settings.kafka, options, args.out, stop, progress, overwrite=args.overwrite
        )
    progress.finish(result.records, result.bytes)
    why = {
        "end": "reached the end offsets",
        "duration": "duration elapsed",
        "stopped": "stopped by signal",
    }[result.stop_reason]
    print(
        f"recorded {result.records} records ({result.bytes / 1e6:.1f} MB) from"
        f" {result.partitions} partitions into {args.out} ({why})"
    )
    return 0


def replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="recording to replay")
    bootstrap_arg(p)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=positive,
        help="timing factor: 10 = ten times faster than recorded (default 1)",
    )
    pace.add_argument("--max-speed", action="store_true", help="send as fast as possible")
    p.add_argument(
        "--topic-map",
        nargs="+",
        action="extend",
        default=[],
        metavar="OLD=NEW",
        help="treat records of topic OLD as topic NEW (repeatable)",
    )
    off = p.add_argument_group("offline", "run the pipeline over the recording, no Kafka")
    off.add_argument(
        "--offline",
        action="store_true",
        help="decode, window, encode and classify here, as fast as possible,"
        " instead of publishing to Kafka (needs --out)",
    )
    off.add_argument(
        "--out",
        type=Path,
        metavar="EVENTS.jsonl",
        help="events, one JSON value per line, as `run` would publish them (- = stdout)",
    )
    off.add_argument(
        "--deadletters",
        type=Path,
        metavar="FILE.jsonl",
        help="rejected records, one JSON per line: key, topic, partition,"
        " offset, stage, reason, message",
    )
    off.add_argument("--model", metavar="DIR", help="model directory (default: shipped model)")
    off.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:N")
    off.add_argument("--overwrite", action="store_true", help="replace existing output files")


def replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.offline:
        return _replay_offline(args, settings)
    misplaced = [
        flag
        for flag, value in (
            ("--out", args.out),
            ("--deadletters", args.deadletters),
            ("--model", args.model),
            ("--device", args.device),
            ("--overwrite", args.overwrite or None),
        )
        if value is not None
    ]
    if misplaced:
        raise UserError(
            f"{', '.join(misplaced)} only apply with --offline (run the pipeline"
            " here); to publish to Kafka leave them out"
        )
    from pipeline.kafka.replay import ReplayOptions, parse_topic_map, prepare, replay_to_kafka

    options = ReplayOptions(
        None if args.max_speed else (args.speed or 1.0), parse_topic_map(args.topic_map)
    )
    with _user_errors(args.file):
        scan = prepare(args.file, settings.kafka, options)
        progress = ProgressLine("replay", sys.stderr, total=scan.records)
        with stop_on_signals() as stop:
            result = replay_to_kafka(args.file, settings.kafka, options, stop, progress, scan=scan)
    progress.finish(result.records, result.bytes)
    note = " (stopped by signal before the end)" if result.stopped else ""
    print(
        f"replayed {result.records} records ({result.bytes / 1e6:.1f} MB) from {args.file}"
        f" in {result.elapsed_s:.1f} s{note}"
    )
    if result.skipped:
        print(
            f"warning: skipped {result.skipped} records with neither key nor value"
            " (kafka-python cannot send those)",
            file=sys.stderr,
        )
    if result.truncated_at is not None:
        print(
            f"warning: {args.file} is cut short at byte {result.truncated_at} (a crash while"
            " recording?): replayed its records up to the last whole block",
            file=sys.stderr,
        )
    return 0


def _open_output(path: Path, overwrite: bool, stack: ExitStack) -> TextIO:
    if str(path) == "-":
        return sys.stdout
    try:
        return stack.enter_context(open(path, "w" if overwrite else "x", encoding="utf-8"))
    except FileExistsError:
        raise UserError(f"{path} already exists: choose another path or pass --overwrite") from None
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _replay_offline(args: argparse.Namespace, settings: Settings) -> int:
    if args.out is None:
        raise UserError("--offline needs --out EVENTS.jsonl (or --out - for stdout)")
    if args.speed is not None:
        raise UserError(
            "--speed does not apply with --offline (it always runs as fast as"
            " the machine allows); leave it out"
        )
    from pipeline.kafka.replay import parse_topic_map, scan_recording
    from pipeline.recordings.offline import replay_offline
    from pipeline.stream.assembly import build_engine
    from pipeline.stream.model_runner import ModelRunner

    topic_map = parse_topic_map(args.topic_map)
    with _user_errors(args.file):
        total = scan_recording(args.file).records  # also fails early on a bad file
    runner = ModelRunner.load(settings.runtime.model or None, settings.runtime.device)
    engine = build_engine(settings, runner)
    progress = ProgressLine("replay --offline", sys.stderr, total=total)
    with ExitStack() as stack:
        events = _open_output(args.out, args.overwrite, stack)
        dead = (
            _open_output(args.deadletters, args.overwrite, stack)
            if args.deadletters is not None
            else None
        )
        with _user_errors(args.file):
            result = replay_offline(
                args.file,
                engine,
                events,
                dead,
                topic_map=topic_map,
                progress=lambda c: progress(c.records, c.bytes, c.events),
            )
    c = result.counts
    progress.finish(c.records, c.bytes, c.events)
    _offline_summary(args, result, engine.metrics.value("iotfuse_late_records_total"))
    return 0


def _offline_summary(args: argparse.Namespace, result: OfflineResult, late: float) -> None:
    c = result.counts
    where = f" into {args.deadletters}" if args.deadletters is not None else ""
    print(
        f"replayed {c.records} records from {args.file} offline in {result.elapsed_s:.1f} s:"
        f" {c.events} events into {args.out}, {c.dead_letters} dead letters{where},"
        f" {late:.0f} late records dropped",
        file=sys.stderr,
    )
    if c.dead_letters and args.deadletters is None:
        print(
            "note: pass --deadletters FILE.jsonl to see why records were rejected", file=sys.stderr
        )
    if c.records and not c.inputs:
        seen = ", ".join(sorted(c.other_topics))
        print(
            f"warning: none of the recording's topics ({seen}) is an input topic of the"
            " pipeline: map them with --topic-map OLD=NEW (e.g. t.camera=iot.camera) or"
            " set topics.camera/audio/telemetry",
            file=sys.stderr,
        )
    if result.truncated_at is not None:
        print(
            f"warning: {args.file} is cut short at byte {result.truncated_at} (a crash while"
            " recording?): processed its records up to the last whole block",
            file=sys.stderr,
        )


def inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="recording to inspect")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw a timeline into this PNG")
    p.add_argument("--max-devices", type=int, default=40, help="timeline rows at most")


def inspect(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.recordings.inspect import format_table, inspect_recording, plot_timeline, to_json

    with _user_errors(args.file):
        info = inspect_recording(
            args.file,
            settings.topics,
            timeline_bins=600 if args.plot else None,
            max_devices=args.max_devices,
        )
    print(json.dumps(to_json(info), indent=2) if args.json else format_table(info))
    if args.plot:
        if info.timeline is None:
            raise UserError(f"{args.file} holds no records: nothing to plot")
        with _user_errors(args.plot):
            plot_timeline(info, args.plot)
        print(f"timeline written to {args.plot}", file=sys.stderr)
    return 0
