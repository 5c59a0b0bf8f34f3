"""`iotfuse train`: one model trained centrally from recordings, in one process, in
several data-parallel ones (`--nproc N`, or as torchrun's processes), or with DP-SGD
(`--dp-epsilon`). The recipe's parts are in pipeline.learn.training.

    summary = train_from_recordings(TrainOptions(data=(Path("train.iotrec"),), out=Path("m")),
                                    settings, stream=sys.stderr)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, TextIO

from pipeline.errors import UserError
from pipeline.learn.dataset import OnRecords
from pipeline.learn.training import (
    EpochBar,
    TrainOptions,
    TrainSummary,
    class_counts,
    labelled_examples,
    prepare,
    train_config,
    training_examples,
)
from pipeline.settings import Settings


def _check_out(options: TrainOptions) -> None:
    out = options.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the model")
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise UserError(f"--out {out} is not empty; choose a new directory or pass --overwrite")


def train_from_recordings(
    options: TrainOptions,
    settings: Settings,
    stream: TextIO | None = None,
    on_records: OnRecords | None = None,
) -> TrainSummary:
    """Train and write the model directory; with options.nproc > 1 (and not already one of
    torchrun's processes) in that many data-parallel processes."""
    from pipeline.learn import distributed

    _check_out(options)
    process = distributed.from_env()
    if process is None and options.nproc > 1:
        if options.dp is not None:
            raise UserError("--nproc and --dp-epsilon cannot be combined; choose one")
        show = stream is not None
        summary: TrainSummary = distributed.launch(
            options.nproc, _process_main, options, settings, show
        )
        return summary
    return _train(options, settings, stream, on_records, process)


def _process_main(options: TrainOptions, settings: Settings, show: bool) -> TrainSummary:
    """One of `launch`'s processes (spawned: logging and threads are set up anew)."""
    import sys

    from pipeline.learn import distributed
    from pipeline.logs import setup_logging

    setup_logging(settings.runtime.log_level, settings.runtime.log_format)
    process = distributed.from_env()
    return _train(options, settings, sys.stderr if show else None, None, process)


def _train(
    options: TrainOptions,
    settings: Settings,
    stream: TextIO | None,
    on_records: OnRecords | None,
    process: Any,
) -> TrainSummary:
    import torch

    from fusion.model import FusionClassifier
    from fusion.modelfile import save_model
    from fusion.train import train
    from pipeline.learn import distributed, privacy
    from pipeline.stream.model_runner import resolve_device

    device = resolve_device(options.device)
    group = None
    if process is not None:
        if device.type == "cuda":
            device = torch.device("cuda", process.local_rank)
        group = distributed.DDPGroup(process, device)
        if not process.leader:
            stream = on_records = None  # one process speaks and writes
    try:
        prep = prepare(options, settings, on_records)
        classes = prep.classes
        train_data = labelled_examples(prep.train, classes)
        val_data = labelled_examples(prep.val, classes)
        _say(
            stream,
            f"train: {len(prep.train) + len(prep.val)} windows ({len(prep.train)} training, "
            f"{len(prep.val)} validation) in {prep.window_seconds:.0f} s; classes "
            f"{list(classes)}; {class_counts(prep.train, classes)}; device {device}"
            + (f"; {process.world} processes (DDP)" if process is not None else ""),
        )
        torch.manual_seed(options.seed)
        model = FusionClassifier(prep.config)
        init_version = ""
        if prep.start is not None:
            model.load_state_dict(prep.start.model.state_dict())
            init_version = prep.start.version
            _say(stream, f"train: starting from --init {options.init} ({init_version})")
        dp = None
        if options.dp is not None:
            dp = privacy.calibrate(
                options.dp,
                len(train_data),
                options.batch_size,
                options.epochs,
                options.seed,
                fine_tune=options.init is not None,
            )
            _say(stream, privacy.dp_layers(model))
            _say(stream, privacy.describe(dp, options.dp))
            _say(stream, privacy.delta_warning(options.dp, len(train_data)))
        bar = EpochBar(stream)
        leader = process is None or process.leader

        def progress(step: Any) -> None:
            if bar(step) and leader:
                save_model(model, options.out)  # checkpoint: the best epoch so far

        seed = options.seed if process is None else options.seed * 1000 + process.rank
        examples = training_examples(train_data, prep.config, options.augment, seed)
        started = time.monotonic()
        result = train(
            model,
            examples,
            val_data,
            train_config(options, str(device)),
            progress,
            recipe=None if dp is None else dp.recipe,
            parallel=group,
        )
        seconds = time.monotonic() - started
        if dp is not None and options.dp is not None:
            record = privacy.privacy_record(options.dp, dp, init_version=init_version)
            model.config = dataclasses.replace(model.config, privacy=record)
            _say(stream, f"dp: spent epsilon {record.epsilon:.3f} (delta {record.delta:g})")
        version = save_model(model, options.out) if leader else ""
        if group is not None:
            group.barrier()
    finally:
        if group is not None:
            group.close()
    return TrainSummary(
        out=options.out,
        version=version,
        classes=classes,
        train_windows=len(prep.train),
        val_windows=len(prep.val),
        best_epoch=result.best_epoch,
        best_val_macro_f1=result.best_val_macro_f1,
        seconds=seconds,
        window_seconds=prep.window_seconds,
        history=[dataclasses.asdict(h) for h in result.history],
        epsilon=None if dp is None or options.dp is None else dp.epsilon(options.dp.delta),
    )


def _say(stream: TextIO | None, line: str | None) -> None:
    if stream is not None and line:
        stream.write(line + "\n")
        stream.flush()
