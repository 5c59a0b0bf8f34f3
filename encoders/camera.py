"""Camera encoder: a window of RGB frames -> one feature vector.

Raw input (built by the pipeline): uint8 [num_frames, image_size, image_size, 3] RGB per window,
frames already resized. Batched: [n, T, S, S, 3].

    CameraPreprocessor: uint8 [n, T, S, S, 3] -> float [n, T, 3, S, S], (x/255 - mean) / std
    CameraCNN (trunk="cnn"): per frame strided depthwise-separable convs, mean over space and time
    HFVisionTrunk (trunk="hf", encoders/hf.py): a local transformers vision model per frame

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from encoders.base import ConvBlock, RawInfo, Trunk, check_hf_fields, check_raw, require


@dataclass(frozen=True, kw_only=True)
class CameraConfig:
    image_size: int = 64  # S: frames are S x S (the pipeline resizes)
    num_frames: int = 4  # T: frames per window (the pipeline samples/pads to T)
    width: int = 16  # cnn: channels of the first stage (doubled per stage)
    embed_dim: int = 96  # cnn: trunk output width (hf: the model's hidden size is used)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation of x/255
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    trunk: Literal["cnn", "hf"] = "cnn"
    hf_path: str | None = None  # local transformers model directory (trunk="hf", first build)
    # the hf model's config, filled in by FusionClassifier; when set, the trunk is built from
    # it with fresh weights (the saved model.safetensors supplies them) and hf_path is unused
    hf_config: dict[str, Any] | None = None
    freeze_trunk: bool = False

    def __post_init__(self) -> None:
        require(
            self.image_size >= 32,  # the cnn's last stage (size/16) keeps >= 2x2 values
            f"camera.image_size must be >= 32, got {self.image_size}",
        )
        require(self.num_frames >= 1, f"camera.num_frames must be >= 1, got {self.num_frames}")
        require(
            self.width >= 1 and self.embed_dim >= 1,
            f"camera.width and camera.embed_dim must be >= 1, got {self.width}, {self.embed_dim}",
        )
        require(all(s > 0 for s in self.std), f"camera.std must be > 0, got {self.std}")
        check_hf_fields("camera", self.trunk, self.hf_path, self.hf_config)


class CameraPreprocessor:
    """uint8 RGB frames -> normalised float frames, channels first. Refuses any other input."""

    def __init__(self, cfg: CameraConfig):
        self.cfg = cfg
        self.shape = (cfg.num_frames, cfg.image_size, cfg.image_size, 3)
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)  # [3], [3]
        self.scale = 1.0 / (255.0 * std)  # [3], broadcast over the trailing RGB axis
        self.shift = mean / std  # [3]
        # one mean and std for every channel (the default): scalar ops run ~4x faster than
        # broadcasting [3] over the innermost axis
        self.uniform = (
            (float(self.scale[0]), float(self.shift[0]))
            if (len(set(cfg.mean)) == 1 and len(set(cfg.std)) == 1)
            else None
        )

    def __call__(self, raw: Tensor, info: RawInfo) -> Tensor:
        check_raw(raw, "camera", torch.uint8, self.shape)
        x = raw.float()  # uint8 -> float32 [n, T, S, S, 3]
        if self.uniform is not None:
            x.mul_(self.uniform[0]).sub_(self.uniform[1])  # (x/255 - mean) / std
        else:
            if raw.device != self.scale.device:
                self.scale, self.shift = self.scale.to(raw.device), self.shift.to(raw.device)
            x = torch.addcmul(-self.shift, x, self.scale)  # (x/255 - mean) / std
        # a view: the memory stays channels-last, which the convolutions run ~2x faster on
        return x.permute(0, 1, 4, 2, 3)  # [n, T, S, S, 3] -> [n, T, 3, S, S]


class CameraCNN(Trunk):
    """Per-frame CNN: 4 stride-2 stages (the first a plain conv, then depthwise-separable),
    global average pool over space, then mean over the window's frames."""

    def __init__(self, cfg: CameraConfig):
        super().__init__()
        w = cfg.width
        self.stages = torch.nn.Sequential(
            ConvBlock(3, w, stride=2, separable=False),  # [N, 3, S, S] -> [N, w, S/2, S/2]
            ConvBlock(w, 2 * w, stride=2, separable=True),  # -> [N, 2w, S/4, S/4]
            ConvBlock(2 * w, 4 * w, stride=2, separable=True),  # -> [N, 4w, S/8, S/8]
            ConvBlock(4 * w, cfg.embed_dim, stride=2, separable=True),  # -> [N, E, S/16, S/16]
        )
        self.out_dim = cfg.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        n, t = x.shape[:2]
        x = x.flatten(0, 1)  # [n, T, 3, S, S] -> [n*T, 3, S, S]
        x = self.stages(x)  # [n*T, 3, S, S] -> [n*T, E, S/16, S/16]
        x = x.mean(dim=(2, 3))  # [n*T, E, h, w] -> [n*T, E]
        return x.view(n, t, -1).mean(dim=1)  # [n*T, E] -> [n, T, E] -> [n, E]
