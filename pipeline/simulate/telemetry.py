"""Sensor-unit view of the cell: JSON telemetry records with realistic imperfections.

Metrics: temperature_c, smoke_ppm, vibration_rms, motor_current_a, door_open. There is
deliberately no sound level: it would leak the siren, which only the microphone hears.
Fire raises temperature and smoke; a fault raises vibration (irregular, with spikes) and
motor current; maintenance stops the machine (vibration and current near 0). Imperfections:
slow sensor drift, noise, timing jitter, dropped samples and outages, a metric missing now
and then, door_open as a JSON boolean on some devices, and extra fields the pipeline ignores
(strings, null, nested objects, an unknown numeric `rssi_dbm` on some devices).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.records import Record
from pipeline.simulate.scenario import (
    DeviceSetup,
    EpisodePlan,
    ScenarioConfig,
    door_open,
    fire_progress,
    make_rng,
    plan_at,
)

Metrics = dict[str, object]


@dataclass(frozen=True)
class SensorUnit:
    """The device's sensors and machine at rest: fixed per device."""

    temperature_c: float
    smoke_ppm: float
    vibration_rms: float
    motor_current_a: float
    drop_p: float  # chance a sample is lost
    outage_per_s: float  # rate of 1-4 s outages
    door_as_bool: bool
    rssi: bool
    firmware: str


@dataclass(frozen=True)
class _EpisodeSigns:
    heat_c: float  # fire: temperature rise at full progress
    smoke_ppm: float  # fire: smoke at full progress
    vibration_x: float  # fault: vibration multiplier
    current_a: float  # fault: extra motor current


def make_unit(rng: np.random.Generator) -> SensorUnit:
    return SensorUnit(
        temperature_c=float(rng.uniform(21, 33)),
        smoke_ppm=float(rng.uniform(1, 8)),
        vibration_rms=float(rng.uniform(0.5, 1.4)),
        motor_current_a=float(rng.uniform(7, 16)),
        drop_p=float(rng.uniform(0.005, 0.04)),
        outage_per_s=float(rng.uniform(0.0, 0.02)),
        door_as_bool=bool(rng.random() < 0.3),
        rssi=bool(rng.random() < 0.4),
        firmware=f"{int(rng.integers(1, 4))}.{int(rng.integers(0, 10))}.{int(rng.integers(0, 30))}",
    )


def episode_signs(plan: EpisodePlan) -> _EpisodeSigns:
    rng = make_rng(plan.seed, "signs")
    k = plan.intensity
    return _EpisodeSigns(
        heat_c=float(rng.uniform(8, 30)) * k,
        smoke_ppm=float(rng.uniform(40, 400)) * k,
        vibration_x=1.0 + float(rng.uniform(0.8, 2.5)) * k,
        current_a=float(rng.uniform(2, 8)) * k,
    )


