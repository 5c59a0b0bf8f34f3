"""A fusion model as one ONNX graph: the whole per-window computation, for ONNX Runtime.

    ExportGraph(model)(camera, audio, telemetry, present) -> (probs, coalition_probs)

Inputs are dense over the batch, one per modality of the model in slot order (a row whose
window lacks the modality holds zeros, and `present` masks its token exactly as the torch
model masks an absent one):

    camera     uint8   [B, T, S, S, 3]
    audio      float32 [B, samples]
    telemetry  float32 [B, steps, M], NaN = missing
    present    bool    [B, M]   which modality slots each window has

Outputs:

    probs           float32 [B, C]        softmax over the classes
    coalition_probs float32 [2^M, B, C]   the same with only the slots of coalition s
                                          attended (s as in fusion.attribution.coalitions);
                                          exact Shapley values follow from it
                                          (fusion.shapley.shapley_from_coalitions)

What differs from the eager model, and why the outputs still match:
- torch.stft with complex output does not export: the log-mel is computed with a
  real-valued DFT, one conv1d with fixed cos and sin kernels times the same Hann window,
  over the same reflect-padded signal; power, mel filter bank and log are the eager ones.
- The eager preprocessors refuse bad input (wrong dtype or shape, NaN audio, infinite
  telemetry) with data-dependent checks that stop export; the graph leaves them out and
  the runner makes the same checks on the arrays before it feeds them.
- BatchNorms are folded into their convolutions (as `iotfuse run` does for torch).

`export_graph` refuses a model it cannot export faithfully (an `hf` trunk) with
`UnexportableModel`, whose message says why and what to do.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from encoders.audio import LOG_EPS, AudioPreprocessor
from encoders.camera import CameraPreprocessor
from encoders.modality import Modality
from encoders.telemetry import MAX_NORMALISED, TelemetryPreprocessor
from fusion.attribution import coalitions
from fusion.batch import WindowBatch
from fusion.model import FusionClassifier
from fusion.onnx_model import CONFIG, FORMAT, GRAPH, OnnxModel, version_of

OPSET = 18
INPUT_NAMES = {m: m.value for m in Modality}  # graph input of each modality
PRESENT, PROBS, COALITIONS = "present", "probs", "coalition_probs"


class UnexportableModel(ValueError):
    """The model cannot be exported faithfully; the message says why and what to do."""


def check_exportable(model: FusionClassifier) -> None:
    for m in model.modalities:
        section = getattr(model.config, m.value)
        if getattr(section, "trunk", "cnn") != "cnn":
            raise UnexportableModel(
                f"{m}.trunk is {section.trunk!r} (a transformers model): only the cnn trunks "
                f"are exported and checked; serve this model with torch (the full install)"
            )


class RealLogMel(nn.Module):
    """The AudioPreprocessor's log-mel without complex numbers: float32 [n, samples] ->
    [n, n_mels, frames], the eager centred STFT (reflect padding, periodic Hann window)."""

    def __init__(self, pre: AudioPreprocessor):
        super().__init__()
        n_fft, hop = pre.cfg.n_fft, pre.cfg.hop_length
        window = pre.stft.window.double()  # [n_fft]
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)  # [F'] frequency bins
        t = torch.arange(n_fft, dtype=torch.float64)  # [n_fft]
        angle = 2 * math.pi * k[:, None] * t[None, :] / n_fft  # [F', n_fft]
        basis = torch.cat([angle.cos(), -angle.sin()]) * window  # -> [2F', n_fft]
        self.register_buffer("basis", basis.float().unsqueeze(1))  # -> [2F', 1, n_fft]
        self.register_buffer("fb", pre.mel.fb.clone())  # [F', F]
        self.n_fft, self.hop, self.bins = n_fft, hop, n_fft // 2 + 1

    def forward(self, wave: Tensor) -> Tensor:
        pad = self.n_fft // 2
        x = nn.functional.pad(
            wave.unsqueeze(1), (pad, pad), mode="reflect"
        )  # [n, 1, samples+n_fft]
        z = nn.functional.conv1d(x, self.basis, stride=self.hop)  # -> [n, 2F', L]
        re, im = z[:, : self.bins], z[:, self.bins :]  # [n, F', L] each
        power = re.square() + im.square()  # [n, F', L]
        mel = torch.matmul(power.transpose(1, 2), self.fb).transpose(1, 2)  # -> [n, F, L]
        return torch.log(mel + LOG_EPS)  # [n, F, L]


class CameraInput(nn.Module):
    """The CameraPreprocessor's arithmetic: uint8 [n, T, S, S, 3] -> float [n, T, 3, S, S]."""

    def __init__(self, pre: CameraPreprocessor):
        super().__init__()
        self.register_buffer("scale", pre.scale.clone().float())  # [3]
        self.register_buffer("shift", pre.shift.clone().float())  # [3]

    def forward(self, raw: Tensor) -> Tensor:
        x = raw.float() * self.scale - self.shift  # (x/255 - mean) / std, [n, T, S, S, 3]
        return x.permute(0, 1, 4, 2, 3)  # [n, T, S, S, 3] -> [n, T, 3, S, S]


