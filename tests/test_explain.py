"""Explanations inside each modality: fusion/explain.py's methods, the stream's
`explanation.telemetry`, and `iotfuse explain` (tiny random models; the checks against the
simulator's ground truth are in test_explain_quality.py)."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.batch import WindowBatch
from fusion.explain import Explainer, predict_with_telemetry
from fusion.model import FusionClassifier
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.learn.dataset import windows_from_recordings
from pipeline.recordings.file import RecordingWriter
from pipeline.settings import Settings
from pipeline.simulate import ScenarioConfig, simulate
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.model_runner import ModelRunner
from tests.factory import TINY_RATE, device_stream, make_model, random_window, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
START = 1767225600000  # 2026-01-01T00:00:00Z, the simulator's default start


@pytest.fixture(scope="module")
def tiny() -> FusionClassifier:
    torch.manual_seed(3)
    return FusionClassifier(tiny_config(classes=("a", "b", "c", "d"))).eval()


def batch_of(model: FusionClassifier, present: list[tuple[Modality, ...]]) -> WindowBatch:
    rng = np.random.default_rng(5)
    windows = [random_window(rng, model.config, mods) for mods in present]
    return WindowBatch.collate(windows, TINY_RATE)


def target_value(ex: Explainer, m: Modality, x: torch.Tensor) -> torch.Tensor:
    rows = ex.batch.rows[m]
    with torch.no_grad():
        out = ex.forward(m)(x, ex.tokens[rows], ex.present[rows])
    return out.gather(1, ex.target[rows][:, None])[:, 0]


@pytest.mark.parametrize("output", ["log_odds", "probability"])
def test_integrated_gradients_add_up_to_the_change_from_the_baseline(
    tiny: FusionClassifier, output: str
) -> None:
    ex = Explainer(tiny, batch_of(tiny, [ALL_MODALITIES] * 3), output=output)
    for m in ALL_MODALITIES:
        a = ex.integrated_gradients(m)
        change = target_value(ex, m, ex.input(m)) - target_value(ex, m, ex.baseline(m))
        assert a.cells.flatten(1).sum(1) == pytest.approx(change, abs=0.011), m
        assert a.delta is not None and float(a.delta.abs().max()) <= 0.011
        assert a.cells.shape[0] == 3 and a.method == "integrated_gradients"
    assert ex.integrated_gradients(Modality.CAMERA).cells.shape[1:] == (2, 32, 32)  # [T, S, S]
    assert ex.integrated_gradients(Modality.TELEMETRY).cells.shape[1:] == (8, 3)  # [steps, M]


def test_a_window_without_a_modality_gets_no_attribution_for_it(tiny: FusionClassifier) -> None:
    ex = Explainer(tiny, batch_of(tiny, [ALL_MODALITIES, (Modality.AUDIO,), ALL_MODALITIES]))
    assert ex.occlusion(Modality.CAMERA).rows.tolist() == [0, 2]
    assert ex.integrated_gradients(Modality.AUDIO).rows.tolist() == [0, 1, 2]
    assert ex.metric_shapley().rows.tolist() == [0, 2]
    pred, per_metric = predict_with_telemetry(tiny, ex.batch)
    assert torch.isnan(per_metric[1]).all() and not torch.isnan(per_metric[[0, 2]]).any()
    reference = tiny.predict(ex.batch)  # the stream's option changes no score
    assert torch.allclose(pred.probs, reference.probs, atol=1e-6)
    assert torch.allclose(pred.attribution, reference.attribution, atol=1e-6)


def test_a_metric_absent_means_what_it_means_in_the_pipeline(tiny: FusionClassifier) -> None:
    """metric_ablation's baseline is a metric that never arrived: NaN in the raw window."""
    batch = batch_of(tiny, [ALL_MODALITIES] * 2)
    ex = Explainer(tiny, batch, output="probability")
    falls = ex.metric_ablation().per_metric()  # [2, M]
    p = tiny.predict(batch).probs.gather(1, ex.target[:, None])[:, 0]
    for j in range(falls.shape[1]):
        raw = dict(batch.raw)
        raw[Modality.TELEMETRY] = raw[Modality.TELEMETRY].clone()
        raw[Modality.TELEMETRY][:, :, j] = float("nan")
        without = tiny.predict(replace(batch, raw=raw)).probs.gather(1, ex.target[:, None])[:, 0]
        assert falls[:, j] == pytest.approx(p - without, abs=1e-5)


