"""The model configuration: one small frozen dataclass per part, JSON round trip that validates.

    ModelConfig
      name, classes, window_ms, modalities      what the model classifies, from what
      camera: CameraConfig | None               one section per modality in `modalities`
      audio: AudioConfig | None                 (the modality configs live next to their
      telemetry: TelemetryConfig | None          encoders, in encoders/, and are re-exported here)
      fusion: FusionConfig                      the transformer over modality tokens
      conv_norm: "batch" | "group"              the CNN trunks' norm ("group" for DP-SGD)
      privacy: PrivacyConfig | None             how DP-SGD trained it (absent: no DP)

`ModelConfig.from_dict` accepts exactly what `to_dict` writes (plain JSON data) and refuses
anything else with a ModelConfigError naming the field: unknown keys, wrong types, missing
required fields, empty or duplicate classes, a section for a modality the model does not use.
Camera and audio sections may be omitted (defaults are used); telemetry needs its metric names.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from encoders.audio import AudioConfig
from encoders.base import ConvNorm, ModelConfigError, require
from encoders.camera import CameraConfig
from encoders.modality import ALL_MODALITIES, Modality
from encoders.telemetry import TelemetryConfig

__all__ = [
    "AudioConfig",
    "CameraConfig",
    "FusionConfig",
    "ModelConfig",
    "ModelConfigError",
    "PrivacyConfig",
    "TelemetryConfig",
]


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    dim: int = 64  # D: width of every modality token and of the fusion transformer
    layers: int = 2  # transformer encoder layers (pre-norm; feed-forward width 4 * dim)
    heads: int = 4  # attention heads, must divide dim
    dropout: float = 0.1
    modality_dropout: float = 0.25  # training default: drop a present modality with this prob

    def __post_init__(self) -> None:
        require(
            self.dim >= 1 and self.layers >= 1 and self.heads >= 1,
            f"fusion.dim/layers/heads must be >= 1, got {self.dim}/{self.layers}/{self.heads}",
        )
        require(
            self.dim % self.heads == 0,
            f"fusion.heads={self.heads} must divide fusion.dim={self.dim}",
        )
        require(0.0 <= self.dropout < 1.0, f"fusion.dropout must be in [0, 1), got {self.dropout}")
        require(
            0.0 <= self.modality_dropout < 1.0,
            f"fusion.modality_dropout must be in [0, 1), got {self.modality_dropout}",
        )


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """What DP-SGD (Opacus) spent training the model: (epsilon, delta)-DP for each
    training example, with respect to the training windows (of each site, when federated)."""

    epsilon: float  # spent, by the accountant, after the last step
    delta: float
    target_epsilon: float  # what was asked for (--dp-epsilon)
    noise_multiplier: float  # Gaussian noise std / max_grad_norm
    max_grad_norm: float  # each example's gradient clipped to this L2 norm
    sample_rate: float  # Poisson sampling rate of a step (expected batch / examples)
    steps: int  # optimiser steps (of the site that spent the most, when federated)
    accountant: str = "rdp"
    scope: Literal["central", "per-site"] = "central"
    # the version of the model training started from ("" from scratch): its own training
    # data is outside the guarantee (a public model, e.g. the shipped one)
    init_version: str = ""

    def __post_init__(self) -> None:
        require(
            self.epsilon >= 0 and self.target_epsilon > 0,
            f"privacy.epsilon must be >= 0 and target_epsilon > 0, got {self.epsilon}, "
            f"{self.target_epsilon}",
        )
        require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        require(
            self.noise_multiplier >= 0 and self.max_grad_norm > 0,
            "privacy.noise_multiplier must be >= 0 and max_grad_norm > 0",
        )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    classes: tuple[str, ...]  # C class names; logits and scores follow this order
    window_ms: int = 2000
    modalities: tuple[Modality, ...] = ALL_MODALITIES  # token slot order of the fusion model
    camera: CameraConfig | None = None
    audio: AudioConfig | None = None
    telemetry: TelemetryConfig | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)
    conv_norm: ConvNorm = "batch"  # "group": GroupNorm in every CNN block (DP-compatible)
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and bool(self.name.strip()), "name must be non-empty")
        require(
            len(self.classes) >= 2,
            f"classes must list at least 2 class names, got {list(self.classes)}",
        )
        require(
            all(isinstance(c, str) and c for c in self.classes),
            f"classes must be non-empty strings, got {list(self.classes)}",
        )
        require(
            len(set(self.classes)) == len(self.classes),
            f"classes has duplicates: {list(self.classes)}",
        )
        require(self.window_ms >= 1, f"window_ms must be >= 1, got {self.window_ms}")
        require(
            self.conv_norm in ("batch", "group"),
            f'conv_norm must be "batch" or "group", got {self.conv_norm!r}',
        )
        try:
            modalities = tuple(Modality(m) for m in self.modalities)
        except ValueError as e:
            raise ModelConfigError(f"modalities: {e}; known: {[str(m) for m in Modality]}") from e
        require(len(modalities) >= 1, "modalities is empty: name at least one")
        require(len(set(modalities)) == len(modalities), f"modalities has duplicates: {modalities}")
        object.__setattr__(self, "modalities", modalities)
        defaults = {Modality.CAMERA: CameraConfig, Modality.AUDIO: AudioConfig}
        for m in Modality:
            section = getattr(self, m.value)
            if m not in modalities:
                require(
                    section is None,
                    f"a {m} section is given but {m} is not in modalities "
                    f"{[str(x) for x in modalities]}; remove one of them",
                )
            elif section is None:
                require(
                    m in defaults,
                    f"{m} is in modalities but has no {m} section "
                    f"(it needs at least the metric names)",
                )
                object.__setattr__(self, m.value, defaults[m]())
        if self.audio is not None:
            require(
                self.audio.window_samples(self.window_ms) >= self.audio.n_fft,
                f"window_ms={self.window_ms} holds fewer than audio.n_fft="
                f"{self.audio.n_fft} samples",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; absent modality sections are left out."""
        data = _to_json(self)
        assert isinstance(data, dict)
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Validate and build; raises ModelConfigError naming the offending field."""
        result = _from_json(cls, data, "config")
        assert isinstance(result, ModelConfig)
        return result


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Modality):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _from_json(tp: Any, value: Any, path: str) -> Any:
    """Convert JSON data to the annotated type `tp`, refusing anything that does not fit."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, value, path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_from_json(tp, value, path)
    if origin is Literal:
        _expect(value in args, path, f"one of {list(args)}", value)
        return value
    if origin is tuple:
        _expect(isinstance(value, (list, tuple)), path, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        _expect(len(value) == len(args), path, f"a list of {len(args)} values", value)
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_from_json(a, v, f"{path}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        _expect(
            isinstance(value, dict) and all(isinstance(k, str) for k in value),
            path,
            "an object",
            value,
        )
        return dict(value)
    if tp is Modality:
        _expect(
            value in [m.value for m in Modality],
            path,
            f"one of {[m.value for m in Modality]}",
            value,
        )
        return Modality(value)
    if tp is bool:
        _expect(isinstance(value, bool), path, "true or false", value)
    elif tp is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), path, "an integer", value)
    elif tp is float:
        _expect(
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value),
            path,
            "a finite number",
            value,
        )
        return float(value)
    elif tp is str:
        _expect(isinstance(value, str), path, "a string", value)
    else:
        raise TypeError(f"{path}: unsupported config field type {tp!r}")  # a bug, not bad input
    return value


def _dataclass_from_json(cls: type[Any], value: Any, path: str) -> Any:
    _expect(isinstance(value, dict), path, "an object", value)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ModelConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = [
        n
        for n, f in fields.items()
        if n not in value
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ModelConfigError(f"{path}: missing required key(s) {missing}")
    hints = get_type_hints(cls)
    kwargs = {name: _from_json(hints[name], v, f"{path}.{name}") for name, v in value.items()}
    return cls(**kwargs)


def _expect(ok: bool, path: str, expected: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ModelConfigError(f"{path}: expected {expected}, got {type(value).__name__} {shown}")
