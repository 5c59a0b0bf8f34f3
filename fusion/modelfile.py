"""Model files: a model is a directory with exactly two files.

    model.safetensors   all weights (hf trunks included); safetensors only, never pickle
    config.json         ModelConfig.to_dict() plus
                          "format": "iotfuse.model/v1"
                          "weights_sha256": hex sha256 of the model.safetensors bytes

The model version is "sha256:<weights_sha256>": a content hash of the weights, so every event
names exactly what produced it. Loading recomputes the hash and refuses a mismatch (the weights
changed after saving), refuses pickle-based checkpoints (.bin/.pt/.pth/.pkl: unpickling can
execute arbitrary code) and loads the state dict strictly.

hf trunks: config.json stores the transformers model's full config (camera/audio.hf_config), so
loading rebuilds the architecture from it and never needs the original hf_path directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fusion.config import ModelConfig, ModelConfigError
from fusion.model import FusionClassifier

FORMAT = "iotfuse.model/v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ModelFileError(ValueError):
    """A model directory cannot be used. The message says why and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: FusionClassifier  # in eval mode, on the requested device
    config: ModelConfig
    version: str  # "sha256:<hex>"


def save_model(model: FusionClassifier, directory: str | os.PathLike[str]) -> str:
    """Write model.safetensors and config.json into directory (created if needed); returns the
    version. Each file is written to a temporary name and renamed, weights first."""
    if model.inference_only:
        raise ValueError(
            "this model was folded for inference and no longer has the saved "
            "layout; save the model you trained, before fold_for_inference"
        )
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    # one metadata entry only: safetensors writes metadata in hash-map order, and the version
    # must be the same for the same weights
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    digest = hashlib.sha256(weights).hexdigest()
    config = {**model.config.to_dict(), "format": FORMAT, "weights_sha256": digest}
    _write_atomic(path / WEIGHTS, weights)
    _write_atomic(path / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return f"sha256:{digest}"


def load_model(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> LoadedModel:
    path = Path(directory)
    if not path.is_dir():
        raise ModelFileError(
            f"{path}: not a directory; a model is a directory holding "
            f"{WEIGHTS} and {CONFIG} (written by fusion.modelfile.save_model)"
        )
    weights_path = path / WEIGHTS
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFileError(
                f"{path}: refusing to load {pickles}: pickle-based checkpoints can execute "
                f"arbitrary code when loaded. Only {WEIGHTS} is accepted; convert the weights "
                f"with safetensors (safetensors.torch.save_file) from a trusted environment"
            )
        raise ModelFileError(f"{path}: no {WEIGHTS}; this is not an iotfuse model directory")
    config_data = _read_config(path / CONFIG)
    weights = weights_path.read_bytes()
    digest = hashlib.sha256(weights).hexdigest()
    if digest != config_data["weights_sha256"]:
        raise ModelFileError(
            f"{weights_path}: sha256 is {digest} but {CONFIG} says "
            f"{config_data['weights_sha256']}: the weights changed after the model was saved. "
            f"Restore the original file or save the model again"
        )
    try:
        config = ModelConfig.from_dict(config_data["config"])
    except ModelConfigError as e:
        raise ModelConfigError(f"{path / CONFIG}: {e}") from e
    model = FusionClassifier(config)
    state = load_safetensors(weights)
    _load_state_strict(model, state, weights_path)
    model.to(device).eval()
    return LoadedModel(model=model, config=model.config, version=f"sha256:{digest}")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path}: missing; a model directory needs {CONFIG} next to {WEIGHTS}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    fmt = data.pop("format", None)
    if fmt != FORMAT:
        raise ModelConfigError(
            f"{path}: format is {fmt!r}, expected {FORMAT!r}; this file was "
            f"not written by this version of iotfuse"
        )
    digest = data.pop("weights_sha256", None)
    if not isinstance(digest, str) or len(digest) != 64:
        raise ModelConfigError(
            f"{path}: weights_sha256 must be a 64-digit hex string, got {digest!r}"
        )
    return {"config": data, "weights_sha256": digest}


def _load_state_strict(
    model: FusionClassifier, state: dict[str, torch.Tensor], source: Path
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelFileError(
            f"{source}: the weights do not match the architecture in {CONFIG}: "
            f"missing {_short(missing)}, unexpected {_short(unexpected)}, wrong shape "
            f"{_short(wrong)}. The two files must come from the same save_model call"
        )
    model.load_state_dict(state, strict=True)


def _short(keys: list[str]) -> str:
    return str(keys) if len(keys) <= 5 else f"{keys[:5]} and {len(keys) - 5} more"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
