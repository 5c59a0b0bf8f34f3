"""`iotfuse` command line: one subcommand per job, all sharing one settings object.

Every subcommand accepts `--config FILE` (TOML) and `--set SECTION.FIELD=VALUE`; named
flags such as `--bootstrap-servers` are shorthands for settings (see docs/configuration.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.settings import Settings, SettingsError, load_settings, parse_assignments

Handler = Callable[[argparse.Namespace, Settings], int]

# flag dest -> (section, field): named flags that are shorthands for settings
SETTING_FLAGS: dict[str, tuple[str, str]] = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "group_id": ("kafka", "group_id"),
    "exactly_once": ("kafka", "exactly_once"),
    "transactional_id": ("kafka", "transactional_id"),
    "model": ("runtime", "model"),
    "device": ("runtime", "device"),
    "metrics_port": ("runtime", "metrics_port"),
    "max_batch": ("runtime", "max_batch"),
    "log_level": ("runtime", "log_level"),
    "partitions": ("topics", "partitions"),
    "replication_factor": ("topics", "replication_factor"),
    "idle_timeout_ms": ("windows", "idle_timeout_ms"),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any setting (repeatable)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")


def settings_from_args(args: argparse.Namespace) -> Settings:
    cli: dict[str, dict[str, Any]] = parse_assignments(getattr(args, "set", []) or [])
    for dest, (section, name) in SETTING_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            cli.setdefault(section, {})[name] = value
    return load_settings(getattr(args, "config", None), cli=cli)


def build_parser() -> argparse.ArgumentParser:
    from pipeline import commands

    parser = argparse.ArgumentParser(
        prog="iotfuse",
        description="Fuse camera, audio and telemetry streams from Kafka into classified events.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, handler) in commands.COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


STREAMING_COMMANDS = frozenset({"run", "replay", "demo"})


def torch_threads(setting: int, command: str) -> int | None:
    """runtime.torch_threads for this command; None: leave torch's default (all cores).

    0 (auto) gives the streaming commands half the cores: the other half decode frames and
    run the Kafka client, and torch's threads stall at every operator when one of them
    waits for a core (on 2 cores, 1 thread drained a backlog ~10% faster than 2)."""
    if setting > 0:
        return setting
    if command in STREAMING_COMMANDS:
        return max(1, len(os.sched_getaffinity(0)) // 2)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The iotfuse command; `argv` None: this process's own command line (then `run` may
    start the process again on jemalloc: pipeline/commands/allocator.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"iotfuse: {exc}", file=sys.stderr)
        return 2
    from pipeline.logs import setup_logging

    setup_logging(settings.runtime.log_level, settings.runtime.log_format)
    if args.command == "run":
        from pipeline.commands.allocator import choose

        try:  # only the iotfuse command itself (argv None) may start again on jemalloc
            choose(settings.runtime.allocator, may_restart=argv is None)
        except UserError as exc:
            print(f"iotfuse run: {exc}", file=sys.stderr)
            return 1
    threads = torch_threads(settings.runtime.torch_threads, args.command)
    if threads:  # the process's CPU budget for inference (torch, ONNX Runtime)
        from pipeline.stream.model_runner import set_inference_threads

        set_inference_threads(threads)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"iotfuse {args.command}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # an edge install (no torch) asked to train, ...
        if exc.name not in ("torch", "torchaudio", "transformers"):
            raise
        from pipeline.stream.model_runner import TORCH_MISSING

        print(f"iotfuse {args.command}: this needs {exc.name}: {TORCH_MISSING}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
