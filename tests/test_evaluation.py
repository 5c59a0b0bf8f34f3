"""`iotfuse evaluate`: metrics of known predictions, modality masking, the report files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.config import FusionConfig, ModelConfig, TelemetryConfig
from fusion.model import FusionClassifier
from fusion.modelfile import save_model
from pipeline.cli import main
from pipeline.learn.dataset import LabelledWindow
from pipeline.learn.evaluation import (
    Inputs,
    ablation,
    best_single_modality,
    evaluate_windows,
    keep_modalities,
    merged_spec,
    scores,
)
from pipeline.learn.report import report_markdown, write_report
from pipeline.learn.training import DEFAULT_METRICS
from pipeline.simulate import CLASSES
from pipeline.stream.features import FeatureSpec
from tests.factory import T0

C, A, T = Modality.CAMERA, Modality.AUDIO, Modality.TELEMETRY


def test_scores_of_a_known_confusion() -> None:
    # true:  a a a a b b c c ; pred: a a a b b c c a
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 2, 2, 0]
    s = scores(y_true, y_pred, ("a", "b", "c"))
    assert s["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert s["accuracy"] == pytest.approx(5 / 8) and s["windows"] == 8
    a, b, c = (s["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(3 / 4), 3 / 4, 4)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 0.5, 0.5)
    assert s["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)


class RecordingClassifier:
    """Predicts class 1 when telemetry is present, else 0; remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[frozenset[Modality]]] = []

    def __call__(self, windows: Sequence[Inputs]) -> np.ndarray:
        self.calls.append([frozenset(w) for w in windows])
        return np.array([1 if T in w else 0 for w in windows])


def _inputs(*mods: Modality) -> dict[Modality, np.ndarray]:
    return {m: np.zeros(1, np.float32) for m in mods}


def test_ablation_removes_modalities_from_the_inputs_and_skips_emptied_windows() -> None:
    windows = [_inputs(C, A, T), _inputs(C, A, T), _inputs(C, T), _inputs(A)]
    y_true = np.array([1, 1, 1, 0])
    fake = RecordingClassifier()
    got = ablation(fake, windows, y_true, ALL_MODALITIES, ("x", "y"))
    assert list(got) == [
        "without_camera",
        "only_camera",
        "without_audio",
        "only_audio",
        "without_telemetry",
        "only_telemetry",
    ]
    assert fake.calls == [
        [frozenset({A, T})] * 2 + [frozenset({T}), frozenset({A})],  # without camera
        [frozenset({C})] * 3,  # only camera: the audio-only window is left out
        [frozenset({C, T})] * 3,  # without audio: likewise
        [frozenset({A})] * 2 + [frozenset({A})],  # only audio: the camera+telemetry one out
        [frozenset({C, A})] * 2 + [frozenset({C}), frozenset({A})],  # without telemetry
        [frozenset({T})] * 3,  # only telemetry
    ]
    assert got["without_camera"]["macro_f1"] == 1.0 and got["only_telemetry"]["accuracy"] == 1.0
    assert got["only_camera"]["windows"] == 3 and got["only_camera"]["accuracy"] == 0.0
    # without telemetry: all four predicted 0, three of them wrong
    assert got["without_telemetry"]["confusion_matrix"] == [[1, 0], [3, 0]]


def test_keep_modalities_never_mutates_the_windows() -> None:
    windows = [_inputs(C, A)]
    kept, index = keep_modalities(windows, [A])
    assert set(kept[0]) == {A} and index == [0] and set(windows[0]) == {C, A}


def test_evaluate_windows_puts_the_ablation_macro_f1_at_the_top_level() -> None:
    windows = [
        LabelledWindow("d", T0, _inputs(A, T), "y"),
        LabelledWindow("d", T0, _inputs(A), "x"),
    ]
    got = evaluate_windows(RecordingClassifier(), windows, ("x", "y"), (A, T))
    assert got["macro_f1"] == 1.0
    assert got["without_telemetry"] == got["ablation"]["without_telemetry"]["macro_f1"]
    assert got["without_telemetry"] == pytest.approx(1 / 3)
    # one window of class y left, predicted right: F1 1 for y, 0 for the absent class x
    assert got["only_telemetry"] == 0.5 and got["only_audio"] == pytest.approx(1 / 3)
    with pytest.raises(Exception, match="does not know"):
        evaluate_windows(RecordingClassifier(), windows, ("x", "z"), (A, T))