def test_shapley_values_of_the_metrics_add_up_to_the_change_without_any(
    tiny: FusionClassifier,
) -> None:
    ex = Explainer(tiny, batch_of(tiny, [ALL_MODALITIES] * 3))
    phi = ex.metric_shapley()
    assert phi.cells.shape == (3, 3) and phi.method == "shapley_values"
    m = Modality.TELEMETRY
    change = target_value(ex, m, ex.input(m)) - target_value(ex, m, ex.baseline(m))
    assert phi.per_metric().sum(1) == pytest.approx(change, abs=1e-4)


def test_events_name_the_top_telemetry_metrics_only_when_asked(runner: ModelRunner) -> None:
    records = device_stream("dev-1", START, 6)
    s = Settings()
    on = replace(s, runtime=replace(s.runtime, explain_telemetry_top=2))
    events = {}
    for name, settings in (("off", s), ("on", on)):
        engine = build_engine(settings, runner)
        events[name] = [
            json.loads(o.value or b"")
            for o in run_offline(engine, records)
            if o.topic == s.topics.events
        ]
    assert len(events["on"]) == len(events["off"]) == 3
    for off, on_ in zip(events["off"], events["on"], strict=True):
        assert "explanation" not in off
        top = on_["explanation"]["telemetry"]
        assert [len(entry) for entry in top] == [2, 2]
        assert {name for name, _ in top} <= set(runner.config.telemetry.metrics)
        assert top[0][1] >= top[1][1] and all(math.isfinite(v) for _, v in top)
        assert on_["scores"] == off["scores"] and on_["attribution"] == off["attribution"]
    with pytest.raises(UserError, match="explain_telemetry_top=-1"):
        build_engine(replace(s, runtime=replace(s.runtime, explain_telemetry_top=-1)), runner)


# -- iotfuse explain ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "run.iotrec"
    with RecordingWriter(path) as writer:
        for r in simulate(ScenarioConfig(seed=11, devices=2, duration_s=6)):
            writer.write(r)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def explain(args: list[str], model_dir: Path, recording: Path, out: Path) -> int:
    return main(
        ["explain", "--data", str(recording), "--model", str(model_dir), "--out", str(out)] + args
    )


@pytest.mark.slow
def test_explain_one_window_writes_a_report_and_its_numbers(
    recording: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = explain(
        ["--device", "cell-01", "--at", "2026-01-01T00:00:03.5Z"], model_dir, recording, tmp_path
    )
    assert rc == 0, capsys.readouterr().err
    stem = tmp_path / f"explain-cell-01-{START + 2000}"
    png, data = (
        stem.with_suffix(".png").read_bytes(),
        json.loads(stem.with_suffix(".json").read_text()),
    )
    assert png.startswith(b"\x89PNG") and len(png) > 50_000
    (w,) = data["windows"]
    assert (w["device_id"], w["window"]["start_ms"]) == ("cell-01", START + 2000)
    assert w["truth"] in (None, *data_classes(model_dir)) and w["label"] == max(
        w["scores"], key=w["scores"].get
    )
    assert set(w["modalities"]) == {"camera", "audio", "telemetry"}
    camera, audio, tele = (w["modalities"][m] for m in ("camera", "audio", "telemetry"))
    assert set(camera["methods"]) == set(audio["methods"]) == {"integrated_gradients", "occlusion"}
    assert np.shape(camera["methods"]["occlusion"]["cells"]) == (2, 32, 32)
    assert set(tele["methods"]) == {"integrated_gradients", "shapley_values"}
    metrics = json.loads((model_dir / "config.json").read_text())["telemetry"]["metrics"]
    assert np.shape(tele["methods"]["integrated_gradients"]["cells"]) == (20, len(metrics))
    ig = tele["methods"]["integrated_gradients"]
    assert sum(tele["per_metric"]["integrated_gradients"].values()) == pytest.approx(
        ig["sum"], abs=1e-4
    )
    ranking = [v for _, v in w["telemetry_ranking"]]
    assert ranking == sorted(ranking, reverse=True) and len(ranking) == len(metrics)
    assert "blurred" in data["baselines"]["camera"] and "absent" in data["baselines"]["telemetry"]
    assert "wrote" in capsys.readouterr().out


def data_classes(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "config.json").read_text())["classes"]


