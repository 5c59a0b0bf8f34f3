"""Serving an exported model (`iotfuse export`) on ONNX Runtime: which directories are
exported models, which execution provider a `--device` asks for, and loading errors as
one line for the user. No torch here: this is the path of an install without it.

    --device auto   CUDA when this onnxruntime has its CUDA provider, else the CPU
    --device cpu    the CPU provider
    --device cuda   the CUDA provider (onnxruntime-gpu), refused where it is missing

The ModelRunner (pipeline/stream/model_runner.py) wraps the loaded model, so the engine,
the worker and the commands serve both kinds of model the same way.
"""

from __future__ import annotations

from pathlib import Path

from fusion.onnx_model import GRAPH, OnnxModel, OnnxModelError
from pipeline.errors import UserError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
THREADS = 0  # intra-op threads of new sessions (runtime.torch_threads); 0 = one per core


def is_exported(directory: Path) -> bool:
    return (directory / GRAPH).is_file()


def providers_for(device: str, available: list[str]) -> list[str]:
    """The execution providers a --device asks for, most preferred first."""
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda"):
        if CUDA not in available:
            raise UserError(
                f"device {device!r} requested but this onnxruntime has no CUDA provider "
                f"(it has {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        return [CUDA, CPU]
    raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")


def load(directory: Path, device: str) -> OnnxModel:
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            f"{directory} is an exported model but onnxruntime is not installed; "
            f"pip install 'iotfuse[edge]' (or the full install)"
        ) from None
    providers = providers_for(device, onnxruntime.get_available_providers())
    try:
        return OnnxModel.load(directory, providers, THREADS)
    except OnnxModelError as exc:
        raise UserError(f"cannot load the exported model in {directory}: {exc}") from exc
    except Exception as exc:  # onnxruntime's own errors (a damaged graph) have no common type
        raise UserError(
            f"cannot load the exported model in {directory}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; export it again"
        ) from exc


def device_name(model: OnnxModel) -> str:
    """What the model runs on, as the commands print it ('cpu', 'cuda')."""
    return "cuda" if model.providers[0] == CUDA else "cpu"
