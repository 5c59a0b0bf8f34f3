"""Per-modality preprocessors and trunks: shapes, values, and loud refusal of wrong input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchaudio.transforms import MelSpectrogram

from encoders.audio import LOG_EPS, AudioConfig, AudioPreprocessor
from encoders.base import ModelConfigError, RawInfo
from encoders.camera import CameraConfig, CameraPreprocessor
from encoders.telemetry import TelemetryConfig, TelemetryPreprocessor
from encoders.trunks import build_audio_trunk, build_camera_trunk, build_telemetry_trunk
from tests.factory import tiny_ast, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

INFO = RawInfo(audio_sample_rate=8000)
CAMERA = CameraConfig(image_size=32, num_frames=2, width=4, embed_dim=8)
AUDIO = AudioConfig(sample_rate=8000, n_fft=256, hop_ms=10, n_mels=16, width=4, embed_dim=8)
WINDOW_MS = 500  # 4000 samples at 8 kHz -> 4000 // 80 + 1 = 51 frames


# --- camera -----------------------------------------------------------------------------------


def test_camera_preprocessor_normalises_and_moves_channels_first() -> None:
    raw = torch.zeros(3, 2, 32, 32, 3, dtype=torch.uint8)
    raw[..., 0] = 255  # pure red
    x = CameraPreprocessor(CAMERA)(raw, INFO)
    assert x.shape == (3, 2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.all(x[:, :, 0] == 1.0) and torch.all(x[:, :, 1:] == -1.0)  # (v/255 - .5) / .5


def test_camera_preprocessor_per_channel_statistics() -> None:
    """Both paths (one mean/std for all channels, and per channel) give (x/255 - mean) / std."""
    raw = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    for mean, std in (((0.5,) * 3, (0.25,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        cfg = CameraConfig(image_size=32, num_frames=2, mean=mean, std=std)
        want = (raw.float() / 255 - torch.tensor(mean)) / torch.tensor(std)  # [n, T, S, S, 3]
        got = CameraPreprocessor(cfg)(raw, INFO)
        torch.testing.assert_close(got, want.permute(0, 1, 4, 2, 3))


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            torch.zeros(1, 2, 48, 48, 3, dtype=torch.uint8),
            r"expected rows of shape \[2, 32, 32, 3\]",
        ),
        (torch.zeros(1, 3, 32, 32, 3, dtype=torch.uint8), r"got batch \[1, 3, 32, 32, 3\]"),
        (torch.zeros(1, 2, 32, 32, 4, dtype=torch.uint8), "expected rows of shape"),
        (torch.zeros(1, 2, 32, 32, 3, dtype=torch.float32), "expected dtype torch.uint8"),
    ],
)
def test_camera_preprocessor_refuses_wrong_input(raw: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CameraPreprocessor(CAMERA)(raw, INFO)


def test_camera_cnn_shape_and_frame_order_invariance() -> None:
    trunk = build_camera_trunk(CAMERA).eval()
    x = torch.randn(5, 2, 3, 32, 32)
    with torch.no_grad():
        out = trunk(x)
        assert out.shape == (5, trunk.out_dim) == (5, 8)
        torch.testing.assert_close(trunk(x.flip(1)), out)  # mean over frames


# --- audio ------------------------------------------------------------------------------------


def test_audio_preprocessor_gives_log_mel() -> None:
    pre = AudioPreprocessor(AUDIO, WINDOW_MS)
    raw = torch.zeros(2, 4000)
    raw[1] = torch.sin(2 * math.pi * 1000 * torch.arange(4000) / 8000)
    x = pre(raw, INFO)
    assert x.shape == (2, 16, AUDIO.frames(WINDOW_MS)) == (2, 16, 51)
    torch.testing.assert_close(x[0], torch.full((16, 51), math.log(LOG_EPS)))  # silence
    assert x[1].max() > 0  # a loud tone has energy well above silence


def test_audio_preprocessor_equals_torchaudio_mel_spectrogram() -> None:
    """The power spectrum is computed as re^2 + im^2; the result is torchaudio's."""
    raw = 0.3 * torch.randn(3, 4000)
    want = MelSpectrogram(sample_rate=8000, n_fft=256, hop_length=80, n_mels=16, power=2.0)(raw)
    got = AudioPreprocessor(AUDIO, WINDOW_MS)(raw, INFO)
    torch.testing.assert_close(got, torch.log(want + LOG_EPS), rtol=1e-5, atol=1e-5)


def test_audio_preprocessor_refuses_wrong_sample_rate_with_advice() -> None:
    pre = AudioPreprocessor(AUDIO, WINDOW_MS)
    with pytest.raises(ValueError, match=r"44100 Hz.*expects 8000 Hz; resample"):
        pre(torch.zeros(1, 4000), RawInfo(audio_sample_rate=44100))


