"""Glue between windows and the fusion model: load a model dir, classify window inputs.

A model directory is either a torch model (`iotfuse train`: model.safetensors) or an
exported one (`iotfuse export`: model.onnx, run on ONNX Runtime by
pipeline/stream/onnx_runner.py); `ModelRunner.load` chooses by what the directory holds,
and both classify the same windows into the same decisions. torch is imported only for a
torch model, so an install without torch (`pip install iotfuse[edge]`) serves exported
models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from encoders.modality import Modality
from fusion.onnx_model import OnnxModel
from pipeline.errors import UserError
from pipeline.stream.features import FeatureSpec
from pipeline.stream.outputs import Decision, ModelId

if TYPE_CHECKING:
    import torch

TORCH_MISSING = (
    "torch is not installed (an edge install); install the full one (pip install "
    "'iotfuse[full]') or serve an exported model (iotfuse export --out DIR, then --model DIR)"
)


Window = dict[Modality, np.ndarray]


class ModelNotFoundError(UserError):
    pass


def default_model_dir() -> Path:
    return Path(str(resources.files("fusion") / "default_model"))


def import_torch() -> Any:
    """torch, or a UserError saying what to install."""
    try:
        import torch
    except ImportError:
        raise UserError(f"this needs torch: {TORCH_MISSING}") from None
    return torch


def resolve_device(name: str) -> torch.device:
    th = import_torch()
    if name == "auto":
        name = "cuda" if th.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not th.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    device: torch.device = th.device(name)
    return device


def set_inference_threads(threads: int) -> None:
    """The process's CPU budget for inference: torch's threads (when torch is installed)
    and every ONNX Runtime session created afterwards."""
    from pipeline.stream import onnx_runner

    onnx_runner.THREADS = threads
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


@dataclass
class ModelRunner:
    """A loaded model, ready to classify batches of window inputs."""

    model: Any  # a folded FusionClassifier, or an OnnxModel
    config: Any  # its ModelConfig, or the exported model's fusion.onnx_model.ServingConfig
    version: str
    device: Any  # torch.device, or the ONNX Runtime device name ("cpu", "cuda")

    @classmethod
    def load(cls, directory: str | Path | None, device: str = "auto") -> ModelRunner:
        from pipeline.stream import onnx_runner

        path = Path(directory) if directory else default_model_dir()
        if not (path / "config.json").exists():
            hint = (
                "train one with `iotfuse train --data REC --out DIR` and pass --model DIR"
                if not directory
                else "pass a directory written by `iotfuse train` or `iotfuse export`"
            )
            raise ModelNotFoundError(f"no iotfuse model at {path} (config.json missing): {hint}")
        if onnx_runner.is_exported(path):
            model = onnx_runner.load(path, device)
            return cls(model, model.config, model.version, onnx_runner.device_name(model))
        try:
            import torch  # noqa: F401  (only to say what to install when it is missing)
        except ImportError:
            raise UserError(f"{path} is a torch model but {TORCH_MISSING}") from None
        from fusion.modelfile import load_model

        dev = resolve_device(device)
        try:
            loaded = load_model(path, device=str(dev))
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot load the model in {path}: {exc}") from exc
        loaded.model.fold_for_inference()
        return cls(loaded.model, loaded.config, loaded.version, dev)

    @property
    def exported(self) -> bool:
        return isinstance(self.model, OnnxModel)

    @property
    def model_id(self) -> ModelId:
        return ModelId(name=self.config.name, version=self.version)

    @property
    def features(self) -> FeatureSpec:
        return FeatureSpec.from_model_config(self.config)

    def predict(self, windows: Sequence[dict[Modality, np.ndarray]]) -> tuple[Any, Any]:
        """(probs float32 [B, C], Shapley attribution float32 [B, M]) as numpy arrays."""
        if isinstance(self.model, OnnxModel):
            probs, _label, attribution = self.model.predict(windows)
            return probs, attribution
        from fusion.batch import WindowBatch

        rate = self.config.audio.sample_rate if self.config.audio is not None else 16000
        batch = WindowBatch.collate(windows, audio_sample_rate=rate).to(self.device)
        pred = self.model.predict(batch)
        return pred.probs.detach().cpu().numpy(), pred.attribution.detach().cpu().numpy()

    def classifier(self, explain_top: int) -> Callable[[Sequence[Window]], list[Decision]]:
        """`classify`, or with runtime.explain_telemetry_top > 0 a classify whose decisions
        also name that many telemetry metrics (`explanation.telemetry`); a torch model only."""
        if explain_top < 0:
            raise UserError(
                f"runtime.explain_telemetry_top={explain_top}: use 0 (off) or a number of metrics"
            )
        if explain_top and self.exported:
            raise UserError(
                "runtime.explain_telemetry_top needs a torch model: an exported (ONNX) model "
                "cannot be explained; serve the torch model, or set it to 0"
            )
        return (
            functools.partial(self.classify, explain_top=explain_top)
            if explain_top
            else self.classify
        )

    def classify(self, windows: Sequence[Window], explain_top: int = 0) -> list[Decision]:
        if not windows:
            return []
        explained = None  # [B, metrics]: fall of p(label) without each metric
        if explain_top and self.config.telemetry is not None:
            probs, attribution, explained = self._predict_explained(windows)
        else:
            probs, attribution = self.predict(windows)  # [B, C], [B, M]
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
                    explanation=(
                        None
                        if not explain_top
                        else {"telemetry": top_metrics(self.metrics, explained, b, explain_top)}
                    ),
                )
            )
        return out

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.config.telemetry.metrics) if self.config.telemetry is not None else ()

    def _predict_explained(self, windows: Sequence[Window]) -> tuple[Any, Any, Any]:
        """`predict`, and per window and telemetry metric the fall of the predicted class's
        probability when the metric is absent (fusion.explain.predict_with_telemetry)."""
        from fusion.batch import WindowBatch
        from fusion.explain import predict_with_telemetry

        rate = self.config.audio.sample_rate if self.config.audio is not None else 16000
        batch = WindowBatch.collate(windows, audio_sample_rate=rate).to(self.device)
        pred, per_metric = predict_with_telemetry(self.model, batch)
        return pred.probs.cpu().numpy(), pred.attribution.cpu().numpy(), per_metric.cpu().numpy()


def top_metrics(names: Sequence[str], values: Any, row: int, k: int) -> list[tuple[str, float]]:
    """The k metrics with the largest values in `values[row]` (NaN: no telemetry: none)."""
    if values is None or np.isnan(values[row]).all():
        return []
    order = sorted(range(len(names)), key=lambda j: -float(values[row, j]))[:k]
    return [(names[j], round(float(values[row, j]), 6)) for j in order]
