"""Telemetry encoder: a window of numeric metrics -> one feature vector.

Raw input (built by the pipeline): float32 [steps, n_metrics] per window, metric order =
`TelemetryConfig.metrics`, NaN = the metric was absent in that time step. Batched: [n, steps, M].

    TelemetryPreprocessor: normalise with the stored per-metric mean/std (clamped to +-1e4
        standard deviations), mask from NaN, NaN -> 0
        float32 [n, steps, M] -> [n, steps, 2M] (M value channels, then M mask channels)
    TelemetryCNN: 1D convs over time, mean- and max-pooled

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from encoders.base import ConvBlock, RawInfo, Trunk, check_raw, require


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    metrics: tuple[str, ...]  # metric names, in the column order of the raw input
    steps: int = 20  # time steps per window (the pipeline resamples metrics onto them)
    mean: tuple[float, ...] = ()  # per metric; () = not fitted: 0 for every metric
    std: tuple[float, ...] = ()  # per metric, > 0; () = not fitted: 1 for every metric
    width: int = 32  # channels of the first conv
    embed_dim: int = 64  # trunk output width (half mean-pooled, half max-pooled features)

    def __post_init__(self) -> None:
        m = len(self.metrics)
        require(m >= 1, "telemetry.metrics is empty: list the metric names the model reads")
        require(len(set(self.metrics)) == m, f"telemetry.metrics has duplicates: {self.metrics}")
        require(all(name for name in self.metrics), "telemetry.metrics has an empty name")
        require(self.steps >= 1, f"telemetry.steps must be >= 1, got {self.steps}")
        if not self.mean:
            object.__setattr__(self, "mean", (0.0,) * m)
        if not self.std:
            object.__setattr__(self, "std", (1.0,) * m)
        require(
            len(self.mean) == m and len(self.std) == m,
            f"telemetry.mean/std need one value per metric ({m}), got {len(self.mean)} "
            f"and {len(self.std)}; compute them with fusion.train.fit_telemetry_stats",
        )
        require(all(math.isfinite(v) for v in self.mean), "telemetry.mean must be finite")
        require(
            all(math.isfinite(v) and v > 0 for v in self.std),
            f"telemetry.std must be finite and > 0, got {self.std}",
        )
        require(self.width >= 1, f"telemetry.width must be >= 1, got {self.width}")
        require(
            self.embed_dim >= 2 and self.embed_dim % 2 == 0,
            f"telemetry.embed_dim must be even and >= 2, got {self.embed_dim}",
        )


MAX_NORMALISED = 1e4  # standard deviations: far past any real reading, far below overflow


class TelemetryPreprocessor:
    """Raw metrics with NaN holes -> normalised values plus a presence mask per metric."""

    def __init__(self, cfg: TelemetryConfig):
        self.shape = (cfg.steps, len(cfg.metrics))
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)  # [M]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)  # [M]

    def __call__(self, raw: Tensor, info: RawInfo) -> Tensor:
        check_raw(raw, "telemetry", torch.float32, self.shape)
        if bool(torch.isinf(raw).any()):
            raise ValueError("telemetry: a value is infinite; use NaN for a missing metric")
        if raw.device != self.mean.device:
            self.mean, self.std = self.mean.to(raw.device), self.std.to(raw.device)
        present = ~torch.isnan(raw)  # [n, steps, M] bool
        x = torch.where(present, (raw - self.mean) / self.std, 0.0)  # [n, steps, M], NaN -> 0
        x = x.clamp(-MAX_NORMALISED, MAX_NORMALISED)  # 3e38 / std would overflow the trunk
        return torch.cat([x, present.float()], dim=-1)  # -> [n, steps, 2M]


class TelemetryCNN(Trunk):
    """Three 1D conv blocks over time, then mean- and max-pooling over time, concatenated."""

    def __init__(self, cfg: TelemetryConfig):
        super().__init__()
        c_in, w, half = 2 * len(cfg.metrics), cfg.width, cfg.embed_dim // 2
        self.stages = torch.nn.Sequential(
            ConvBlock(c_in, w, stride=1, separable=False, dims=1),  # [n, 2M, L] -> [n, w, L]
            ConvBlock(w, 2 * w, stride=2, separable=False, dims=1),  # -> [n, 2w, L/2]
            ConvBlock(2 * w, half, stride=1, separable=False, dims=1),  # -> [n, E/2, L/2]
        )
        self.out_dim = cfg.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # [n, steps, 2M] -> [n, 2M, steps]
        x = self.stages(x)  # [n, 2M, steps] -> [n, E/2, steps/2]
        return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)  # -> [n, E]
