"""All devices' modalities merged into one event-time-ordered stream of Records.

Each (device, modality) is a lazy generator sorted by timestamp; `heapq.merge` interleaves
them, so memory stays constant however long the simulation runs. Records leave with
partition and offset -1: the Kafka producer or the recorder assigns them.
"""

from __future__ import annotations

import bisect
import heapq
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence

from pipeline.records import Record
from pipeline.simulate.audio import audio_records
from pipeline.simulate.camera import camera_records
from pipeline.simulate.scenario import (
    CLASSES,
    DeviceSetup,
    Episode,
    EpisodePlan,
    ScenarioConfig,
    device_setup,
    schedule,
)
from pipeline.simulate.telemetry import telemetry_records


def label_records(
    cfg: ScenarioConfig, setup: DeviceSetup, plans: Sequence[EpisodePlan], topic: str
) -> Iterator[Record]:
    """One record per episode (normal stretches too), stamped at its start."""
    key = setup.device_id.encode()
    for plan in plans:
        ep = plan.episode
        value = json.dumps(
            {"label": ep.label, "start_ms": ep.start_ms, "end_ms": ep.end_ms}, separators=(",", ":")
        ).encode()
        yield Record(topic, -1, -1, ep.start_ms, key, value)


def device_setups(cfg: ScenarioConfig) -> list[DeviceSetup]:
    return [device_setup(cfg, i) for i in range(cfg.devices)]


def device_streams(cfg: ScenarioConfig, index: int) -> list[Iterator[Record]]:
    """The time-ordered record generators of one device, one per configured stream."""
    setup = device_setup(cfg, index)
    plans = schedule(cfg, setup)
    makers = {
        "camera": camera_records,
        "audio": audio_records,
        "telemetry": telemetry_records,
        "labels": label_records,
    }
    return [makers[name](cfg, setup, plans, cfg.topics[name]) for name in cfg.streams]


def _timestamp(record: Record) -> int:
    return record.timestamp_ms


def simulate(cfg: ScenarioConfig) -> Iterator[Record]:
    """Every record of every device and stream, in non-decreasing timestamp order.

    Deterministic: the same config yields byte-identical records. Ties keep a fixed order
    (device index, then the order of `cfg.streams`).
    """
    streams = [s for i in range(cfg.devices) for s in device_streams(cfg, i)]
    return heapq.merge(*streams, key=_timestamp)


def schedules(cfg: ScenarioConfig) -> dict[str, list[Episode]]:
    """Ground truth per device id, computed without rendering anything."""
    out: dict[str, list[Episode]] = {}
    for i in range(cfg.devices):
        setup = device_setup(cfg, i)
        out[setup.device_id] = [p.episode for p in schedule(cfg, setup)]
    return out


def episodes_from_records(
    records: Iterable[Record], topic: str | None = None
) -> dict[str, list[Episode]]:
    """Parse label records (of `topic`, if given) into sorted episodes per device id."""
    out: dict[str, list[Episode]] = {}
    for r in records:
        if (topic is not None and r.topic != topic) or r.key is None or r.value is None:
            continue
        body = json.loads(r.value)
        if not isinstance(body, dict) or body.get("label") not in CLASSES:
            raise ValueError(
                f"not a label record at {r.topic}/{r.partition}/{r.offset}: "
                f"{r.value[:200]!r}; pass the labels topic to skip other records"
            )
        episode = Episode(int(body["start_ms"]), int(body["end_ms"]), str(body["label"]))
        out.setdefault(r.key.decode(), []).append(episode)
    return {device: sorted(eps) for device, eps in out.items()}


def label_at(labels: Mapping[str, Sequence[Episode]], device: str, ts_ms: int) -> str | None:
    """The label holding for `device` at `ts_ms`, or None outside its labelled time.

    `labels` maps device id to episodes sorted by start, as `schedules` and
    `episodes_from_records` return them."""
    episodes = labels.get(device, ())
    i = bisect.bisect_right(episodes, ts_ms, key=_start) - 1
    if i >= 0 and ts_ms < episodes[i].end_ms:
        return episodes[i].label
    return None


def _start(episode: Episode) -> int:
    return episode.start_ms
