"""Model directories (safetensors + config.json) and ModelConfig validation."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.batch import WindowBatch
from fusion.config import AudioConfig, CameraConfig, ModelConfig, ModelConfigError
from fusion.model import FusionClassifier
from fusion.modelfile import ModelFileError, load_model, save_model
from tests.factory import TINY_RATE, all_subsets, random_window, tiny_ast, tiny_config, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def sample_batch(cfg: ModelConfig, seed: int = 0) -> WindowBatch:
    rng = np.random.default_rng(seed)
    return WindowBatch.collate([random_window(rng, cfg, s) for s in all_subsets()], TINY_RATE)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[FusionClassifier, Path, str]:
    torch.manual_seed(0)
    model = FusionClassifier(tiny_config()).eval()
    version = save_model(model, tmp_path / "m")
    return model, tmp_path / "m", version


def test_round_trip_gives_identical_outputs_and_version(
    saved: tuple[FusionClassifier, Path, str], tmp_path: Path
) -> None:
    model, directory, version = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert version == f"sha256:{digest}"
    config = json.loads((directory / "config.json").read_text())
    assert config["format"] == "iotfuse.model/v1" and config["weights_sha256"] == digest
    loaded = load_model(directory)
    assert loaded.version == version and loaded.config == model.config
    assert not loaded.model.training
    batch = sample_batch(model.config)
    with torch.inference_mode():
        assert torch.equal(loaded.model(batch)["logits"], model(batch)["logits"])
    assert save_model(loaded.model, tmp_path / "again") == version  # content hash


def test_different_weights_give_a_different_version(
    saved: tuple[FusionClassifier, Path, str], tmp_path: Path
) -> None:
    model, _, version = saved
    with torch.no_grad():
        model.classifier.bias.add_(1e-3)
    assert save_model(model, tmp_path / "changed") != version


def test_tampered_weights_are_refused(saved: tuple[FusionClassifier, Path, str]) -> None:
    _, directory, _ = saved
    weights = bytearray((directory / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (directory / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ModelFileError, match="weights changed after the model was saved"):
        load_model(directory)


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not even looked at")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match=r"pytorch_model.bin.*pickle.*execute arbitrary code"):
        load_model(tmp_path)
    with pytest.raises(ModelFileError, match="not a directory"):
        load_model(tmp_path / "missing")


def test_weights_that_do_not_fit_the_config_are_refused(
    saved: tuple[FusionClassifier, Path, str],
) -> None:
    _, directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["fusion"]["layers"] = 2  # architecture no longer matches the (unchanged) weights
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"missing \['encoder.layers.1"):
        load_model(directory)


def edit(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return config


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("classes", [], "at least 2 class names"),
        ("classes", ["a", "a"], "duplicates"),
        ("colour", "red", r"config: unknown key\(s\) \['colour'\]"),
        ("camera.lens", 3, r"config.camera: unknown key\(s\) \['lens'\]"),
        ("camera.image_size", "16", "config.camera.image_size: expected an integer, got str"),
        ("camera.freeze_trunk", 1, "config.camera.freeze_trunk: expected true or false"),
        ("window_ms", True, "config.window_ms: expected an integer, got bool"),
        ("modalities", ["camera", "lidar"], r"config.modalities\[1\]: expected one of"),
        ("modalities", ["audio", "telemetry"], "a camera section is given but camera is not in"),
        (
            "telemetry.metrics",
            KeyError,
            r"config.telemetry: missing required key\(s\) \['metrics'\]",
        ),
        ("telemetry.std", [1.0, 0.0, 1.0], "telemetry.std must be finite and > 0"),
        ("fusion.heads", 3, "fusion.heads=3 must divide fusion.dim=16"),
        ("name", None, "config.name: expected a string"),
        ("camera.trunk", "resnet", r"config.camera.trunk: expected one of \['cnn', 'hf'\]"),
    ],
)
def test_bad_config_is_refused(
    saved: tuple[FusionClassifier, Path, str], path: str, value: Any, message: str
) -> None:
    _, directory, _ = saved
    config = edit(json.loads((directory / "config.json").read_text()), path, value)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=message):
        load_model(directory)


def test_bad_config_file_is_refused(saved: tuple[FusionClassifier, Path, str]) -> None:
    _, directory, _ = saved
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_model(directory)
    (directory / "config.json").write_text(json.dumps({"name": "x", "format": "other/v9"}))
    with pytest.raises(ModelConfigError, match="format is 'other/v9'"):
        load_model(directory)


def test_config_dict_round_trip_and_defaults() -> None:
    cfg = tiny_config()
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    assert data["modalities"] == ["camera", "audio", "telemetry"]
    only = ModelConfig.from_dict({"name": "n", "classes": ["x", "y"], "modalities": ["audio"]})
    assert only.audio == AudioConfig() and only.camera is None and only.telemetry is None
    assert "camera" not in only.to_dict()
    with pytest.raises(ModelConfigError, match="telemetry is in modalities but has no"):
        ModelConfig(name="n", classes=("x", "y"), modalities=ALL_MODALITIES)


def test_hf_trunks_round_trip_without_hf_path(tmp_path: Path) -> None:
    vit, ast = tiny_vit(tmp_path / "vit"), tiny_ast(tmp_path / "ast")
    cfg = tiny_config(
        camera=CameraConfig(image_size=48, num_frames=2, trunk="hf", hf_path=vit),
        audio=AudioConfig(sample_rate=TINY_RATE, n_fft=256, n_mels=16, trunk="hf", hf_path=ast),
    )
    torch.manual_seed(0)
    model = FusionClassifier(cfg).eval()
    assert model.config.camera is not None and model.config.camera.hf_config is not None
    version = save_model(model, tmp_path / "model")
    shutil.rmtree(vit)
    shutil.rmtree(ast)
    loaded = load_model(tmp_path / "model")
    assert loaded.version == version
    batch = sample_batch(cfg)
    with torch.inference_mode():
        out, again = model(batch), loaded.model(batch)
    assert torch.equal(again["logits"], out["logits"])
    assert out["present"][:, 0].any() and out["present"][:, 1].any()  # the hf trunks did run
    assert any(k.startswith("trunks.camera.model.") for k in loaded.model.state_dict())
    assert Modality.AUDIO in loaded.model.preprocess
