"""Hostile streams through the whole engine: decoders, windows, features, model, events.

The decoders are fuzzed on their own (tests/test_decode_*.py); this checks what they let
through. A value the telemetry decoder accepts (1e300) once made the model raise, and the
worker stopped at every restart on the same record: no record may stop the engine, every
event must be strict JSON with finite scores, and every record must end in an output or
be released.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from encoders.modality import Modality
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.model_runner import ModelRunner
from tests.factory import T0, TOPICS, jpeg, mutate, number, png, strict_json, wav

EXTREMES = [
    0.0,
    -0.0,
    1e-320,
    5e-324,
    1e300,
    -1e300,
    3.4e38,
    -3.5e38,
    1.7e308,
    10**40,
    2**63,
    -(2**63),
    True,
    False,
    None,
    "21.5",
    [],
    {"nested": 1e308},
]
CONTENT_TYPES = [
    None,
    b"image/jpeg",
    b"image/png",
    b"audio/wav",
    b"audio/pcm",
    b"audio/pcm;rate=16000;channels=1;format=s16le",
    b"application/json",
    b"\xff\xfe",
    b"text/plain; charset=utf-8",
]


def hostile_telemetry(rng: random.Random) -> bytes:
    metrics = {
        name: rng.choice(EXTREMES)
        for name in rng.sample(["temperature_c", "vibration_rms", "smoke_ppm", "door_open", "x"], 3)
    }
    value = json.dumps(metrics).encode()
    return mutate(value, rng) if rng.random() < 0.3 else value


def hostile_record(rng: random.Random, media: dict[Modality, list[bytes]]) -> Record:
    modality = rng.choice(list(Modality))
    topic = {
        Modality.CAMERA: TOPICS.camera,
        Modality.AUDIO: TOPICS.audio,
        Modality.TELEMETRY: TOPICS.telemetry,
    }[modality]
    if modality is Modality.TELEMETRY:
        value: bytes | None = hostile_telemetry(rng)
    else:
        value = rng.choice(media[modality])
        value = mutate(value, rng) if rng.random() < 0.5 else value
    if rng.random() < 0.05:
        value = rng.choice([None, b"", rng.randbytes(rng.randint(1, 300))])
    key = rng.choice([b"dev-1", b"dev-2", b"dev-3", b"", None, b"\xff\xfe", b"d" * 300])
    ts = T0 + rng.randint(-3_000, 30_000)
    if rng.random() < 0.03:
        ts = rng.choice([-1, 0, 2**62, T0 + 10**9])
    ctype = rng.choice(CONTENT_TYPES)
    headers = () if ctype is None else (("content-type", ctype),)
    return Record(topic, rng.randrange(2), -1, ts, key, value, headers)


@pytest.mark.parametrize("seed", range(3))
def test_hostile_streams_never_stop_the_engine_and_give_strict_events(
    shipped: ModelRunner, seed: int
) -> None:
    rng = random.Random(seed)
    media = {
        Modality.CAMERA: [jpeg(seed=1), jpeg(320, 240, seed=2), png()],
        Modality.AUDIO: [wav(), wav(0.5, 8000), wav(0.25, 44100)],
    }
    records = number([hostile_record(rng, media) for _ in range(600)])
    engine = build_engine(Settings(), shipped, clock=lambda: T0 + 40_000)
    outputs = list(run_offline(engine, records))
    settings = Settings()
    events = [o for o in outputs if o.topic == settings.topics.events]
    letters = [o for o in outputs if o.topic == settings.topics.deadletter]
    assert events and letters  # the mix has both, or the test tests nothing
    for event in events:
        value = strict_json(event.value)
        scores = value["scores"].values()
        assert all(math.isfinite(s) for s in scores) and math.isclose(sum(scores), 1, abs_tol=1e-3)
        assert all(math.isfinite(a) for a in value["attribution"].values())
    accounted = [p for o in outputs for p in o.holds] + engine.take_released()
    assert sorted((p.topic, p.partition, p.offset) for p in accounted) == sorted(
        (r.topic, r.partition, r.offset) for r in records
    )
