"""Glue between windows and the fusion model: load a model dir, classify window inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.modality import Modality
from fusion.batch import WindowBatch
from fusion.modelfile import load_model
from pipeline.errors import UserError
from pipeline.stream.features import FeatureSpec
from pipeline.stream.outputs import Decision, ModelId


class ModelNotFoundError(UserError):
    pass


def default_model_dir() -> Path:
    return Path(str(resources.files("fusion") / "default_model"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    return torch.device(name)


@dataclass
class ModelRunner:
    """A loaded model, ready to classify batches of window inputs."""

    model: Any
    config: Any
    version: str
    device: torch.device

    @classmethod
    def load(cls, directory: str | Path | None, device: str = "auto") -> ModelRunner:
        path = Path(directory) if directory else default_model_dir()
        if not (path / "config.json").exists():
            hint = (
                "train one with `iotfuse train --data REC --out DIR` and pass --model DIR"
                if not directory
                else "pass a directory written by `iotfuse train`"
            )
            raise ModelNotFoundError(f"no iotfuse model at {path} (config.json missing): {hint}")
        dev = resolve_device(device)
        try:
            loaded = load_model(path, device=str(dev))
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot load the model in {path}: {exc}") from exc
        loaded.model.fold_for_inference()
        return cls(loaded.model, loaded.config, loaded.version, dev)

    @property
    def model_id(self) -> ModelId:
        return ModelId(name=self.config.name, version=self.version)

    @property
    def features(self) -> FeatureSpec:
        return FeatureSpec.from_model_config(self.config)

    def classify(self, windows: Sequence[dict[Modality, np.ndarray]]) -> list[Decision]:
        if not windows:
            return []
        rate = self.config.audio.sample_rate if self.config.audio is not None else 16000
        batch = WindowBatch.collate(windows, audio_sample_rate=rate).to(self.device)
        pred = self.model.predict(batch)
        probs = pred.probs.detach().cpu().numpy()  # [B, C]
        attribution = pred.attribution.detach().cpu().numpy()  # [B, M]
        classes = list(self.config.classes)
        slots = list(self.config.modalities)
        out: list[Decision] = []
        for b in range(len(windows)):
            k = int(probs[b].argmax())
            out.append(
                Decision(
                    label=classes[k],
                    confidence=float(probs[b, k]),
                    scores={c: float(p) for c, p in zip(classes, probs[b], strict=True)},
                    attribution={
                        Modality(m): float(a) for m, a in zip(slots, attribution[b], strict=True)
                    },
                )
            )
        return out
