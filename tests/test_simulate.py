"""The scenario simulator: determinism, ground truth, stream shape and per-class signals.

Signals are checked on the produced bytes (decoded here with cv2/numpy), so a scenario
that stopped showing a class in a modality fails these tests.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable

import cv2
import numpy as np
import pytest

from pipeline.records import Record
from pipeline.simulate import (
    CLASSES,
    EVENT_CLASSES,
    Episode,
    ScenarioConfig,
    device_setups,
    episodes_from_records,
    label_at,
    schedules,
    simulate,
)

DEVICE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
Chunk = tuple[int, np.ndarray, int]  # (timestamp ms, mono samples, rate)


def decode_audio(r: Record) -> tuple[np.ndarray, int]:
    """Mono float samples and the sample rate of a WAV or raw-PCM chunk."""
    assert r.value is not None
    ct = r.header("content-type")
    if ct is not None and ct.startswith(b"audio/pcm"):
        params = dict(p.split("=") for p in ct.decode().split(";")[1:])
        assert params["format"] == "s16le"
        x = np.frombuffer(r.value, "<i2") / 32768.0
        return x.reshape(-1, int(params["channels"])).mean(1), int(params["rate"])
    v = r.value
    assert v[:4] == b"RIFF" and v[8:12] == b"WAVE"
    tag, channels, rate = struct.unpack("<HHI", v[20:28])
    bits = struct.unpack("<H", v[34:36])[0]
    i = 12
    while v[i : i + 4] != b"data":
        i += 8 + struct.unpack("<I", v[i + 4 : i + 8])[0]
    data = v[i + 8 : i + 8 + struct.unpack("<I", v[i + 4 : i + 8])[0]]
    if tag == 3:
        x = np.frombuffer(data, "<f4").astype(np.float64)
    elif bits == 16:
        x = np.frombuffer(data, "<i2") / 32768.0
    else:
        assert bits == 24
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) << 8 >> 8) / 8388608.0
    return x.reshape(-1, channels).mean(1), rate


def band_share(x: np.ndarray, rate: int, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / rate)
    return float(spec[(freqs >= lo) & (freqs < hi)].sum() / (spec.sum() + 1e-12))


def inside(
    labels: dict[str, list[Episode]],
    device: str,
    t0: int,
    t1: int,
    skip_ms: int = 0,
    tail_ms: int = 0,
) -> str | None:
    """The label if [t0, t1] lies within one episode (trimmed by skip/tail), else None."""
    for ep in labels[device]:
        if ep.start_ms + skip_ms <= t0 and t1 < ep.end_ms - tail_ms:
            return ep.label
    return None


@pytest.fixture(scope="module")
def long_run() -> tuple[ScenarioConfig, list[Record]]:
    """2 devices x 300 s of audio, telemetry and labels (every class shows up)."""
    cfg = ScenarioConfig(
        seed=5, devices=2, duration_s=300, streams=("audio", "telemetry", "labels")
    )
    return cfg, list(simulate(cfg))


@pytest.fixture(scope="module")
def camera_run() -> tuple[ScenarioConfig, dict[str, list[Episode]], list[tuple[int, np.ndarray]]]:
    cfg = ScenarioConfig(seed=8, devices=1, duration_s=240, camera_fps=1, streams=("camera",))
    frames = []
    for r in simulate(cfg):
        assert r.value is not None
        img = cv2.imdecode(np.frombuffer(r.value, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None
        frames.append((r.timestamp_ms, cv2.resize(img, (320, 240), interpolation=cv2.INTER_AREA)))
    return cfg, schedules(cfg), frames


def test_same_config_gives_identical_records_and_another_seed_differs() -> None:
    cfg = ScenarioConfig(seed=11, devices=2, duration_s=6, camera_fps=2)
    first, again = list(simulate(cfg)), list(simulate(cfg))
    assert first == again and len(first) > 50
    other = list(simulate(ScenarioConfig(seed=12, devices=2, duration_s=6, camera_fps=2)))
    for topic in ("iot.camera", "iot.audio", "iot.telemetry", "iot.labels"):
        values = [r.value for r in first if r.topic == topic]
        assert values != [r.value for r in other if r.topic == topic]


def test_stream_is_time_ordered_keyed_and_unassigned() -> None:
    cfg = ScenarioConfig(seed=3, devices=3, duration_s=5, camera_fps=3)
    records = list(simulate(cfg))
    stamps = [r.timestamp_ms for r in records]
    assert stamps == sorted(stamps)
    assert cfg.start_ms <= stamps[0] and stamps[-1] < cfg.end_ms
    assert {r.key for r in records} == {f"cell-0{i}".encode() for i in range(3)}
    assert all(r.key is not None and DEVICE_ID.match(r.key.decode()) for r in records)
    assert {(r.partition, r.offset) for r in records} == {(-1, -1)}
    assert {r.topic for r in records} == {"iot.camera", "iot.audio", "iot.telemetry", "iot.labels"}


def test_labels_tile_each_device_with_unaligned_balanced_episodes() -> None:
    cfg = ScenarioConfig(seed=21, devices=3, duration_s=900, streams=("labels",))
    labels = schedules(cfg)
    assert episodes_from_records(simulate(cfg)) == labels
    boundaries = []
    for episodes in labels.values():
        assert episodes[0].start_ms == cfg.start_ms and episodes[-1].end_ms == cfg.end_ms
        for a, b in zip(episodes, episodes[1:], strict=False):
            assert a.end_ms == b.start_ms and a.start_ms < a.end_ms
            assert (a.label == "normal") != (b.label == "normal")  # normal stretches between
            boundaries.append(a.end_ms)
        for ep in episodes[:-1]:
            low, high = (3000, 12000) if ep.label == "normal" else (4000, 20000)
            assert low <= ep.end_ms - ep.start_ms <= high
        counts = Counter(ep.label for ep in episodes if ep.label != "normal")
        assert set(counts) == set(EVENT_CLASSES)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(b % 2000 == 0 for b in boundaries) < 0.05 * len(boundaries)


def test_label_at_finds_the_episode_holding_a_time() -> None:
    labels = {"cell-00": [Episode(0, 10, "normal"), Episode(10, 25, "fire")]}
    assert [label_at(labels, "cell-00", t) for t in (0, 9, 10, 24, 25)] == [
        "normal",
        "normal",
        "fire",
        "fire",
        None,
    ]
    assert label_at(labels, "cell-99", 5) is None


def test_records_per_modality_follow_each_devices_rates() -> None:
    cfg = ScenarioConfig(seed=4, devices=3, duration_s=20)
    counts = Counter((r.key, r.topic) for r in simulate(cfg))
    for s in device_setups(cfg):
        key = s.device_id.encode()
        assert abs(counts[key, "iot.camera"] - 20 * s.fps) <= 2
        assert abs(counts[key, "iot.audio"] - 20000 / s.chunk_ms) <= 1
        assert 0.75 * 20 * s.telemetry_hz <= counts[key, "iot.telemetry"] <= 20 * s.telemetry_hz + 1


def test_audio_and_image_encodings_match_the_device_setup() -> None:
    cfg = ScenarioConfig(seed=9, devices=8, duration_s=1.2, camera_fps=2)
    setups = {s.device_id.encode(): s for s in device_setups(cfg)}
    assert {s.audio_format for s in setups.values()} >= {"s16", "s24"}
    for r in simulate(cfg):
        s, value = setups[r.key or b""], r.value or b""
        if r.topic == "iot.audio":
            x, rate = decode_audio(r)
            assert rate == s.audio_rate and abs(x.size - rate * s.chunk_ms / 1000) <= 1
            assert 0.001 < np.abs(x).max() <= 1.0
        elif r.topic == "iot.camera":
            assert value[:4] == (b"\x89PNG" if s.image_format == "png" else b"\xff\xd8\xff\xe0")
            img = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and img.shape == (s.height, s.width, 3)


def test_unseen_profile_draws_setups_never_used_in_training() -> None:
    train = device_setups(ScenarioConfig(seed=1, devices=30, duration_s=1))
    unseen = device_setups(ScenarioConfig(seed=1, devices=30, duration_s=1, profile="unseen"))
    for field in ("width", "audio_rate", "telemetry_hz"):
        assert not {getattr(s, field) for s in train} & {getattr(s, field) for s in unseen}


def test_invalid_config_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="profile"):
        ScenarioConfig(seed=1, devices=1, duration_s=1, profile="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topic"):
        ScenarioConfig(seed=1, devices=1, duration_s=1, topics={"camera": "c"})
    with pytest.raises(ValueError, match="device_prefix"):
        ScenarioConfig(seed=1, devices=1, duration_s=1, device_prefix="bad id")


def _telemetry(
    records: Iterable[Record], labels: dict[str, list[Episode]], skip_ms: int = 0
) -> dict[str, list[dict[str, float]]]:
    by_label: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in records:
        if r.topic == "iot.telemetry" and r.key is not None and r.value is not None:
            label = inside(labels, r.key.decode(), r.timestamp_ms, r.timestamp_ms, skip_ms)
            if label is not None:
                body = json.loads(r.value)
                by_label[label].append(
                    {
                        k: float(v)
                        for k, v in body.items()
                        if isinstance(v, (int, float)) and k != "rssi_dbm"
                    }
                )
    return by_label


def _mean(rows: list[dict[str, float]], metric: str) -> float:
    return float(np.mean([row[metric] for row in rows if metric in row]))


def test_telemetry_shows_heat_faults_stops_and_doors(
    long_run: tuple[ScenarioConfig, list[Record]],
) -> None:
    _, records = long_run
    labels = episodes_from_records(records, "iot.labels")
    late = _telemetry(records, labels, skip_ms=4000)  # fires have grown by then
    assert set(late) == set(CLASSES)
    assert _mean(late["fire"], "temperature_c") > _mean(late["normal"], "temperature_c") + 3
    assert _mean(late["fire"], "smoke_ppm") > 5 * _mean(late["normal"], "smoke_ppm")
    normal_temperature = _mean(late["normal"], "temperature_c")
    assert abs(_mean(late["alarm_test"], "temperature_c") - normal_temperature) < 3
    fault, normal = late["machine_fault"], late["normal"]
    assert _mean(fault, "vibration_rms") > 1.5 * _mean(normal, "vibration_rms")
    assert _mean(fault, "motor_current_a") > _mean(normal, "motor_current_a") + 1
    assert _mean(late["maintenance"], "motor_current_a") < 0.5
    assert _mean(late["intrusion"], "motor_current_a") > 5
    everything = _telemetry(records, labels)
    for label in ("maintenance", "intrusion"):
        doors = _mean(everything[label], "door_open")
        assert doors > 1.5 * _mean(everything["normal"], "door_open")
    for device, episodes in labels.items():  # the door opens at the start of each visit
        for ep in episodes:
            if ep.label == "maintenance" and ep.end_ms - ep.start_ms > 4000:
                opened = [
                    json.loads(r.value or b"")["door_open"]
                    for r in records
                    if r.topic == "iot.telemetry"
                    and r.key == device.encode()
                    and ep.start_ms <= r.timestamp_ms < ep.start_ms + 2500
                ]
                assert any(opened), f"no door_open at the start of {ep}"


def test_audio_siren_hum_and_knocks_follow_the_classes(
    long_run: tuple[ScenarioConfig, list[Record]],
) -> None:
    cfg, records = long_run
    labels = episodes_from_records(records, "iot.labels")
    siren: dict[str, list[float]] = defaultdict(list)
    hum: dict[str, list[float]] = defaultdict(list)
    crest: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.topic != "iot.audio" or r.key is None:
            continue
        x, rate = decode_audio(r)
        label = inside(
            labels,
            r.key.decode(),
            r.timestamp_ms - 60,
            r.timestamp_ms + x.size * 1000 // rate + 60,
            skip_ms=3000,
        )
        if label is None:
            continue
        siren[label].append(band_share(x, rate, 580, 1250))
        hum[label].append(band_share(x, rate, 45, 205))
        frames = x[: x.size // (rate // 100) * (rate // 100)].reshape(-1, rate // 100)
        energy = (frames**2).mean(1) + 1e-12
        crest[label].append(float(energy.max() / np.median(energy)))
    assert set(siren) == set(CLASSES)
    for label in ("fire", "alarm_test"):
        share = np.median(siren[label])
        assert share > 0.3 and share > 5 * np.median(siren["normal"])
    for label in ("normal", "machine_fault", "intrusion", "maintenance"):
        assert np.quantile(siren[label], 0.9) < 0.2
    assert np.median(hum["normal"]) > 0.5 and np.median(hum["intrusion"]) > 0.5
    assert np.median(hum["maintenance"]) < 0.2  # machine stopped
    assert np.median(crest["machine_fault"]) > 2 * np.median(crest["normal"])  # knocks


def test_camera_shows_people_and_smoke_only_in_their_classes(
    camera_run: tuple[ScenarioConfig, dict[str, list[Episode]], list[tuple[int, np.ndarray]]],
) -> None:
    cfg, labels, frames = camera_run
    device = cfg.device_id(0)
    normal = [img for ts, img in frames if inside(labels, device, ts, ts) == "normal"]
    background = np.median(np.stack(normal), axis=0)
    changed: dict[str, list[float]] = defaultdict(list)
    top_change: dict[str, list[float]] = defaultdict(list)
    for ts, img in frames:
        label = inside(labels, device, ts, ts, skip_ms=2200, tail_ms=2600)
        if label is not None:
            diff = np.abs(img.astype(np.float64) - background).max(axis=2)
            changed[label].append(float((diff > 60).mean()))
            top_change[label].append(float(diff[:80].mean()))
    assert set(changed) == set(CLASSES)
    quiet = float(np.median(changed["normal"]))
    for label in ("maintenance", "intrusion"):  # a person is in the cell
        assert np.median(changed[label]) > 2 * quiet + 0.003
    for label in ("alarm_test", "machine_fault"):  # the camera sees nothing unusual
        assert np.median(changed[label]) < 2 * quiet + 0.003
    assert np.median(top_change["fire"]) > 2 * np.median(top_change["normal"])  # smoke
