"""transformers trunks (trunk="hf"): a pretrained vision model for camera, an AST for audio.

Loading is local only: the first build reads `hf_path` with `AutoModel.from_pretrained(...,
local_files_only=True)`; nothing is ever downloaded. The trunk then exposes `hf_config` (the
model's full config as a JSON dict). The fusion model stores it in its own config, so a saved
iotfuse model rebuilds the architecture from that dict (`AutoModel.from_config`) and takes all
weights, trunk included, from its own model.safetensors: loading a saved model never needs
hf_path.

Features are the model's pooler_output when it has one, else the mean of last_hidden_state.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from encoders.audio import LOG_EPS, AudioConfig
from encoders.base import ModelConfigError, Trunk
from encoders.camera import CameraConfig


def load_hf_model(
    section: str, path: str | None, config: dict[str, Any] | None, freeze: bool
) -> PreTrainedModel:
    """Build from a stored config dict (weights come later) or load from a local directory."""
    model: PreTrainedModel
    if config is not None:
        try:
            arch = AutoConfig.for_model(**config)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelConfigError(
                f"{section}.hf_config does not describe a transformers "
                f"model this installation knows: {e}"
            ) from e
        model = AutoModel.from_config(arch)  # type: ignore[no-untyped-call]
    else:
        if path is None or not os.path.isdir(path):
            raise ModelConfigError(
                f"{section}.hf_path={path!r} is not a directory; point it to a local "
                f"transformers model directory (config.json + weights). Nothing is downloaded."
            )
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelConfigError(
                f"{section}.hf_path={path!r}: transformers could not load a model from it: {e}"
            ) from e
    nn.Module.float(model)  # weights in float32 whatever the checkpoint stored
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def config_dict(model: PreTrainedModel) -> dict[str, Any]:
    """The model's full config as plain JSON data (what the iotfuse model file stores)."""
    data: dict[str, Any] = json.loads(model.config.to_json_string(use_diff=False))
    return data


def pooled(outputs: Any) -> Tensor:
    pool: Tensor | None = getattr(outputs, "pooler_output", None)
    if pool is not None:
        return pool  # [N, H]
    hidden: Tensor = outputs.last_hidden_state  # [N, L, H]
    return hidden.mean(dim=1)  # [N, L, H] -> [N, H]


def _config_int(model: nn.Module, section: str, name: str) -> int:
    value = getattr(getattr(model, "config", None), name, None)
    if not isinstance(value, int):
        raise ModelConfigError(
            f"{section}: the transformers model has no integer config."
            f"{name}; use a model of the expected kind"
        )
    return value


class HFVisionTrunk(Trunk):
    """Per-frame vision transformer (e.g. ViT): frames resized to the model's image_size,
    pooled per frame, mean over the window's frames."""

    def __init__(self, cfg: CameraConfig):
        super().__init__()
        self.model = load_hf_model("camera", cfg.hf_path, cfg.hf_config, cfg.freeze_trunk)
        self.image_size = _config_int(self.model, "camera", "image_size")
        channels = getattr(self.model.config, "num_channels", 3)
        if channels != 3:
            raise ModelConfigError(
                f"camera: the vision model takes {channels} channels; camera frames are RGB (3)"
            )
        self.out_dim = _config_int(self.model, "camera", "hidden_size")
        self.hf_config = config_dict(self.model)

    def forward(self, x: Tensor) -> Tensor:
        n, t = x.shape[:2]
        x = x.flatten(0, 1)  # [n, T, 3, S, S] -> [n*T, 3, S, S]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )  # -> [n*T, 3, I, I]
        features = pooled(self.model(pixel_values=x))  # [n*T, 3, I, I] -> [n*T, H]
        return features.view(n, t, -1).mean(dim=1)  # [n*T, H] -> [n, T, H] -> [n, H]


class HFAudioTrunk(Trunk):
    """Audio Spectrogram Transformer over the log-mel: input_values [n, max_length, n_mels],
    the time axis padded with silence or cropped to the model's max_length."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.model = load_hf_model("audio", cfg.hf_path, cfg.hf_config, cfg.freeze_trunk)
        self.max_length = _config_int(self.model, "audio", "max_length")
        self.n_mels = _config_int(self.model, "audio", "num_mel_bins")
        if self.n_mels != cfg.n_mels:
            raise ModelConfigError(
                f"audio: the AST model takes num_mel_bins={self.n_mels} but "
                f"audio.n_mels={cfg.n_mels}; set audio.n_mels={self.n_mels}"
            )
        self.out_dim = _config_int(self.model, "audio", "hidden_size")
        self.hf_config = config_dict(self.model)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.n_mels:
            raise ValueError(f"audio: expected {self.n_mels} mel bands, got {x.shape[1]}")
        x = x.transpose(1, 2)  # [n, n_mels, frames] -> [n, frames, n_mels]
        frames = x.shape[1]
        if frames < self.max_length:
            pad = (0, 0, 0, self.max_length - frames)
            x = F.pad(x, pad, value=math.log(LOG_EPS))  # -> [n, max_len, n_mels]
        x = x[:, : self.max_length]  # [n, frames, n_mels] -> [n, max_len, n_mels]
        return pooled(self.model(input_values=x))  # [n, max_len, n_mels] -> [n, H]
