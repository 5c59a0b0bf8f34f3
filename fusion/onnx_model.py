"""An exported model (written by `iotfuse export`), run on ONNX Runtime. No torch.

An exported model is a directory with exactly two files:

    model.onnx    the graph of fusion/export.py: raw window inputs -> probabilities and the
                  2^M coalition probabilities that exact Shapley attribution needs
    config.json   {"format": "iotfuse.onnx/v1", "graph_sha256": hex sha256 of model.onnx,
                   "source_version": the torch model's version ("sha256:<weights>"),
                   "quantize": "none" | "int8" | "fp16", "opset": ..., "verified": what
                   export measured against torch, "config": the torch model's config}

Its version is "onnx:sha256:<graph> of sha256:<weights>": the content hash of the graph
and the version of the model it was exported from. Loading recomputes the graph's hash
and refuses a mismatch, as fusion/modelfile.py does for weights.

`OnnxModel.predict` takes the windows the pipeline builds (dicts Modality -> raw array),
makes the eager preprocessors' input checks, feeds the graph dense inputs (zeros and
present=False for a modality a window lacks) and returns probabilities, labels and
Shapley attributions as numpy arrays.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.modality import ALL_MODALITIES, Modality
from fusion.shapley import shapley_from_coalitions

FORMAT = "iotfuse.onnx/v1"
GRAPH = "model.onnx"
CONFIG = "config.json"
Window = Mapping[Modality, np.ndarray]


class OnnxModelError(ValueError):
    """An exported model directory cannot be used. The message says why and what to do."""


@dataclass(frozen=True)
class CameraInputs:
    image_size: int
    num_frames: int


@dataclass(frozen=True)
class AudioInputs:
    sample_rate: int


@dataclass(frozen=True)
class TelemetryInputs:
    metrics: tuple[str, ...]
    steps: int


@dataclass(frozen=True)
class ServingConfig:
    """What serving an exported model needs of its config (the fields the pipeline reads
    of a ModelConfig), read from JSON without torch."""

    name: str
    classes: tuple[str, ...]
    window_ms: int
    modalities: tuple[Modality, ...]
    camera: CameraInputs | None = None
    audio: AudioInputs | None = None
    telemetry: TelemetryInputs | None = None

    @classmethod
    def from_dict(cls, data: Any) -> ServingConfig:
        """Raises ValueError naming what is wrong (the full config was validated by the
        torch model's loader before export; this guards against edits since)."""
        if not isinstance(data, dict):
            raise ValueError("config: expected an object")
        try:
            name, window_ms = str(data["name"]), int(data["window_ms"])
            classes = tuple(str(c) for c in data["classes"])
            modalities = tuple(Modality(m) for m in data.get("modalities", ALL_MODALITIES))
            cam, aud, tel = (data.get(m.value) or {} for m in ALL_MODALITIES)
            return cls(
                name=name,
                classes=classes,
                window_ms=window_ms,
                modalities=modalities,
                camera=CameraInputs(int(cam.get("image_size", 64)), int(cam.get("num_frames", 4)))
                if Modality.CAMERA in modalities
                else None,
                audio=AudioInputs(int(aud.get("sample_rate", 16000)))
                if Modality.AUDIO in modalities
                else None,
                telemetry=TelemetryInputs(tuple(tel["metrics"]), int(tel.get("steps", 20)))
                if Modality.TELEMETRY in modalities
                else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"config: {type(e).__name__}: {e}") from e

    def input_spec(self, m: Modality) -> tuple[np.dtype[Any], tuple[int, ...]]:
        """The dtype and per-window shape of modality m's raw input."""
        if m is Modality.CAMERA and self.camera is not None:
            s = self.camera.image_size
            return np.dtype(np.uint8), (self.camera.num_frames, s, s, 3)
        if m is Modality.AUDIO and self.audio is not None:
            return np.dtype(np.float32), (self.audio.sample_rate * self.window_ms // 1000,)
        if m is Modality.TELEMETRY and self.telemetry is not None:
            return np.dtype(np.float32), (self.telemetry.steps, len(self.telemetry.metrics))
        raise ValueError(f"the model does not use {m}")


def version_of(graph: bytes, source_version: str) -> str:
    return f"onnx:sha256:{hashlib.sha256(graph).hexdigest()} of {source_version}"


@dataclass
class OnnxModel:
    session: Any  # onnxruntime.InferenceSession
    config: ServingConfig
    version: str
    manifest: dict[str, Any]  # config.json as written by export

    @classmethod
    def from_bytes(
        cls,
        graph: bytes,
        manifest: dict[str, Any],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
    ) -> OnnxModel:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (a core each)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings name graph internals
        if manifest.get("quantize") == "fp16":
            # onnxruntime 1.32's full (layout) optimisation crashes the process on this
            # float16 graph with float32 preprocessing; the extended level does not
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session = ort.InferenceSession(graph, options, providers=list(providers))
        config = ServingConfig.from_dict(manifest["config"])
        return cls(session, config, version_of(graph, manifest["source_version"]), manifest)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
    ) -> OnnxModel:
        path = Path(directory)
        graph_path, config_path = path / GRAPH, path / CONFIG
        if not graph_path.is_file() or not config_path.is_file():
            raise OnnxModelError(
                f"{path}: an exported model needs {GRAPH} and {CONFIG} (written by "
                f"`iotfuse export`)"
            )
        try:
            manifest = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OnnxModelError(f"{config_path}: not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise OnnxModelError(
                f"{config_path}: format is {got!r}, expected {FORMAT!r}; export the model "
                f"again with this version of iotfuse"
            )
        graph = graph_path.read_bytes()
        digest = hashlib.sha256(graph).hexdigest()
        if digest != manifest.get("graph_sha256"):
            raise OnnxModelError(
                f"{graph_path}: sha256 is {digest} but {CONFIG} says "
                f"{manifest.get('graph_sha256')}: the graph changed after export. Export "
                f"the model again"
            )
        try:
            return cls.from_bytes(graph, manifest, providers, threads)
        except ValueError as e:
            raise OnnxModelError(f"{config_path}: {e}") from e

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def feeds(self, windows: Sequence[Window]) -> dict[str, np.ndarray]:
        """Dense graph inputs of the windows; raises ValueError on input the eager model
        refuses (an unknown or unused modality, a wrong shape or dtype, NaN or infinite
        audio, infinite telemetry)."""
        cfg, b = self.config, len(windows)
        for i, window in enumerate(windows):
            unknown = [str(k) for k in window if k not in cfg.modalities]
            if unknown:
                raise ValueError(
                    f"window {i} has modality {unknown} but model {cfg.name!r} uses only "
                    f"{[str(m) for m in cfg.modalities]}; leave it out of the windows"
                )
        out: dict[str, np.ndarray] = {}
        present = np.zeros((b, len(cfg.modalities)), dtype=bool)  # [B, M]
        for j, m in enumerate(cfg.modalities):
            dtype, shape = cfg.input_spec(m)
            dense = np.zeros((b, *shape), dtype=dtype)  # [B, ...] zeros where absent
            for i, window in enumerate(windows):
                if m in window:
                    x = np.asarray(window[m])
                    if x.dtype != dtype or x.shape != shape:
                        raise ValueError(
                            f"{m}: expected {dtype} of shape {list(shape)}, got {x.dtype} of "
                            f"shape {list(x.shape)}; the model config fixes this shape"
                        )
                    dense[i] = x
                    present[i, j] = True
            if m is Modality.AUDIO and not np.isfinite(dense).all():
                raise ValueError(
                    "audio: the waveform contains NaN or infinity; send zeros for missing audio"
                )
            if m is Modality.TELEMETRY and np.isinf(dense).any():
                raise ValueError("telemetry: a value is infinite; use NaN for a missing metric")
            out[m.value] = dense
        out["present"] = present
        return out

    def predict(self, windows: Sequence[Window]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs float32 [B, C], label int64 [B], attribution float32 [B, M])."""
        feeds = self.feeds(windows)
        probs, coalition_probs = self.session.run(None, feeds)  # [B, C], [2^M, B, C]
        label = probs.argmax(axis=1)  # [B, C] -> [B]
        attribution = shapley_from_coalitions(coalition_probs, label, feeds["present"])
        return probs, label, attribution

    def labels(self, windows: Sequence[Window]) -> np.ndarray:
        """The predicted class index of each window: int64 [B]."""
        return self.predict(windows)[1] if windows else np.zeros(0, dtype=np.int64)

    def label_classifier(self, batch_size: int) -> Callable[[Sequence[Window]], np.ndarray]:
        """`labels`, `batch_size` windows at a time (as evaluation scores a torch model)."""

        def classify(windows: Sequence[Window]) -> np.ndarray:
            parts = [
                self.labels(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)
            ]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        return classify