class _Drift:
    """Slow sensor drift: a bounded random walk per metric."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.temperature = 0.0
        self.smoke = 0.0
        self.vibration = 0.0

    def step(self, dt_s: float) -> None:
        scale = np.sqrt(max(dt_s, 1e-3))
        steps = self.rng.normal(0.0, scale, 3)
        self.temperature = float(np.clip(self.temperature + 0.05 * steps[0], -2.5, 2.5))
        self.smoke = float(np.clip(self.smoke + 0.05 * steps[1], -1.0, 1.5))
        self.vibration = float(np.clip(self.vibration + 0.01 * steps[2], -0.15, 0.15))


def sample(
    unit: SensorUnit,
    plan: EpisodePlan,
    signs: _EpisodeSigns,
    t_ms: float,
    drift: _Drift,
    rng: np.random.Generator,
) -> Metrics:
    """The metric values at world time `t_ms`."""
    noise = rng.normal(0.0, 1.0, 5)
    fire = fire_progress(plan, t_ms)
    temperature = unit.temperature_c + drift.temperature + 0.15 * noise[0] + signs.heat_c * fire
    smoke = unit.smoke_ppm + drift.smoke + 0.4 * noise[1]
    smoke += signs.smoke_ppm * fire * (1 + 0.1 * noise[2])
    if plan.machine_running:
        vibration = (unit.vibration_rms + drift.vibration) * (1 + 0.08 * noise[3])
        current = unit.motor_current_a * (1 + 0.03 * noise[4])
    else:  # stopped for maintenance
        vibration, current = 0.02 * abs(noise[3]), 0.05 * abs(noise[4])
    if plan.label == "machine_fault":  # irregular: gamma-distributed bursts and spikes
        vibration *= signs.vibration_x * float(rng.gamma(2.0, 0.5))
        vibration *= 2.0 if rng.random() < 0.1 else 1.0
        current += signs.current_a * (1 + 0.25 * float(rng.normal()))
    door = door_open(plan, t_ms)
    return {
        "temperature_c": round(temperature, 2),
        "smoke_ppm": round(max(smoke, 0.0), 2),
        "vibration_rms": round(max(vibration, 0.0), 3),
        "motor_current_a": round(max(current, 0.0), 2),
        "door_open": door if unit.door_as_bool else int(door),
    }


def _decorate(
    metrics: Metrics,
    unit: SensorUnit,
    plan: EpisodePlan,
    t_ms: float,
    seq: int,
    rng: np.random.Generator,
) -> Metrics:
    """Add the fields the pipeline ignores, and sometimes lose one metric."""
    if rng.random() < 0.02:
        del metrics[("temperature_c", "smoke_ppm", "vibration_rms", "motor_current_a")[seq % 4]]
    if unit.rssi:
        metrics["rssi_dbm"] = int(rng.integers(-80, -40))
    if plan.label == "maintenance" and door_open(plan, t_ms):
        metrics["badge"] = f"T-{plan.seed % 10000:04d}"  # the technician badged in
    roll = rng.random()
    if roll < 0.05:
        metrics["fw"] = unit.firmware
    elif roll < 0.08:
        metrics["status"] = None
    elif roll < 0.1:
        metrics["meta"] = {"seq": seq, "src": "plc"}
    return metrics


def telemetry_records(
    cfg: ScenarioConfig, setup: DeviceSetup, plans: Sequence[EpisodePlan], topic: str
) -> Iterator[Record]:
    """Samples every 1000/hz ms with +-30% jitter (never reordering), some lost."""
    rng = make_rng(cfg.seed, setup.index, "telemetry")
    unit = make_unit(make_rng(cfg.seed, setup.index, "unit"))
    drift = _Drift(make_rng(cfg.seed, setup.index, "drift"))
    starts = [p.episode.start_ms for p in plans]
    period = 1000.0 / setup.telemetry_hz
    phase, jitter = float(rng.uniform(0, period)), max(int(period * 0.3) - 1, 0)
    key, outage_until, signs, signs_of = setup.device_id.encode(), -1, None, -1
    for k in range(int(cfg.duration_s * setup.telemetry_hz) + 2):
        ts = max(
            cfg.start_ms + int(phase + k * period) + int(rng.integers(-jitter, jitter + 1)),
            cfg.start_ms,
        )
        if ts >= cfg.end_ms:
            return
        drift.step(period / 1000.0)
        if ts < outage_until or rng.random() < unit.drop_p:
            continue
        if rng.random() < unit.outage_per_s * period / 1000.0:
            outage_until = ts + int(rng.integers(1000, 4000))
        t_world = ts - setup.telemetry_offset_ms
        plan = plan_at(plans, starts, t_world)
        if signs is None or signs_of != plan.episode.start_ms:
            signs, signs_of = episode_signs(plan), plan.episode.start_ms
        metrics = sample(unit, plan, signs, t_world, drift, rng)
        metrics = _decorate(metrics, unit, plan, t_world, k, rng)
        value = json.dumps(metrics, separators=(",", ":")).encode()
        yield Record(topic, -1, -1, ts, key, value)
