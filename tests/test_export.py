"""`iotfuse export`: one ONNX graph of the whole per-window computation, served by every
command that loads a model, with the same events as torch but for `model.version`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.attribution import coalition_values, shapley
from fusion.config import AudioConfig
from fusion.export import Verification, export_model
from fusion.model import FusionClassifier
from fusion.shapley import shapley_from_coalitions
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.learn.evaluation import EvalOptions, evaluate_recordings
from pipeline.learn.export import verification_windows
from pipeline.recordings.file import RecordingWriter
from pipeline.settings import Settings
from pipeline.simulate import ScenarioConfig, simulate
from pipeline.stream import onnx_runner
from pipeline.stream.model_runner import ModelRunner
from tests.factory import random_window, tiny_config

HEX = "[0-9a-f]{64}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model, exported by the command."""
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", "--out", str(out), "--overwrite"]) == 0
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "held-out.iotrec"
    with RecordingWriter(path) as writer:
        for record in simulate(ScenarioConfig(seed=1001, devices=2, duration_s=20)):
            writer.write(record)
    return path


def events(path: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        out[(e["device_id"], e["window"]["start_ms"])] = e
    return out


def test_the_export_names_its_source_and_serves_the_same_decisions(
    exported: Path, shipped: ModelRunner
) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.onnx"]
    manifest = json.loads((exported / "config.json").read_text())
    assert manifest["source_version"] == shipped.version and manifest["quantize"] == "none"
    assert manifest["verified"]["max_prob_diff"] <= 1e-4
    runner = ModelRunner.load(exported, "cpu")
    assert runner.exported and runner.device == "cpu"
    assert re.fullmatch(f"onnx:sha256:{HEX} of sha256:{HEX}", runner.version)
    assert runner.version.endswith(f" of {shipped.version}")
    assert runner.features == shipped.features
    windows = verification_windows(shipped.features, Settings())[:48]  # some lack modalities
    assert any(len(w) < 3 for w in windows)
    want, got = shipped.classify(windows), runner.classify(windows)
    for a, b in zip(want, got, strict=True):
        assert a.label == b.label
        assert max(abs(a.scores[c] - b.scores[c]) for c in a.scores) <= 1e-4
        assert set(a.attribution) == set(b.attribution)
        for m, phi in a.attribution.items():
            assert abs(phi - b.attribution[m]) <= 1e-4
            assert (b.attribution[m] == 0.0) == (phi == 0.0)  # absent: exactly 0 in both


def test_replay_offline_with_the_export_gives_the_torch_events(
    exported: Path, recording: Path, tmp_path: Path
) -> None:
    torch_out, onnx_out = tmp_path / "torch.jsonl", tmp_path / "onnx.jsonl"
    assert main(["replay", str(recording), "--offline", "--out", str(torch_out)]) == 0
    argv = ["replay", str(recording), "--offline", "--out", str(onnx_out)]
    assert main([*argv, "--model", str(exported)]) == 0
    a, b = events(torch_out), events(onnx_out)
    assert a.keys() == b.keys() and len(a) == 20
    for key, e in a.items():
        f = b[key]
        assert f["model"]["version"].startswith("onnx:sha256:")
        assert f["model"]["version"].endswith(e["model"]["version"])
        for field in ("label", "modalities", "window", "device_id", "schema"):
            assert f[field] == e[field]
        assert max(abs(e["scores"][c] - f["scores"][c]) for c in e["scores"]) <= 1e-4


def test_evaluate_compares_torch_and_the_export_on_the_same_windows(
    exported: Path, recording: Path
) -> None:
    options = EvalOptions(model=None, data=(recording,), compare=(exported,), device="cpu")
    got = evaluate_recordings(options, Settings())
    (other,) = got["compare"]
    assert other["version"].startswith("onnx:") and other["windows"] == got["windows"]
    assert round(other["macro_f1"], 3) == round(got["macro_f1"], 3)
    assert other["confusion_matrix"] == got["confusion_matrix"]


def test_a_changed_graph_is_refused(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "changed"
    copy.mkdir()
    (copy / "config.json").write_bytes((exported / "config.json").read_bytes())
    graph = bytearray((exported / "model.onnx").read_bytes())
    graph[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(graph))
    with pytest.raises(UserError, match="changed after export"):
        ModelRunner.load(copy, "cpu")


def test_exported_model_refuses_the_input_torch_refuses(exported: Path) -> None:
    runner = ModelRunner.load(exported, "cpu")
    good = verification_windows(runner.features, Settings())[0]
    audio = good[Modality.AUDIO].copy()
    audio[3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        runner.classify([{**good, Modality.AUDIO: audio}])
    with pytest.raises(ValueError, match="shape"):
        runner.classify([{**good, Modality.AUDIO: audio[:100]}])


def test_cuda_is_refused_in_one_line_where_onnxruntime_has_no_cuda() -> None:
    assert onnx_runner.providers_for("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert onnx_runner.providers_for("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])[
        0
    ] == ("CUDAExecutionProvider")
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        onnx_runner.providers_for("cuda", ["CPUExecutionProvider"])


def test_an_hf_trunk_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    from fusion.modelfile import save_model
    from tests.factory import tiny_ast

    cfg = tiny_config(
        (Modality.AUDIO,),
        audio=AudioConfig(
            sample_rate=16000, n_fft=256, n_mels=16, trunk="hf", hf_path=tiny_ast(tmp_path / "ast")
        ),
    )
    save_model(FusionClassifier(cfg), tmp_path / "hf-model")
    capsys.readouterr()
    code = main(["export", "--model", str(tmp_path / "hf-model"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "audio.trunk is 'hf'" in err and "torch" in err
    assert not (tmp_path / "x").exists()  # nothing written


def test_an_unfaithful_graph_is_refused() -> None:
    ok = Verification(windows=80, max_prob_diff=3e-6, max_attribution_diff=2e-6, label_agreement=1)
    assert ok.problem("none") is None
    off = Verification(windows=80, max_prob_diff=2e-3, max_attribution_diff=0, label_agreement=1)
    assert "probabilities differ" in str(off.problem("none"))
    assert off.problem("int8") is None
    flipped = Verification(
        windows=80, max_prob_diff=0.01, max_attribution_diff=0, label_agreement=0.9
    )
    assert "labels agree" in str(flipped.problem("int8"))
    model = FusionClassifier(tiny_config()).eval()
    with pytest.raises(ValueError, match="windows to verify"):
        export_model(model, "sha256:" + "0" * 64, [])


@pytest.mark.usefixtures("one_thread")
def test_a_small_model_exports_exactly_with_every_subset_of_modalities() -> None:
    torch.manual_seed(1)
    model = FusionClassifier(tiny_config()).eval()
    rng = np.random.default_rng(0)
    subsets = [[m for i, m in enumerate(ALL_MODALITIES) if k >> i & 1] for k in range(1, 8)]
    windows = [random_window(rng, model.config, s) for s in subsets for _ in range(3)]
    _graph, manifest = export_model(model, "sha256:" + "0" * 64, windows)
    assert manifest["verified"]["label_agreement"] == 1.0
    assert manifest["verified"]["max_prob_diff"] <= 1e-4


def test_shapley_from_coalitions_is_the_torch_attribution() -> None:
    torch.manual_seed(0)
    model = FusionClassifier(tiny_config()).eval()
    tokens = torch.randn(5, 3, model.config.fusion.dim)  # [B, M, D]
    present = torch.rand(5, 3) < 0.7  # [B, M]
    target = torch.randint(0, 3, (5,))  # [B]
    with torch.no_grad():
        v = coalition_values(model, tokens, present, target)  # [2^M, B]
        want = shapley(model, tokens, present, target)  # [B, M]
    probs = np.zeros((8, 5, 3), dtype=np.float32)  # only the target class is read
    probs[:, np.arange(5), target.numpy()] = v.numpy()
    got = shapley_from_coalitions(probs, target.numpy(), present.numpy())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-7)
    assert (got[~present.numpy()] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "fp16"])
def test_quantized_exports_keep_the_labels(quantize: str, shipped: ModelRunner) -> None:
    from fusion.modelfile import load_model
    from pipeline.stream.model_runner import default_model_dir

    loaded = load_model(default_model_dir())
    windows = verification_windows(shipped.features, Settings())
    graph, manifest = export_model(loaded.model, loaded.version, windows, quantize)
    assert manifest["quantize"] == quantize and manifest["verified"]["label_agreement"] >= 0.98
    assert 0 < manifest["verified"]["max_prob_diff"] <= 0.1


def test_the_edge_benchmark_imports_and_parses_its_arguments() -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "bench" / "edge_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--edge-venv" in done.stdout
