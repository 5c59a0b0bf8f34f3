"""The incident stage in the engine (pipeline/incidents/stage.py): events followed by their
incidents and saved state, idle closes on the wall clock, state loaded on resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from encoders.modality import Modality
from pipeline.incidents.stage import IncidentEngine
from pipeline.metrics import Metrics
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.engine import Engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.stream.outputs import Output
from pipeline.testing import FakeClock
from tests.factory import T0, TOPICS, device_stream, number

pytestmark = pytest.mark.usefixtures("one_thread")

# with a random model, a rule that every window meets makes incidents predictable: fire
# opens at a device's second window and never falls under close (0); intrusion never opens
ALWAYS_FIRE = "fire: open=0 close=0 k=2 n=3 m=2"


def settings(**incidents: object) -> Settings:
    s = Settings()
    chosen = {"per_class": ALWAYS_FIRE, "ignore_classes": "normal,intrusion", **incidents}
    return replace(s, incidents=replace(s.incidents, **chosen))


def incidents(outputs: list[Output]) -> list[dict]:
    return [json.loads(o.value or b"") for o in outputs if o.topic == TOPICS.incidents]


def records(devices: int = 2, seconds: int = 9, start: int = T0) -> list:
    recs = []
    for d in range(devices):
        recs += device_stream(f"dev-{d}", start, seconds, (Modality.TELEMETRY,))
    return number(sorted(recs, key=lambda r: r.timestamp_ms))


def test_each_event_is_followed_by_its_incidents_and_saved_state(runner: ModelRunner) -> None:
    engine = build_engine(settings(update_every=2), runner)
    assert isinstance(engine, IncidentEngine)
    outputs = list(run_offline(engine, records(seconds=12)))
    topics = [o.topic for o in outputs if o.key == b"dev-0"]
    # window 0: a hit, saved; window 1: opens; then an update every 2 windows, all saved
    assert topics[:6] == [
        TOPICS.events,
        TOPICS.incident_state,
        TOPICS.events,
        TOPICS.incidents,
        TOPICS.incident_state,
        TOPICS.events,
    ]
    got = incidents(outputs)
    assert [(i["device_id"], i["change"], i["seq"]) for i in got if i["device_id"] == "dev-0"] == [
        ("dev-0", "open", 0),
        ("dev-0", "update", 1),
        ("dev-0", "update", 2),
    ]
    first = got[0]
    assert first["incident_id"] == f"{first['device_id']}/fire/{T0}" and first["windows"] == 2
    assert first["model"]["version"] == runner.version and first["state"] == "open"
    for o in outputs:
        if o.topic in (TOPICS.incidents, TOPICS.incident_state):
            assert o.holds == () and o.key is not None
            assert o.headers == (("content-type", b"application/json"),)
    assert {i["class"] for i in got} == {"fire"}  # intrusion and normal ignored


def test_with_incidents_off_the_engine_publishes_events_only(runner: ModelRunner) -> None:
    engine = build_engine(settings(enabled=False), runner)
    assert type(engine) is Engine
    outputs = list(run_offline(engine, records(devices=1, seconds=4)))
    assert {o.topic for o in outputs} == {TOPICS.events}


def test_an_idle_device_closes_on_the_wall_clock_through_the_worker_loop(
    runner: ModelRunner,
) -> None:
    clock = FakeClock(T0)
    metrics = Metrics()
    engine = build_engine(settings(idle_close_ms=10_000), runner, metrics, clock=clock)
    outputs = list(run_offline(engine, records(devices=1, seconds=6)))
    assert [i["change"] for i in incidents(outputs)] == ["open"]
    assert metrics.value("iotfuse_incidents_open") == 1
    clock.now += 9_999
    engine.tick()
    assert not engine.batch_due()
    clock.now += 1_001  # 10 s without an event, and the second-long check is due
    engine.tick()
    assert engine.batch_due() and engine.queued() == 0  # nothing for the model to do
    closed = engine.run_batch()
    [close] = incidents(closed)
    assert (close["change"], close["close_reason"], close["seq"]) == ("close", "idle", 1)
    assert close["end_ms"] == T0 + 6000 and not engine.batch_due()
    [state] = [o for o in closed if o.topic == TOPICS.incident_state]
    assert json.loads(state.value or b"")["last_start_ms"] == T0 + 4000
    assert metrics.value("iotfuse_incidents_total", {"change": "close"}) == 1
    assert metrics.value("iotfuse_incidents_open") == 0


def test_an_incident_stays_open_while_its_devices_input_is_unread(runner: ModelRunner) -> None:
    """A broker away for a minute is not a device gone idle: idleness is timed to what the
    reader has read through."""
    clock = FakeClock(T0)
    engine = build_engine(settings(idle_close_ms=10_000), runner, clock=clock)
    outputs = list(run_offline(engine, records(devices=1, seconds=6)))
    assert [i["change"] for i in incidents(outputs)] == ["open"]
    read_through = clock.now
    clock.now += 60_000
    engine.tick(read_through)
    assert not engine.batch_due()
    clock.now += 1_000  # the next second-long check
    engine.tick(read_through + 10_000)
    assert engine.batch_due()
    assert [i["change"] for i in incidents(engine.run_batch())] == ["close"]


class FakeStore:
    def __init__(self, saved: dict[int, list[bytes]]) -> None:
        self.saved = saved
        self.loads: list[int] = []
        self.closed = False

    def load(self, partition: int) -> list[bytes]:
        self.loads.append(partition)
        return self.saved.get(partition, [])

    def close(self) -> None:
        self.closed = True


def test_a_resumed_partition_goes_on_with_its_saved_incidents(runner: ModelRunner) -> None:
    """The first owner saves state and is stopped mid-incident; the next owner loads what was
    saved for the partition, is fed the windows again from an earlier point (uncommitted
    input is re-read), and continues the same incident: no second open, the same id."""
    s = settings(update_every=0, idle_close_ms=10_000)
    recs = records(devices=1, seconds=10)
    first = build_engine(s, runner)
    cut = [r for r in recs if r.timestamp_ms < T0 + 6000]
    before = list(run_offline(first, cut))
    saved = [o.value for o in before if o.topic == TOPICS.incident_state]
    assert [i["change"] for i in incidents(before)] == ["open"]

    store = FakeStore({0: [v for v in saved if v is not None]})
    clock = FakeClock(T0)
    second = build_engine(s, runner, clock=clock, incident_store=store)
    for _topic in (TOPICS.camera, TOPICS.audio, TOPICS.telemetry):  # a call per topic
        second.resume(0, {})
    assert store.loads == [0]
    again = [r for r in recs if r.timestamp_ms >= T0 + 2000]  # re-read from window 1 on
    after = list(run_offline(second, again))
    assert incidents(after) == []  # windows 1-2 seen already, 3-4 continue the incident
    clock.now += 11_000
    second.tick()
    [close] = incidents(second.run_batch())
    assert close["incident_id"] == incidents(before)[0]["incident_id"]
    assert (close["change"], close["seq"], close["windows"]) == ("close", 1, 5)
    second.close()
    assert store.closed


def test_revoked_partitions_forget_their_devices(runner: ModelRunner) -> None:
    engine = build_engine(settings(), runner)
    assert isinstance(engine, IncidentEngine)
    list(run_offline(engine, records(devices=1, seconds=4)))
    assert set(engine.incidents.tracker.devices) == {"dev-0"}
    engine.revoke([(TOPICS.telemetry, 1)])
    assert set(engine.incidents.tracker.devices) == {"dev-0"}  # on partition 0
    engine.revoke([(TOPICS.telemetry, 0)])
    assert engine.incidents.tracker.devices == {}
