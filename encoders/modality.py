"""The modalities iotfuse fuses. Everything keyed by modality uses this enum."""

from enum import StrEnum


class Modality(StrEnum):
    CAMERA = "camera"
    AUDIO = "audio"
    TELEMETRY = "telemetry"


ALL_MODALITIES: tuple[Modality, ...] = (Modality.CAMERA, Modality.AUDIO, Modality.TELEMETRY)
