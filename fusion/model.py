"""FusionClassifier: per-modality encoders, then a small transformer over modality tokens.

Every modality m in config.modalities goes through the same stages, held in dicts keyed by
modality (ImageBind-style), so fusion never branches on the modality type:

    raw [n_m, ...] -> preprocess[m] -> trunks[m] -> heads[m] -> postprocess[m] -> [n_m, D]

The n_m tokens are scattered to their batch rows, giving tokens [B, M, D] and present [B, M].
An absent modality is *masked* in attention (src_key_padding_mask), never zero-filled input:

    [CLS] + (tokens + modality-type embedding) -> TransformerEncoder -> LayerNorm(CLS) -> logits

`embed` and `fuse` are separate so that attribution can re-run only `fuse` on subsets.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from encoders.audio import AudioPreprocessor
from encoders.base import Preprocessor, Trunk, fold_batchnorm, use_group_norm
from encoders.camera import CameraPreprocessor
from encoders.modality import Modality
from encoders.telemetry import TelemetryPreprocessor
from encoders.trunks import build_audio_trunk, build_camera_trunk, build_telemetry_trunk
from fusion.attribution import shapley
from fusion.batch import WindowBatch
from fusion.config import ModelConfig


@dataclass(frozen=True)
class Prediction:
    probs: Tensor  # [B, C] softmax over config.classes
    label_idx: Tensor  # [B] argmax of probs
    attribution: Tensor  # [B, M] Shapley value of each modality slot for label_idx (0 if absent)


def build_stages(config: ModelConfig, m: Modality) -> tuple[Preprocessor, Trunk]:
    """The preprocessor and trunk of one modality (the only place that knows modality types)."""
    if m is Modality.CAMERA and config.camera is not None:
        return CameraPreprocessor(config.camera), build_camera_trunk(config.camera)
    if m is Modality.AUDIO and config.audio is not None:
        return (AudioPreprocessor(config.audio, config.window_ms), build_audio_trunk(config.audio))
    if m is Modality.TELEMETRY and config.telemetry is not None:
        return TelemetryPreprocessor(config.telemetry), build_telemetry_trunk(config.telemetry)
    raise AssertionError(f"no section for {m}")  # ModelConfig guarantees one per modality


def resolved_config(config: ModelConfig, trunks: dict[Modality, Trunk]) -> ModelConfig:
    """The config with each hf trunk's architecture stored, so rebuilding needs no hf_path."""
    changes = {}
    for m, trunk in trunks.items():
        hf_config = getattr(trunk, "hf_config", None)
        if hf_config is not None:
            changes[m.value] = dataclasses.replace(getattr(config, m.value), hf_config=hf_config)
    return dataclasses.replace(config, **changes)


class FusionClassifier(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.fusion.dim, config.fusion
        self.modalities = config.modalities  # token slot order
        self.preprocess: dict[Modality, Preprocessor] = {}  # parameter-free, not in state dict
        trunks: dict[Modality, Trunk] = {}
        for m in self.modalities:
            self.preprocess[m], trunks[m] = build_stages(config, m)
            if config.conv_norm == "group":  # the DP recipe's switch (see use_group_norm)
                use_group_norm(trunks[m])
        self.config = resolved_config(config, trunks)
        self.trunks = nn.ModuleDict({m.value: t for m, t in trunks.items()})
        self.heads = nn.ModuleDict(
            {
                m.value: nn.Sequential(nn.LayerNorm(t.out_dim), nn.Linear(t.out_dim, d))
                for m, t in trunks.items()
            }
        )
        self.postprocess = nn.ModuleDict({m.value: nn.LayerNorm(d) for m in self.modalities})
        self.modality_embedding = nn.Parameter(0.02 * torch.randn(len(self.modalities), d))
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.inference_only = False  # set by fold_for_inference
        layer = nn.TransformerEncoderLayer(
            d, f.heads, 4 * d, f.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, f.layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, len(config.classes))

    def embed(self, batch: WindowBatch) -> tuple[Tensor, Tensor]:
        """Raw batch -> (tokens [B, M, D], present [B, M] bool). Absent slots hold zeros."""
        unknown = [str(m) for m in batch.raw if m not in self.preprocess]
        if unknown:
            raise ValueError(
                f"the batch has modality {unknown} but model "
                f"{self.config.name!r} uses only {[str(m) for m in self.modalities]}; "
                f"leave it out of the windows"
            )
        b, d, device = batch.size, self.config.fusion.dim, self.cls_token.device
        slots, masks = [], []
        for m in self.modalities:
            slot = torch.zeros(b, d, device=device)  # [B, D]
            mask = torch.zeros(b, dtype=torch.bool, device=device)  # [B]
            if m in batch.raw and batch.raw[m].shape[0] > 0:
                rows = batch.rows[m].to(device)  # [n_m]
                x = self.preprocess[m](batch.raw[m].to(device), batch.info)  # [n_m, ...]
                x = self.trunks[m](x)  # [n_m, ...] -> [n_m, trunk_dim]
                x = self.postprocess[m](self.heads[m](x))  # [n_m, trunk_dim] -> [n_m, D]
                slot = slot.index_copy(0, rows, x)  # [n_m, D] -> [B, D]
                mask = mask.index_fill(0, rows, True)  # [B]
            slots.append(slot)
            masks.append(mask)
        tokens = torch.stack(slots, dim=1)  # M x [B, D] -> [B, M, D]
        present = torch.stack(masks, dim=1)  # M x [B] -> [B, M]
        return tokens, present

    def fuse(self, tokens: Tensor, present: Tensor) -> Tensor:
        """(tokens [B, M, D], present [B, M] bool) -> logits [B, C]. CLS is always attended."""
        b = tokens.shape[0]
        x = tokens + self.modality_embedding  # [B, M, D] + [M, D] -> [B, M, D]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # -> [B, 1+M, D]
        ignore = torch.cat([present.new_zeros(b, 1), ~present], dim=1)  # -> [B, 1+M] bool
        x = self.encoder(x, src_key_padding_mask=ignore)  # [B, 1+M, D]
        x = self.ln_f(x[:, 0])  # [B, 1+M, D] -> [B, D]
        logits: Tensor = self.classifier(x)  # [B, D] -> [B, C]
        return logits

    def forward(self, batch: WindowBatch) -> dict[str, Tensor]:
        tokens, present = self.embed(batch)  # [B, M, D], [B, M]
        return {"logits": self.fuse(tokens, present), "embeddings": tokens, "present": present}

    def predict(self, batch: WindowBatch) -> Prediction:
        """Class probabilities, label and per-modality Shapley attribution, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                tokens, present = self.embed(batch)  # [B, M, D], [B, M]
                probs = self.fuse(tokens, present).softmax(dim=-1)  # [B, C]
                label = probs.argmax(dim=-1)  # [B, C] -> [B]
                attribution = shapley(self, tokens, present, label)  # [B, M]
        finally:
            self.train(was_training)
        return Prediction(probs=probs, label_idx=label, attribution=attribution)

    def fold_for_inference(self) -> FusionClassifier:
        """Eval mode for good, BatchNorms folded into their convolutions (~10% less time a
        batch, the same outputs up to float rounding). Training or saving it is refused."""
        self.eval()
        fold_batchnorm(self)
        self.inference_only = True
        return self

    def train(self, mode: bool = True) -> FusionClassifier:
        if mode and self.inference_only:
            raise RuntimeError(
                "this model was folded for inference (fold_for_inference); load "
                "it again from its directory to train it"
            )
        return super().train(mode)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
