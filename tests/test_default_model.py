"""The default model shipped in fusion/default_model: intact, the simulator's classes, useful."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from encoders.modality import ALL_MODALITIES
from fusion.modelfile import load_model
from pipeline.learn.dataset import windows_from_recordings
from pipeline.learn.evaluation import evaluate_windows, model_classifier
from pipeline.learn.training import DEFAULT_METRICS
from pipeline.settings import Settings
from pipeline.simulate import CLASSES, ScenarioConfig, simulate
from pipeline.stream.model_runner import ModelRunner, default_model_dir


def test_the_shipped_model_loads_and_its_hash_is_its_version() -> None:
    directory = default_model_dir()
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    weights = (directory / "model.safetensors").read_bytes()
    assert len(weights) < 20 * 1024 * 1024
    digest = hashlib.sha256(weights).hexdigest()
    assert json.loads((directory / "config.json").read_text())["weights_sha256"] == digest
    loaded = load_model(directory)
    assert loaded.version == f"sha256:{digest}"
    assert loaded.config.classes == CLASSES
    assert loaded.config.modalities == ALL_MODALITIES
    assert loaded.config.telemetry is not None
    assert loaded.config.telemetry.metrics == DEFAULT_METRICS
    assert loaded.config.telemetry.std != (1.0,) * len(DEFAULT_METRICS)  # fitted, not default
    runner = ModelRunner.load(None, "cpu")  # what `iotfuse run` and `demo` use by default
    assert runner.version == loaded.version


def test_the_shipped_model_classifies_unseen_simulated_windows(tmp_path: Path) -> None:
    from pipeline.recordings.file import RecordingWriter

    path = tmp_path / "held-out.iotrec"  # a seed the default model was not trained on
    with RecordingWriter(path) as writer:
        for record in simulate(ScenarioConfig(seed=4242, devices=2, duration_s=40)):
            writer.write(record)
    runner = ModelRunner.load(None, "cpu")
    windows = windows_from_recordings([path], Settings(), runner.features)
    got = evaluate_windows(
        model_classifier(runner.model, 64),
        windows,
        runner.config.classes,
        runner.config.modalities,
        with_ablation=False,
    )
    assert got["windows"] == 40
    assert got["accuracy"] >= 0.7  # chance is 1/6; the held-out bar is macro-F1 >= 0.9
