"""Audio encoder: a window of mono audio -> one feature vector.

Raw input (built by the pipeline): float32 [window_samples] mono at `sample_rate`, zeros where no
audio was received; window_samples = sample_rate * window_ms // 1000. Batched: [n, samples].

    AudioPreprocessor: refuses a wrong sample rate / length / dtype, then log-mel
        float32 [n, samples] -> [n, n_mels, frames], frames = samples // hop + 1
    AudioCNN (trunk="cnn"): small 2D CNN over the log-mel image, global average pool
    HFAudioTrunk (trunk="hf", encoders/hf.py): a local transformers AST over the log-mel

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torchaudio.transforms import MelScale, Spectrogram

from encoders.base import ConvBlock, RawInfo, Trunk, check_hf_fields, check_raw, require

LOG_EPS = 1e-6  # log-mel = log(mel + LOG_EPS); digital silence maps to log(LOG_EPS)


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    sample_rate: int = 16000  # Hz the model expects; the pipeline resamples to it
    n_fft: int = 400  # STFT size in samples (25 ms at 16 kHz)
    hop_ms: int = 10  # STFT hop
    n_mels: int = 64  # mel bands (an AST trunk needs its num_mel_bins here)
    width: int = 16  # cnn: channels of the first stage (doubled per stage)
    embed_dim: int = 96  # cnn: trunk output width (hf: the model's hidden size is used)
    trunk: Literal["cnn", "hf"] = "cnn"
    hf_path: str | None = None  # local transformers model directory (trunk="hf", first build)
    # the hf model's config, filled in by FusionClassifier; when set, the trunk is built from
    # it with fresh weights (the saved model.safetensors supplies them) and hf_path is unused
    hf_config: dict[str, Any] | None = None
    freeze_trunk: bool = False

    def __post_init__(self) -> None:
        require(
            8000 <= self.sample_rate <= 96000,
            f"audio.sample_rate must be in 8000..96000 Hz, got {self.sample_rate}",
        )
        require(self.n_fft >= 16, f"audio.n_fft must be >= 16, got {self.n_fft}")
        require(
            self.hop_length >= 1,
            f"audio.hop_ms={self.hop_ms} is less than one sample at {self.sample_rate} Hz",
        )
        require(
            1 <= self.n_mels <= self.n_fft // 2 + 1,
            f"audio.n_mels must be in 1..n_fft/2+1={self.n_fft // 2 + 1}, got {self.n_mels}",
        )
        require(
            self.width >= 1 and self.embed_dim >= 1,
            f"audio.width and audio.embed_dim must be >= 1, got {self.width}, {self.embed_dim}",
        )
        check_hf_fields("audio", self.trunk, self.hf_path, self.hf_config)

    @property
    def hop_length(self) -> int:
        return self.sample_rate * self.hop_ms // 1000

    def window_samples(self, window_ms: int) -> int:
        return self.sample_rate * window_ms // 1000

    def frames(self, window_ms: int) -> int:
        return self.window_samples(window_ms) // self.hop_length + 1  # centred STFT


class AudioPreprocessor:
    """Mono float32 waveform at the configured rate -> log-mel spectrogram, batched."""

    def __init__(self, cfg: AudioConfig, window_ms: int):
        require(
            cfg.window_samples(window_ms) >= cfg.n_fft,
            f"a {window_ms} ms window holds {cfg.window_samples(window_ms)} samples, fewer "
            f"than audio.n_fft={cfg.n_fft}; use a longer window or a smaller n_fft",
        )
        self.cfg = cfg
        self.samples = cfg.window_samples(window_ms)
        # torchaudio's MelSpectrogram(power=2) squares |z| after a complex abs (a square
        # root per bin, a third of the audio encoder's time); re^2 + im^2 is the same power
        self.stft = Spectrogram(n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=None)
        self.mel = MelScale(
            n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, n_stft=cfg.n_fft // 2 + 1
        )

    def __call__(self, raw: Tensor, info: RawInfo) -> Tensor:
        if info.audio_sample_rate != self.cfg.sample_rate:
            raise ValueError(
                f"audio: the batch is at {info.audio_sample_rate} Hz but the model expects "
                f"{self.cfg.sample_rate} Hz; resample the audio to {self.cfg.sample_rate} Hz "
                f"before building windows"
            )
        check_raw(raw, "audio", torch.float32, (self.samples,))
        if not bool(torch.isfinite(raw).all()):
            raise ValueError(
                "audio: the waveform contains NaN or infinity; send zeros for missing audio"
            )
        self.stft.to(raw.device)  # no-op once moved; the transforms hold only fixed buffers
        self.mel.to(raw.device)
        z = self.stft(raw)  # [n, samples] -> complex [n, n_fft/2+1, frames]
        power = z.real.square() + z.imag.square()  # |z|^2 -> [n, n_fft/2+1, frames]
        mel = self.mel(power)  # -> [n, n_mels, frames]
        return torch.log(mel + LOG_EPS)


class AudioCNN(Trunk):
    """2D CNN over the log-mel image: 4 stride-2 stages, global average pool."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        w = cfg.width
        self.stages = torch.nn.Sequential(
            ConvBlock(1, w, stride=2, separable=False),  # [n, 1, F, L] -> [n, w, F/2, L/2]
            ConvBlock(w, 2 * w, stride=2, separable=True),  # -> [n, 2w, F/4, L/4]
            ConvBlock(2 * w, 4 * w, stride=2, separable=True),  # -> [n, 4w, F/8, L/8]
            ConvBlock(4 * w, cfg.embed_dim, stride=2, separable=True),  # -> [n, E, F/16, L/16]
        )
        self.out_dim = cfg.embed_dim
        self.silence = math.log(LOG_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.silence) / 10.0  # silence -> 0, roughly unit scale (shape unchanged)
        x = x.unsqueeze(1)  # [n, n_mels, frames] -> [n, 1, n_mels, frames]
        x = self.stages(x)  # [n, 1, F, L] -> [n, E, F/16, L/16]
        return x.mean(dim=(2, 3))  # [n, E, f, l] -> [n, E]