class TelemetryInput(nn.Module):
    """The TelemetryPreprocessor's arithmetic: [n, steps, M] with NaN -> [n, steps, 2M]."""

    def __init__(self, pre: TelemetryPreprocessor):
        super().__init__()
        self.register_buffer("mean", pre.mean.clone())  # [M]
        self.register_buffer("std", pre.std.clone())  # [M]

    def forward(self, raw: Tensor) -> Tensor:
        present = ~torch.isnan(raw)  # [n, steps, M] bool
        x = torch.where(present, (raw - self.mean) / self.std, 0.0)  # [n, steps, M]
        x = x.clamp(-MAX_NORMALISED, MAX_NORMALISED)  # as the eager preprocessor
        return torch.cat([x, present.float()], dim=-1)  # -> [n, steps, 2M]


def graph_preprocessor(model: FusionClassifier, m: Modality) -> nn.Module:
    pre = model.preprocess[m]
    if isinstance(pre, CameraPreprocessor):
        return CameraInput(pre)
    if isinstance(pre, AudioPreprocessor):
        return RealLogMel(pre)
    assert isinstance(pre, TelemetryPreprocessor)
    return TelemetryInput(pre)


class ExportGraph(nn.Module):
    """The per-window computation of a (folded, eval-mode) FusionClassifier, dense inputs."""

    def __init__(self, model: FusionClassifier):
        super().__init__()
        self.model = model
        self.modalities = model.modalities
        self.pre = nn.ModuleDict({m.value: graph_preprocessor(model, m) for m in model.modalities})
        self.register_buffer("sets", coalitions(len(model.modalities)))  # [2^M, M] bool

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        *raw, present = inputs  # M dense raw tensors [B, ...], present [B, M]
        slots = []
        for i, (m, x) in enumerate(zip(self.modalities, raw, strict=True)):
            x = self.pre[m.value](x)  # [B, ...] -> trunk input [B, ...]
            x = self.model.trunks[m.value](x)  # -> [B, E]
            x = self.model.postprocess[m.value](self.model.heads[m.value](x))  # -> [B, D]
            slots.append(torch.where(present[:, i : i + 1], x, 0.0))  # absent rows: zeros
        tokens = torch.stack(slots, dim=1)  # M x [B, D] -> [B, M, D]
        s, (b, m, d) = self.sets.shape[0], tokens.shape
        mask = self.sets[:, None, :] & present[None, :, :]  # [2^M, 1, M] & [1, B, M] -> [2^M, B, M]
        x = tokens.unsqueeze(0).expand(s, b, m, d)  # [B, M, D] -> [2^M, B, M, D]
        logits = self.model.fuse(x.reshape(-1, m, d), mask.reshape(-1, m))  # -> [2^M * B, C]
        coalition_probs = logits.softmax(dim=-1).reshape(s, b, -1)  # -> [2^M, B, C]
        return coalition_probs[s - 1], coalition_probs  # the full set: [B, C]; [2^M, B, C]


def example_inputs(model: FusionClassifier, batch: int = 2) -> tuple[Tensor, ...]:
    """Zero inputs of the graph's dtypes and shapes (tracing needs one example)."""
    cfg, out = model.config, []
    for m in model.modalities:
        if m is Modality.CAMERA and cfg.camera is not None:
            c = cfg.camera
            out.append(
                torch.zeros(batch, c.num_frames, c.image_size, c.image_size, 3, dtype=torch.uint8)
            )
        elif m is Modality.AUDIO and cfg.audio is not None:
            out.append(torch.zeros(batch, cfg.audio.window_samples(cfg.window_ms)))
        elif m is Modality.TELEMETRY and cfg.telemetry is not None:
            t = cfg.telemetry
            out.append(torch.zeros(batch, t.steps, len(t.metrics)))
    out.append(torch.ones(batch, len(model.modalities), dtype=torch.bool))
    return tuple(out)


