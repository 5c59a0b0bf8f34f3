"""Scenario simulator: labelled camera, audio and telemetry streams of a production cell.

    from pipeline.simulate import ScenarioConfig, simulate
    for record in simulate(ScenarioConfig(seed=1, devices=4, duration_s=60)):
        ...  # pipeline.records.Record, in event-time order, partition/offset -1

See scenario.py for the classes and why each needs more than one modality.
"""

from pipeline.simulate.scenario import (
    CLASSES,
    DEFAULT_TOPICS,
    EVENT_CLASSES,
    STREAMS,
    DeviceSetup,
    Episode,
    EpisodePlan,
    ScenarioConfig,
    SetupProfile,
    device_setup,
    schedule,
)
from pipeline.simulate.stream import (
    device_setups,
    device_streams,
    episodes_from_records,
    label_at,
    label_records,
    schedules,
    simulate,
)

__all__ = [
    "CLASSES",
    "DEFAULT_TOPICS",
    "EVENT_CLASSES",
    "STREAMS",
    "DeviceSetup",
    "Episode",
    "EpisodePlan",
    "ScenarioConfig",
    "SetupProfile",
    "device_setup",
    "device_setups",
    "device_streams",
    "episodes_from_records",
    "label_at",
    "label_records",
    "schedule",
    "schedules",
    "simulate",
]