def test_specs_merge_only_when_shared_modalities_agree() -> None:
    full = FeatureSpec(2000, ALL_MODALITIES, metrics=("a",))
    tel = FeatureSpec(2000, (T,), metrics=("a",))
    assert merged_spec([full, tel]) == full
    assert merged_spec([tel, FeatureSpec(2000, (C,), image_size=32)]) == FeatureSpec(
        2000, (C, T), image_size=32, metrics=("a",)
    )
    assert merged_spec([full, FeatureSpec(2000, (T,), metrics=("b",))]) is None
    assert merged_spec([full, FeatureSpec(1000, (A,))]) is None


def _metrics() -> dict[str, Any]:
    s = scores([0, 1, 1], [0, 1, 0], ("normal", "fire"))
    return {
        "schema": "iotfuse.evaluation/v1",
        "data": ["t.iotrec"],
        "model": {
            "name": "m",
            "version": "sha256:" + "a" * 64,
            "path": "m",
            "modalities": ["audio"],
        },
        "classes": ["normal", "fire"],
        **s,
        "compare": [
            {
                "name": "other",
                "version": "sha256:" + "b" * 64,
                "path": "o",
                "modalities": ["telemetry"],
                **s,
                "macro_f1": 0.25,
            }
        ],
    }


def test_best_single_modality_takes_only_scores_and_one_modality_models() -> None:
    metrics = _metrics()
    assert best_single_modality({**metrics, "compare": []}) is None
    best = best_single_modality(metrics)
    assert best is not None and best["name"] == "other" and best["macro_f1"] == 0.25
    metrics |= {"only_audio": 0.5, "only_camera": 0.125}
    best = best_single_modality(metrics)
    assert best is not None and best["name"] == "m only_audio"
    assert best["fused_margin"] == pytest.approx(2 / 3 - 0.5)


def test_report_files(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["best_single_modality"] = best_single_modality(metrics)
    paths = write_report(tmp_path / "r", metrics)
    assert [p.name for p in paths] == ["metrics.json", "confusion_matrix.png", "report.md"]
    assert json.loads(paths[0].read_text()) == metrics
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths[2].read_text()
    assert text == report_markdown(metrics)
    assert "macro-F1 0.667" in text and "| other | telemetry | 0.250 |" in text
    assert "| fire | 1.000 | 0.500 | 0.667 | 2 |" in text
    assert "Best single-modality score: other, macro-F1 0.250; the model is +0.417" in text


def _random_model(directory: Path, modalities: tuple[Modality, ...]) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="rand-" + "-".join(m.value for m in modalities),
        classes=CLASSES,
        modalities=modalities,
        telemetry=TelemetryConfig(metrics=DEFAULT_METRICS) if T in modalities else None,
        fusion=FusionConfig(dim=16, layers=1, heads=2),
    )
    save_model(FusionClassifier(cfg), directory)
    return directory


def test_evaluate_cli_writes_the_report_with_comparisons(tmp_path: Path) -> None:
    rec = tmp_path / "t.iotrec"
    assert (
        main(["simulate", "--seed", "31", "--devices", "1", "--duration", "8", "--out", str(rec)])
        == 0
    )
    full = _random_model(tmp_path / "full", ALL_MODALITIES)
    tel = _random_model(tmp_path / "tel", (T,))
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(full),
                "--data",
                str(rec),
                "--out",
                str(tmp_path / "rep"),
                "--compare",
                str(tel),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["model"]["name"] == "rand-camera-audio-telemetry"
    assert metrics["classes"] == list(CLASSES) and metrics["windows"] == 4
    assert sum(map(sum, metrics["confusion_matrix"])) == 4
    for m in ("camera", "audio", "telemetry"):
        assert 0.0 <= metrics[f"without_{m}"] <= 1.0 and 0.0 <= metrics[f"only_{m}"] <= 1.0
    (other,) = metrics["compare"]
    assert other["name"] == "rand-telemetry" and other["windows"] == 4
    assert "rand-telemetry" in (tmp_path / "rep" / "report.md").read_text()