def export_graph(model: FusionClassifier) -> bytes:
    """The model (not changed) as ONNX bytes (opset OPSET), batch size dynamic."""
    check_exportable(model)
    folded = copy.deepcopy(model)
    if not folded.inference_only:
        folded.fold_for_inference()
    graph = ExportGraph(folded).eval()
    names = [INPUT_NAMES[m] for m in model.modalities] + [PRESENT]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # grad on: the transformer fast path does not export
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        torch.onnx.export(
            graph,
            example_inputs(model),
            buffer,
            input_names=names,
            output_names=[PROBS, COALITIONS],
            dynamic_axes={n: {0: "B"} for n in names} | {PROBS: {0: "B"}, COALITIONS: {1: "B"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


QUANTIZE = ("none", "int8", "fp16")


def quantize_graph(graph: bytes, mode: str) -> bytes:
    """The graph with lower-precision weights.

    int8: dynamic quantization (weights int8, activations quantized per batch) of the
    MatMul/Gemm weights: the heads and the fusion transformer. The convolutions stay
    float32: quantizing them too (ConvInteger) moved probabilities by up to 0.5 and
    flipped a fifth of the labels on test inputs, and ran 3x slower on x86.
    fp16: every weight in float16 (inputs and outputs stay float32).
    Either way the preprocessing (the log-mel's DFT and mel filter bank, the input
    scaling) keeps float32: in int8 its fixed bases would lose the quiet bands."""
    if mode == "none":
        return graph
    import onnx

    model = onnx.load_from_string(graph)
    keep = [n.name for n in model.graph.node if any(i.startswith("pre.") for i in n.input)]
    if mode == "int8":
        import tempfile
        from pathlib import Path

        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            src.write_bytes(graph)
            logging.disable(logging.WARNING)  # a line per tensor left in float, and advice
            try:
                quantize_dynamic(
                    src,
                    dst,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    nodes_to_exclude=keep,
                )
            finally:
                logging.disable(logging.NOTSET)
            return dst.read_bytes()
    if mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
        return bytes(half.SerializeToString())
    raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {mode!r}")


# What export checks before it writes: fp32 must reproduce the torch model; a quantized
# graph may move probabilities a little but must keep (nearly) every label
TOLERANCE = {"none": 1e-4, "int8": 0.1, "fp16": 0.05}  # max |probability difference|
MIN_LABEL_AGREEMENT = {"none": 1.0, "int8": 0.98, "fp16": 0.99}


@dataclass(frozen=True)
class Verification:
    windows: int
    max_prob_diff: float
    max_attribution_diff: float
    label_agreement: float  # fraction of windows with the same label as torch

    def problem(self, quantize: str) -> str | None:
        """Why the export is not faithful, or None."""
        tol, agree = TOLERANCE[quantize], MIN_LABEL_AGREEMENT[quantize]
        if self.max_prob_diff > tol:
            return (
                f"probabilities differ from torch by up to {self.max_prob_diff:.2g} "
                f"(allowed {tol:g}) on {self.windows} simulated windows"
            )
        if self.label_agreement < agree:
            return (
                f"labels agree with torch on {self.label_agreement:.1%} of {self.windows} "
                f"simulated windows (needed {agree:.0%})"
            )
        if quantize == "none" and self.max_attribution_diff > tol:
            return (
                f"attributions differ from torch by up to {self.max_attribution_diff:.2g} "
                f"(allowed {tol:g})"
            )
        return None


def verify(
    model: FusionClassifier,
    exported: OnnxModel,
    windows: Sequence[Mapping[Modality, np.ndarray]],
    batch_size: int = 64,
) -> Verification:
    """The exported model against the torch model as `iotfuse run` serves it (folded)."""
    reference = copy.deepcopy(model)
    if not reference.inference_only:
        reference.fold_for_inference()
    rate = model.config.audio.sample_rate if model.config.audio is not None else 16000
    prob_diff = attribution_diff = 0.0
    same = 0
    for start in range(0, len(windows), batch_size):
        part = windows[start : start + batch_size]
        want = reference.predict(WindowBatch.collate(part, rate))
        probs, label, attribution = exported.predict(part)
        prob_diff = max(prob_diff, float(np.abs(probs - want.probs.numpy()).max()))
        agree = label == want.label_idx.numpy()  # [B]
        same += int(agree.sum())
        if agree.any():  # attributions compare only where they explain the same class
            gap = np.abs(attribution - want.attribution.numpy())[agree]  # [b, M]
            attribution_diff = max(attribution_diff, float(gap.max()))
    n = len(windows)
    return Verification(n, prob_diff, attribution_diff, same / n if n else 1.0)


def export_model(
    model: FusionClassifier,
    source_version: str,
    windows: Sequence[Mapping[Modality, np.ndarray]],
    quantize: str = "none",
) -> tuple[bytes, dict[str, Any]]:
    """The graph and its config.json content, verified on `windows` against the model;
    raises UnexportableModel when it cannot be exported faithfully."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    if not windows:
        raise ValueError("export needs windows to verify the graph on")
    graph = quantize_graph(export_graph(model), quantize)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "source_version": source_version,
        "quantize": quantize,
        "opset": OPSET,
        "inputs": [INPUT_NAMES[m] for m in model.modalities] + [PRESENT],
        "outputs": [PROBS, COALITIONS],
        "config": model.config.to_dict(),
    }
    result = verify(model, OnnxModel.from_bytes(graph, manifest), windows)
    problem = result.problem(quantize)
    if problem is not None:
        raise UnexportableModel(f"the exported graph is not faithful: {problem}")
    manifest["verified"] = dataclasses.asdict(result) | {"tolerance": TOLERANCE[quantize]}
    return graph, manifest


def write_exported(
    directory: str | os.PathLike[str], graph: bytes, manifest: dict[str, Any]
) -> str:
    """Write model.onnx, then config.json (each to a temporary name, then renamed) into
    directory (created if needed); returns the exported model's version."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in ((GRAPH, graph), (CONFIG, (json.dumps(manifest, indent=2) + "\n").encode())):
        tmp = path / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path / name)
    return version_of(graph, manifest["source_version"])
