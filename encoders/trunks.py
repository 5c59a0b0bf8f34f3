"""The trunk builders: a modality's config -> its trunk module.

The one place that chooses between our small CNNs and a local transformers model
(`trunk = "hf"`, encoders/hf.py), so the modality modules never import hf.py and hf.py,
which reads their configs, imports nothing back: no import cycle. transformers is imported
only when an hf trunk is asked for.
"""

from __future__ import annotations

from encoders.audio import AudioCNN, AudioConfig
from encoders.base import Trunk
from encoders.camera import CameraCNN, CameraConfig
from encoders.telemetry import TelemetryCNN, TelemetryConfig


def build_camera_trunk(cfg: CameraConfig) -> Trunk:
    if cfg.trunk == "hf":
        from encoders.hf import HFVisionTrunk  # transformers is imported only when needed

        return HFVisionTrunk(cfg)
    return CameraCNN(cfg)


def build_audio_trunk(cfg: AudioConfig) -> Trunk:
    if cfg.trunk == "hf":
        from encoders.hf import HFAudioTrunk  # transformers is imported only when needed

        return HFAudioTrunk(cfg)
    return AudioCNN(cfg)


def build_telemetry_trunk(cfg: TelemetryConfig) -> Trunk:
    return TelemetryCNN(cfg)
