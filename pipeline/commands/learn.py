"""`iotfuse simulate`, `iotfuse train`, `iotfuse evaluate`: data, models and their scores.

    iotfuse simulate --seed 1 --devices 120 --duration 60 --out train.iotrec
    iotfuse train --data train.iotrec --out model/ --epochs 30 --seed 0
    iotfuse evaluate --model model/ --data test.iotrec --out report/ --compare other/

simulate writes a recording (deterministic: the same arguments give the same bytes) or
produces to the input and labels topics, paced by the record timestamps (`--speed`).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.commands.common import count, positive
from pipeline.errors import UserError
from pipeline.records import OnCounts, Record, record_size
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.learn.privacy import DPOptions

# --- simulate ----------------------------------------------------------------------------


def simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, required=True, help="scenario seed (same seed, same data)")
    p.add_argument("--devices", type=count, required=True, help="simulated devices")
    p.add_argument(
        "--duration",
        type=positive,
        required=True,
        metavar="SECONDS",
        help="simulated seconds per device",
    )
    p.add_argument(
        "--profile",
        choices=("train", "unseen"),
        default="train",
        help="device hardware profile; 'unseen' draws setups training never sees",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, metavar="FILE", help="write a recording file")
    target.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="produce to the input and labels topics of this Kafka",
    )
    p.add_argument(
        "--speed",
        type=positive,
        default=1.0,
        help="Kafka only: timing factor, 10 = ten times faster than real time",
    )
    p.add_argument("--max-speed", action="store_true", help="Kafka only: no pacing at all")
    p.add_argument(
        "--start-ms",
        type=int,
        metavar="EPOCH_MS",
        help="first timestamp (default: 2026-01-01T00:00Z for --out, now for Kafka)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def simulate(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands.console import ProgressLine, stop_on_signals
    from pipeline.kafka.produce import simulate_to_kafka
    from pipeline.simulate import ScenarioConfig
    from pipeline.simulate import simulate as scenario_records

    t = settings.topics
    start = args.start_ms
    if start is None and args.out is None:  # live: stamp the records with the present
        start = time.time_ns() // 1_000_000
    kw = {} if start is None else {"start_ms": start}
    try:
        cfg = ScenarioConfig(
            seed=args.seed,
            devices=args.devices,
            duration_s=args.duration,
            profile=args.profile,
            **kw,
            topics={
                "camera": t.camera,
                "audio": t.audio,
                "telemetry": t.telemetry,
                "labels": t.labels,
            },
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    progress = ProgressLine("simulate", sys.stderr)
    with stop_on_signals() as stop:
        if args.out is not None:
            n, size = simulate_to_file(
                scenario_records(cfg), args.out, args.overwrite, stop, progress
            )
            where = str(args.out)
        else:
            n, size = simulate_to_kafka(
                scenario_records(cfg),
                settings,
                None if args.max_speed else args.speed,
                stop,
                progress,
            )
            where = f"Kafka {settings.kafka.bootstrap_servers}"
    progress.finish(n, size)
    note = " (stopped by signal before the end)" if stop.is_set() else ""
    print(
        f"simulated {n} records ({size / 1e6:.1f} MB) of {args.devices} devices x "
        f"{args.duration:g} s (seed {args.seed}, profile {args.profile}) into {where}{note}"
    )
    return 0


def simulate_to_file(
    records: Iterable[Record], out: Path, overwrite: bool, stop: threading.Event, progress: OnCounts
) -> tuple[int, int]:
    """Write records to a new recording; returns (records, bytes)."""
    from pipeline.recordings.file import RecordingError, RecordingWriter

    n = size = 0
    try:
        with RecordingWriter(out, overwrite=overwrite) as writer:
            for record in records:
                if stop.is_set():
                    break
                writer.write(record)
                n, size = n + 1, size + record_size(record)
                progress(n, size)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    except (RecordingError, OSError) as exc:
        raise UserError(f"cannot write {out}: {exc}") from exc
    return n, size


# --- train -------------------------------------------------------------------------------


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        metavar="REC",
        help="labelled recordings (labels on the labels topic)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="MODEL_DIR",
        help="model directory to write (the best epoch, rewritten as it improves)",
    )
    p.add_argument(
        "--modalities",
        default="camera,audio,telemetry",
        help="comma-separated; one modality trains a single-modality baseline",
    )
    p.add_argument("--epochs", type=count, default=30, help="passes over the training windows")
    p.add_argument("--seed", type=int, default=0, help="weights, shuffling and dropout seed")
    p.add_argument("--batch-size", type=count, default=32, help="windows per training step")
    p.add_argument("--lr", type=positive, default=1e-3, help="AdamW learning rate")
    p.add_argument("--device", help="torch device: auto (CUDA when present, default), cpu, cuda")
    p.add_argument(
        "--name", default="", help="model name (default: iotfuse-<modalities>, or --init's)"
    )
    p.add_argument(
        "--metrics", help="telemetry metric names, comma-separated (default: the simulator's five)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the devices held out for validation (with fewer devices "
        "than 1/share: of each device's time blocks)",
    )
    p.add_argument(
        "--val-block-s",
        type=positive,
        default=30.0,
        help="length of the held-out time blocks, seconds",
    )
    p.add_argument(
        "--modality-dropout",
        type=float,
        help="chance to drop each present modality of a training window (default 0.25)",
    )
    p.add_argument(
        "--no-absent-views",
        action="store_true",
        help="train only on the dropout view (default: also each window with each of its "
        "modalities removed in turn, for a dead camera, microphone or sensor)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="train on the camera frames as recorded (default: mirrored, "
        "recoloured anew every epoch)",
    )
    p.add_argument(
        "--camera-hf", metavar="DIR", help="local transformers vision model as the camera trunk"
    )
    p.add_argument("--audio-hf", metavar="DIR", help="local transformers AST as the audio trunk")
    p.add_argument(
        "--freeze-hf",
        action="store_true",
        help="freeze the transformers trunks (train heads and fusion only)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument(
        "--init",
        type=Path,
        metavar="MODEL_DIR",
        help="start from this model's weights and keep its config (classes, windows, "
        "telemetry normalisation; --modalities, --metrics and the hf trunks then do not "
        "apply): fine-tune a public model, e.g. the shipped one, on these recordings",
    )
    p.add_argument(
        "--nproc",
        type=count,
        default=1,
        help="data-parallel training processes on this machine (DDP; under torchrun, "
        "torchrun's processes are used instead)",
    )
    dp_args(p)


def dp_args(p: argparse.ArgumentParser) -> None:
    """--dp-epsilon/--dp-delta/--dp-max-grad-norm (train, federate)."""
    p.add_argument(
        "--dp-epsilon",
        type=positive,
        metavar="E",
        help="train with DP-SGD (Opacus) to (E, delta)-differential privacy per training "
        "window; swaps BatchNorm for GroupNorm",
    )
    p.add_argument(
        "--dp-delta", type=positive, default=1e-5, metavar="D", help="DP delta (default 1e-5)"
    )
    p.add_argument(
        "--dp-max-grad-norm",
        type=positive,
        default=1.0,
        metavar="C",
        help="DP-SGD: clip each window's gradient to this L2 norm (default 1.0)",
    )


def dp_options(args: argparse.Namespace) -> DPOptions | None:
    from pipeline.learn.privacy import DPOptions

    if args.dp_epsilon is None:
        return None
    return DPOptions(
        epsilon=args.dp_epsilon, delta=args.dp_delta, max_grad_norm=args.dp_max_grad_norm
    )


def train(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands.console import ProgressLine
    from pipeline.learn.central import train_from_recordings
    from pipeline.learn.training import DEFAULT_METRICS, TrainOptions, parse_modalities

    metrics = (
        tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        if args.metrics
        else DEFAULT_METRICS
    )
    options = TrainOptions(
        data=tuple(args.data),
        out=args.out,
        modalities=parse_modalities(args.modalities),
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        device=settings.runtime.device,
        name=args.name,
        metrics=metrics,
        val_fraction=args.val_fraction,
        val_block_ms=round(args.val_block_s * 1000),
        modality_dropout=args.modality_dropout,
        absent_views=not args.no_absent_views,
        camera_hf=args.camera_hf,
        audio_hf=args.audio_hf,
        freeze_hf=args.freeze_hf,
        augment=not args.no_augment,
        overwrite=args.overwrite,
        dp=dp_options(args),
        init=args.init,
        nproc=args.nproc,
    )
    try:
        summary = train_from_recordings(
            options, settings, sys.stderr, ProgressLine("reading", sys.stderr)
        )
    except ValueError as exc:  # a model config or training option the user must change
        raise UserError(str(exc)) from exc
    if not summary.version:  # one of torchrun's processes, not rank 0: rank 0 reports
        return 0
    print(
        f"trained {summary.out} ({summary.version}): best epoch {summary.best_epoch} with "
        f"validation macro-F1 {summary.best_val_macro_f1:.3f}; {summary.train_windows} "
        f"training and {summary.val_windows} validation windows; windows "
        f"{summary.window_seconds:.0f} s, training {summary.seconds:.0f} s"
        + ("" if summary.epsilon is None else f"; DP epsilon spent {summary.epsilon:.3f}")
    )
    return 0


# --- evaluate ----------------------------------------------------------------------------


def evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL_DIR", help="model to score (default: shipped)")
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        metavar="REC",
        help="labelled recordings to score on",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="REPORT_DIR",
        help="directory for metrics.json, confusion_matrix.png and report.md",
    )
    p.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=[],
        metavar="MODEL_DIR",
        help="other models to score on the same data, shown in the same report",
    )
    p.add_argument("--device", help="torch device: auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=count, default=64, help="windows per forward pass")


def evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.commands.console import ProgressLine
    from pipeline.learn.evaluation import EvalOptions, evaluate_recordings
    from pipeline.learn.report import write_report

    options = EvalOptions(
        model=Path(settings.runtime.model) if settings.runtime.model else None,
        data=tuple(args.data),
        compare=tuple(args.compare),
        device=settings.runtime.device,
        batch_size=args.batch_size,
    )
    metrics = evaluate_recordings(options, settings, ProgressLine("reading", sys.stderr))
    try:
        paths = write_report(args.out, metrics)
    except OSError as exc:
        raise UserError(f"cannot write the report into {args.out}: {exc}") from exc
    parts = [f"macro-F1 {metrics['macro_f1']:.3f}", f"accuracy {metrics['accuracy']:.3f}"]
    parts += [f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("without_", "only_"))]
    parts += [f"{c['name']} {c['macro_f1']:.3f}" for c in metrics["compare"]]
    print(f"{metrics['model']['name']} on {metrics['windows']} windows: " + ", ".join(parts))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