@pytest.mark.parametrize(
    "raw, message",
    [
        (torch.zeros(1, 3999), r"expected rows of shape \[4000\]"),
        (torch.zeros(1, 4000, 2), "expected rows of shape"),
        (torch.zeros(1, 4000, dtype=torch.float64), "expected dtype torch.float32"),
        (torch.zeros(1, 4000, dtype=torch.int16), "expected dtype torch.float32"),
        (torch.full((1, 4000), float("nan")), "NaN or infinity"),
    ],
)
def test_audio_preprocessor_refuses_wrong_input(raw: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AudioPreprocessor(AUDIO, WINDOW_MS)(raw, INFO)


def test_audio_cnn_shape() -> None:
    trunk = build_audio_trunk(AUDIO).eval()
    with torch.no_grad():
        assert trunk(torch.randn(3, 16, 51)).shape == (3, 8)


# --- telemetry --------------------------------------------------------------------------------


def test_telemetry_preprocessor_normalises_and_masks_missing() -> None:
    cfg = TelemetryConfig(metrics=("a", "b"), steps=3, mean=(10.0, 0.0), std=(2.0, 4.0))
    raw = torch.tensor([[[12.0, float("nan")], [10.0, 8.0], [float("nan"), float("nan")]]])
    x = TelemetryPreprocessor(cfg)(raw, INFO)
    assert x.shape == (1, 3, 4)
    expected = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(x, expected)


def test_telemetry_far_out_of_range_stays_finite_through_the_trunk() -> None:
    """3e38 is a finite float32, but normalised by a small std it overflowed the trunk and
    the window's scores became NaN (an event that is not valid JSON)."""
    cfg = TelemetryConfig(metrics=("a", "b"), steps=3, mean=(0.0, 0.0), std=(0.01, 1.0))
    raw = torch.tensor([[[3e38, -3e38], [1.0, 2.0], [-3e38, float("nan")]]])
    x = TelemetryPreprocessor(cfg)(raw, INFO)
    assert x[0, 0, :2].tolist() == [1e4, -1e4] and x[0, 1, :2].tolist() == [100.0, 2.0]
    with torch.no_grad():
        assert torch.isfinite(build_telemetry_trunk(cfg).eval()(x)).all()


@pytest.mark.parametrize(
    "raw, message",
    [
        (torch.zeros(1, 3, 3), r"expected rows of shape \[3, 2\]"),
        (torch.zeros(1, 4, 2), r"expected rows of shape \[3, 2\]"),
        (torch.zeros(1, 3, 2, dtype=torch.float64), "expected dtype torch.float32"),
        (torch.full((1, 3, 2), float("inf")), "infinite; use NaN"),
    ],
)
def test_telemetry_preprocessor_refuses_wrong_input(raw: torch.Tensor, message: str) -> None:
    cfg = TelemetryConfig(metrics=("a", "b"), steps=3)
    with pytest.raises(ValueError, match=message):
        TelemetryPreprocessor(cfg)(raw, INFO)


def test_telemetry_cnn_shape() -> None:
    cfg = TelemetryConfig(metrics=("a", "b", "c"), steps=20, width=8, embed_dim=12)
    trunk = build_telemetry_trunk(cfg).eval()
    with torch.no_grad():
        assert trunk(torch.randn(4, 20, 6)).shape == (4, 12)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CameraConfig(image_size=16), "camera.image_size must be >= 32"),
        (lambda: CameraConfig(trunk="hf"), "needs camera.hf_path"),
        (lambda: CameraConfig(hf_path="/x"), 'only used with camera.trunk="hf"'),
        (lambda: AudioConfig(n_mels=500), "audio.n_mels"),
        (lambda: AudioConfig(sample_rate=1000), "audio.sample_rate"),
        (lambda: TelemetryConfig(metrics=()), "telemetry.metrics is empty"),
        (lambda: TelemetryConfig(metrics=("a", "a")), "duplicates"),
        (lambda: TelemetryConfig(metrics=("a",), std=(0.0,)), "telemetry.std"),
        (lambda: TelemetryConfig(metrics=("a", "b"), mean=(1.0,)), "one value per metric"),
    ],
)
def test_modality_configs_refuse_bad_values(make: object, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        make()  # type: ignore[operator]


# --- transformers trunks (tiny models from tests/factory.py, never downloaded) ---------------


def test_hf_vision_trunk_resizes_frames_and_pools(tmp_path: Path) -> None:
    from encoders.hf import HFVisionTrunk

    cfg = CameraConfig(image_size=48, num_frames=2, trunk="hf", hf_path=tiny_vit(tmp_path))
    trunk = build_camera_trunk(cfg).eval()
    with torch.no_grad():
        out = trunk(torch.randn(3, 2, 3, 48, 48))  # frames resized 48 -> 32 for the ViT
    assert out.shape == (3, 32) and trunk.out_dim == 32
    assert isinstance(trunk, HFVisionTrunk)
    assert trunk.hf_config["model_type"] == "vit" and trunk.hf_config["image_size"] == 32


def test_hf_audio_trunk_pads_time_to_max_length(tmp_path: Path) -> None:
    cfg = AudioConfig(
        sample_rate=8000, n_fft=256, n_mels=16, trunk="hf", hf_path=tiny_ast(tmp_path)
    )
    trunk = build_audio_trunk(cfg).eval()
    with torch.no_grad():
        short = trunk(torch.randn(2, 16, 51))  # 51 frames padded to 64
        long = trunk(torch.randn(2, 16, 90))  # 90 frames cropped to 64
    assert short.shape == long.shape == (2, 32)
    with pytest.raises(ValueError, match="expected 16 mel bands"):
        trunk(torch.randn(2, 20, 51))


def test_hf_audio_trunk_refuses_mel_mismatch(tmp_path: Path) -> None:
    path = tiny_ast(tmp_path, n_mels=32)
    with pytest.raises(ModelConfigError, match="num_mel_bins=32 but audio.n_mels=16"):
        build_audio_trunk(
            AudioConfig(sample_rate=8000, n_fft=256, n_mels=16, trunk="hf", hf_path=path)
        )


def test_hf_freeze_and_missing_directory(tmp_path: Path) -> None:
    frozen = build_camera_trunk(
        CameraConfig(trunk="hf", hf_path=tiny_vit(tmp_path), freeze_trunk=True)
    )
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ModelConfigError, match="is not a directory.*Nothing is downloaded"):
        build_camera_trunk(CameraConfig(trunk="hf", hf_path=str(tmp_path / "nope")))
