"""`iotfuse export`: a torch model directory -> an exported model directory (ONNX).

The graph (fusion/export.py) is checked before anything is written: on windows of
simulated devices, built by the live pipeline's own code path, and on the same windows
with modalities left out (so the masking of absent modalities and their zero attribution
are checked too), the exported model's probabilities, labels and attributions must match
the torch model's as `iotfuse run` serves it (TOLERANCE, MIN_LABEL_AGREEMENT).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.modality import Modality
from pipeline.errors import UserError
from pipeline.settings import Settings
from pipeline.stream.features import FeatureSpec

VERIFY_SEED = 7  # the simulated devices of the check (any seed; fixed: the same check)
VERIFY_DEVICES, VERIFY_SECONDS = 4, 20.0


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    model: Path | None  # None: the shipped default model
    out: Path
    quantize: str = "none"
    overwrite: bool = False


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    version: str
    source: str
    verified: dict[str, Any]
    graph_bytes: int


def verification_windows(spec: FeatureSpec, settings: Settings) -> list[dict[Modality, np.ndarray]]:
    """Windows of simulated devices, then each again with a subset of its modalities."""
    from pipeline.learn.dataset import labelled_windows
    from pipeline.simulate.scenario import ScenarioConfig
    from pipeline.simulate.stream import simulate
    from pipeline.stream.assembly import window_config
    from pipeline.stream.ingest import IngestConfig

    scenario = ScenarioConfig(seed=VERIFY_SEED, devices=VERIFY_DEVICES, duration_s=VERIFY_SECONDS)
    ingest = IngestConfig.from_settings(settings.topics, settings.limits, spec.sample_rate)
    got = labelled_windows(
        simulate(scenario),
        ingest,
        window_config(settings, spec.window_ms),
        spec,
        scenario.topics["labels"],
    )
    full = [w.inputs for w in got]
    subsets = [
        set(s)
        for k in range(1, len(spec.modalities))
        for s in itertools.combinations(spec.modalities, k)
    ]
    partial = [
        {m: x for m, x in window.items() if m in keep}
        for window, keep in zip(full, itertools.cycle(subsets or [set(spec.modalities)]))
    ]
    return full + [w for w in partial if w]


def export_directory(options: ExportOptions, settings: Settings) -> ExportSummary:
    from pipeline.stream.model_runner import default_model_dir, import_torch

    import_torch()  # exporting reads the torch model: a one-line error without torch
    from fusion.export import UnexportableModel, check_exportable, export_model, write_exported
    from fusion.modelfile import load_model
    from pipeline.stream import onnx_runner

    source = options.model or default_model_dir()
    if onnx_runner.is_exported(source):
        raise UserError(
            f"{source} is already an exported model; export the torch model it came from"
        )
    out = options.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the exported model")
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise UserError(f"--out {out} is not empty; choose a new directory or pass --overwrite")
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the model's own directory; choose another one")
    try:
        loaded = load_model(source)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot load the model in {source}: {exc}") from exc
    try:
        check_exportable(loaded.model)  # before the simulation: say it at once
        windows = verification_windows(FeatureSpec.from_model_config(loaded.config), settings)
        graph, manifest = export_model(loaded.model, loaded.version, windows, options.quantize)
    except UnexportableModel as exc:
        raise UserError(f"cannot export {source}: {exc}") from exc
    try:
        version = write_exported(out, graph, manifest)
    except OSError as exc:
        raise UserError(f"cannot write the exported model into {out}: {exc}") from exc
    return ExportSummary(out, version, loaded.version, manifest["verified"], len(graph))
