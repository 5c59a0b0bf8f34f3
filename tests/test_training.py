"""`iotfuse train`: the validation split, and a tiny run end to end through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from encoders.modality import Modality
from fusion.config import ModelConfig, TelemetryConfig
from fusion.modelfile import load_model
from fusion.train import fit_telemetry_stats
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.learn.dataset import LabelledWindow
from pipeline.learn.training import (
    DEFAULT_METRICS,
    Augmented,
    parse_modalities,
    split_windows,
    with_telemetry_stats,
)
from pipeline.simulate import CLASSES
from tests.factory import T0


def _windows(devices: int, count: int, window_ms: int = 2000) -> list[LabelledWindow]:
    return [
        LabelledWindow(f"cell-{d:02d}", T0 + i * window_ms, {}, "normal")
        for i in range(count)
        for d in range(devices)
    ]


def test_split_holds_out_every_kth_device_whole() -> None:
    windows = _windows(devices=10, count=20)
    train, val = split_windows(windows, 0.2, 30_000)
    assert {w.device_id for w in val} == {"cell-04", "cell-09"}
    assert len(val) == 40 and len(train) == 160
    # the same device id in two recordings is two devices
    five = _windows(devices=5, count=4)
    train, val = split_windows(five + five, 0.2, 30_000, [0] * 20 + [1] * 20)
    assert [w.device_id for w in val] == ["cell-04"] * 8 and len(train) == 32


def test_split_of_few_devices_holds_out_whole_time_blocks_staggered() -> None:
    windows = _windows(devices=3, count=150)  # 300 s per device, 10 blocks of 30 s
    train, val = split_windows(windows, 0.2, 30_000)
    assert len(train) + len(val) == len(windows) and len(val) == len(windows) // 5
    held = {(w.device_id, w.start_ms // 30_000) for w in val}
    for w in train:  # a block is held out entirely or not at all
        assert (w.device_id, w.start_ms // 30_000) not in held
    blocks = {d: {b for dev, b in held if dev == d} for d in ("cell-00", "cell-01", "cell-02")}
    assert all(len(b) == 2 for b in blocks.values())
    assert blocks["cell-00"] != blocks["cell-01"] != blocks["cell-02"]
    assert split_windows(windows, 0.2, 30_000) == (train, val)  # deterministic


def test_split_of_tiny_data_falls_back_to_every_kth_window() -> None:
    train, val = split_windows(_windows(devices=1, count=10), 0.2, 30_000)
    assert len(val) == 2 and len(train) == 8
    with pytest.raises(UserError, match="cannot be split"):
        split_windows(_windows(devices=1, count=1), 0.2, 30_000)


def test_parse_modalities_keeps_slot_order_and_refuses_unknown_names() -> None:
    assert parse_modalities("telemetry, camera") == (Modality.CAMERA, Modality.TELEMETRY)
    for bad in ("lidar", "", "audio,audio"):
        with pytest.raises(UserError, match="--modalities"):
            parse_modalities(bad)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "tiny.iotrec"
    assert (
        main(["simulate", "--seed", "21", "--devices", "2", "--duration", "12", "--out", str(path)])
        == 0
    )
    return path


def _train(recording: Path, out: Path, *extra: str) -> None:
    assert (
        main(
            [
                "train",
                "--data",
                str(recording),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--device",
                "cpu",
                "--seed",
                "3",
                *extra,
            ]
        )
        == 0
    )


def test_tiny_training_writes_a_loadable_model_named_by_its_hash(
    recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _train(recording, tmp_path / "m")
    err = capsys.readouterr().err
    assert "epoch   2/2" in err and "macro-F1" in err and "loss" in err
    loaded = load_model(tmp_path / "m")
    digest = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.version == f"sha256:{digest}"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["weights_sha256"] == digest
    cfg = loaded.config
    assert cfg.classes == CLASSES
    assert cfg.modalities == (Modality.CAMERA, Modality.AUDIO, Modality.TELEMETRY)
    assert cfg.telemetry is not None and cfg.telemetry.metrics == DEFAULT_METRICS
    # the normalisation was fitted on the data: temperatures are tens of degrees
    assert 15 < cfg.telemetry.mean[0] < 40 and cfg.telemetry.std != (1.0,) * 5

    _train(recording, tmp_path / "again")  # same seed, same data: the same weights
    assert load_model(tmp_path / "again").version == loaded.version
    # a non-empty --out is refused without --overwrite
    assert main(["train", "--data", str(recording), "--out", str(tmp_path / "m")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_one_modality_trains_a_baseline_with_only_that_section(
    recording: Path, tmp_path: Path
) -> None:
    _train(recording, tmp_path / "tel", "--modalities", "telemetry", "--name", "tel-only")
    cfg = load_model(tmp_path / "tel").config
    assert cfg.name == "tel-only" and cfg.modalities == (Modality.TELEMETRY,)
    assert cfg.camera is None and cfg.audio is None


def test_telemetry_stats_come_from_the_training_windows_only() -> None:
    windows = [
        LabelledWindow("d", T0, {Modality.TELEMETRY: np.full((20, 5), v, np.float32)}, "normal")
        for v in (1.0, 5.0)
    ]
    cfg = ModelConfig(
        name="t",
        classes=("a", "b"),
        modalities=(Modality.TELEMETRY,),
        telemetry=TelemetryConfig(metrics=DEFAULT_METRICS),
    )
    fitted = with_telemetry_stats(cfg, windows)
    assert fitted.telemetry.mean == fit_telemetry_stats([w.inputs for w in windows], 5)[0]
    assert fitted.telemetry.mean == (3.0,) * 5 and fitted.telemetry.std == (2.0,) * 5


def test_augmented_examples_vary_the_camera_anew_on_every_read_deterministically() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    audio = np.ones(16, np.float32)
    examples = [
        ({Modality.CAMERA: frames, Modality.AUDIO: audio}, 2),
        ({Modality.TELEMETRY: np.zeros((20, 5), np.float32)}, 1),
    ]
    data = Augmented(examples, seed=5, p_hardware=0.0)
    first, second = data[0], data[0]
    assert first[1] == second[1] == 2 and len(data) == 2
    for inputs in (first[0], second[0]):
        cam = inputs[Modality.CAMERA]
        assert cam.shape == frames.shape and cam.dtype == np.uint8
        assert inputs[Modality.AUDIO] is audio  # only the camera is varied
    assert not np.array_equal(first[0][Modality.CAMERA], second[0][Modality.CAMERA])
    assert data[1] == examples[1]
    assert np.array_equal(examples[0][0][Modality.CAMERA], frames)  # originals untouched
    again = Augmented(examples, seed=5, p_hardware=0.0)
    assert np.array_equal(again[0][0][Modality.CAMERA], first[0][Modality.CAMERA])
    assert [label for _, label in data] == [2, 1]


def test_a_local_transformers_camera_trunk_can_be_frozen(recording: Path, tmp_path: Path) -> None:
    import torch
    from transformers import ViTModel

    from tests.factory import tiny_vit

    vit = tiny_vit(tmp_path / "vit")
    _train(
        recording,
        tmp_path / "m",
        "--modalities",
        "camera",
        "--camera-hf",
        vit,
        "--freeze-hf",
        "--epochs",
        "1",
    )
    loaded = load_model(tmp_path / "m")
    cam = loaded.config.camera
    assert cam is not None and cam.trunk == "hf" and cam.freeze_trunk
    assert cam.hf_config is not None and cam.hf_config["model_type"] == "vit"
    pretrained = ViTModel.from_pretrained(vit).state_dict()
    trunk = {
        k.split(".", 3)[-1]: v
        for k, v in loaded.model.state_dict().items()
        if k.startswith("trunks.camera.")
    }
    shared = [k for k in pretrained if k in trunk]
    assert shared and all(torch.equal(pretrained[k], trunk[k]) for k in shared)


def test_hardware_augmentation_looks_like_slower_or_narrower_devices() -> None:
    rng = np.random.default_rng(1)
    frames = np.stack([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(4)])
    t = np.arange(32000) / 16000
    audio = (np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 7000 * t)).astype(np.float32)
    metrics = rng.normal(size=(20, 5)).astype(np.float32)
    examples = [({Modality.CAMERA: frames, Modality.AUDIO: audio, Modality.TELEMETRY: metrics}, 0)]
    for _ in range(5):
        inputs, _ = Augmented(examples, seed=int(rng.integers(1000)), p_hardware=1.0)[0]
        cam = inputs[Modality.CAMERA]
        distinct = {cam[i].tobytes() for i in range(4)}
        assert cam.shape == frames.shape and len(distinct) < 4  # fewer distinct frames
        spectrum = np.abs(np.fft.rfft(inputs[Modality.AUDIO]))  # 0.5 Hz per bin
        assert spectrum[2000] > 1000 and spectrum[14000] < 1e-2  # 1 kHz kept, 7 kHz gone
        tel = inputs[Modality.TELEMETRY]
        kept = ~np.isnan(tel).all(axis=1)
        assert 2 <= kept.sum() <= 10 and np.array_equal(tel[kept], metrics[kept])