@pytest.mark.slow
def test_explain_an_event_read_from_stdin_and_say_where_it_disagrees(
    recording: Path,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = {
        "device_id": "cell-00",
        "window": {"start_ms": START, "end_ms": START + 2000},
        "label": "no-such-label",
        "model": {"name": "default", "version": "sha256:another"},
    }
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(event)))
    assert explain(["--event", "-"], model_dir, recording, tmp_path) == 0
    out = capsys.readouterr().out
    assert (tmp_path / f"explain-cell-00-{START}.png").exists()
    assert (
        "the event came from model sha256:another" in out and "the event says no-such-label" in out
    )


@pytest.mark.slow
def test_explain_the_most_confident_windows_of_a_class(
    recording: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = ModelRunner.load(model_dir, "cpu")
    windows = windows_from_recordings([recording], Settings(), runner.features)
    decisions = runner.classify([w.inputs for w in windows])
    label = Counter(d.label for d in decisions).most_common(1)[0][0]
    confident = sorted((d.confidence for d in decisions if d.label == label), reverse=True)
    assert explain(["--class", label, "--limit", "2"], model_dir, recording, tmp_path) == 0
    n = min(2, len(confident))
    data = json.loads((tmp_path / f"explain-{label}-top{n}.json").read_text())
    assert [w["label"] for w in data["windows"]] == [label] * n
    got = [w["confidence"] for w in data["windows"]]
    assert got == pytest.approx(confident[:n], abs=1e-5)
    assert (tmp_path / f"explain-{label}-top{n}.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--device", "cell-01", "--at", "2026-01-01T00:05:00Z"], "its windows run from"),
        (["--device", "cell-09", "--at", str(START)], "no input records of that device"),
        (["--device", "cell-01"], "--device needs --at"),
        (["--device", "cell-01", "--at", "noon"], "neither epoch milliseconds nor"),
        (["--event", "{missing}"], "cannot read --event"),
        (["--class", "earthquake"], "has no class 'earthquake'"),
        (["--class", "normal", "--limit", "25"], "at most 24 windows"),
    ],
)
def test_explain_says_what_is_wrong_in_one_line(
    recording: Path,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    says: str,
) -> None:
    assert explain(args, model_dir, recording, tmp_path) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_explain_refuses_a_file_that_holds_no_event(
    recording: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "event.json"
    bad.write_text('{"device_id": "cell-00"}')
    assert explain(["--event", str(bad)], model_dir, recording, tmp_path) == 1
    assert "holds no iot.events value" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_explains_its_most_confident_window_that_is_not_normal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 13: one device, normal, then a machine fault from 3.4 s (pipeline/simulate)."""
    args = ["--offline", "--devices", "1", "--duration", "6", "--seed", "13"]
    args += ["--start-ms", str(START), "--device", "cpu", "--out", str(tmp_path)]
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    png = tmp_path / f"explain-cell-00-{START + 4000}.png"
    assert "demo: explanation of cell-00 machine_fault" in out and str(png) in out
    data = json.loads(png.with_suffix(".json").read_text())
    (w,) = data["windows"]
    assert w["label"] == "machine_fault" and w["truth"] == "machine_fault"
    top_two = [name for name, _ in w["telemetry_ranking"][:2]]
    assert "vibration_rms" in top_two  # what the simulator drives for a machine fault
    assert (tmp_path / "timeline.png").exists()
