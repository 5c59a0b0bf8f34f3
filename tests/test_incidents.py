"""Incidents with hysteresis (pipeline/incidents/): rules, the tracker, records, saved state."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from pipeline.errors import UserError
from pipeline.incidents.records import (
    INCIDENT_SCHEMA,
    incident_value,
    parse_state,
    state_value,
    window_obs,
)
from pipeline.incidents.rules import ClassRule, IncidentRules, parse_per_class
from pipeline.incidents.tracker import Change, IncidentTracker, WindowObs
from pipeline.settings import IncidentSettings

W = 2000
T0 = 1_767_225_600_000
RULES = IncidentRules(ClassRule(open=0.5, close=0.35, k=2, n=3, m=2), window_ms=W)


def obs(i: int, label: str = "normal", **scores: float) -> WindowObs:
    """Window i (2 s each from T0) labelled `label`, with the given class scores."""
    full = {"fire": 0.0, "intrusion": 0.0, "normal": 0.0, **scores}
    return WindowObs(T0 + i * W, T0 + (i + 1) * W, label, full, {"camera": 0.1, "audio": 0.2})


def run(
    tracker: IncidentTracker, fire: list[float], device: str = "d", first: int = 0
) -> list[Change]:
    """Windows first, first+1, ... with these fire scores (None-free), wall clock = event time."""
    out: list[Change] = []
    for i, score in enumerate(fire, first):
        label = "fire" if score >= 0.5 else "normal"
        out += tracker.observe(device, obs(i, label, fire=score), T0 + i * W)
    return out


def kinds(changes: list[Change]) -> list[tuple[str, int]]:
    return [(c.kind, (c.incident.start_ms - T0) // W) for c in changes]


def test_a_two_second_flicker_neither_opens_nor_closes() -> None:
    t = IncidentTracker(replace(RULES, update_every=0))
    # one window over the open threshold now and then: never k=2 of n=3
    assert run(t, [0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.8, 0.0, 0.2]) == []
    # an incident with a one-window dip below close: still one incident
    t = IncidentTracker(replace(RULES, update_every=0))
    changes = run(t, [0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.2, 0.1, 0.1])
    assert kinds(changes) == [("open", 0), ("close", 0)]
    close = changes[-1].incident
    assert close.end_ms == T0 + 6 * W  # the last window at or above close: window 5
    assert close.windows == 6 and close.peak == 0.9  # the dip counts, the closing tail not
    assert changes[-1].reason == "below_threshold"


def test_k_of_n_opens_at_the_first_hit_and_scores_between_thresholds_keep_it_open() -> None:
    t = IncidentTracker(replace(RULES, update_every=0))
    changes = run(t, [0.1, 0.7, 0.3, 0.6, 0.4, 0.4, 0.36, 0.3, 0.2])
    assert kinds(changes) == [("open", 1), ("close", 1)]
    opened = changes[0].incident
    assert opened.incident_id == f"d/fire/{T0 + W}"
    # 0.4 and 0.36 are under open but not under close: open until two windows < 0.35
    assert changes[1].incident.end_ms == T0 + 7 * W
    assert changes[1].incident.windows == 6  # windows 1..6, the dip at 2 included
    assert changes[1].incident.mean == pytest.approx((0.7 + 0.3 + 0.6 + 0.4 + 0.4 + 0.36) / 6)


def test_hits_before_a_close_do_not_open_again_and_normal_never_opens() -> None:
    t = IncidentTracker(replace(RULES, update_every=0, ignored=frozenset({"normal"})))
    changes = run(t, [0.9, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1])
    assert kinds(changes) == [("open", 0), ("close", 0)]  # 0.9 at 4 alone: no new one
    quiet = [t.observe("n", obs(i, "normal", normal=1.0), T0) for i in range(10)]
    assert quiet == [[]] * 10 and "n" not in t.devices


def test_one_device_can_have_several_classes_open() -> None:
    t = IncidentTracker(replace(RULES, update_every=0))
    changes = []
    for i in range(4):
        changes += t.observe("d", obs(i, "fire", fire=0.6, intrusion=0.55), T0)
    assert sorted((c.kind, c.incident.cls) for c in changes) == [
        ("open", "fire"),
        ("open", "intrusion"),
    ]
    assert set(t.devices["d"].open) == {"fire", "intrusion"}
    assert t.open_incidents() == 2
    changes = []
    for i in range(4, 6):  # intrusion falls, fire stays
        changes += t.observe("d", obs(i, "fire", fire=0.6), T0)
    assert [(c.kind, c.incident.cls) for c in changes] == [("close", "intrusion")]


def test_missing_windows_close_past_m_and_not_before() -> None:
    t = IncidentTracker(replace(RULES, update_every=0))
    run(t, [0.9, 0.9])
    assert t.observe("d", obs(3, "fire", fire=0.9), T0) == []  # one window missing: < m
    changes = t.observe("d", obs(6, "fire", fire=0.9), T0)  # two missing: closed first
    assert [(c.kind, c.reason) for c in changes] == [("close", "no_data")]
    assert changes[0].incident.end_ms == T0 + 4 * W


def test_a_device_gone_idle_closes_its_incidents_and_is_forgotten() -> None:
    t = IncidentTracker(replace(RULES, update_every=0, idle_close_ms=10_000))
    run(t, [0.9, 0.9, 0.9])  # wall clock of the last window: T0 + 2 W
    assert t.idle(T0 + 2 * W + 9_999) == []
    changes = t.idle(T0 + 2 * W + 10_000)
    assert [(c.kind, c.reason) for c in changes] == [("close", "idle")]
    assert changes[0].incident.end_ms == T0 + 3 * W and t.devices == {}
    saves = t.take_saves()
    assert [(d, s) for d, s, _ in saves] == [("d", None)]  # saved as holding nothing


def test_updates_come_every_n_windows_with_growing_seq() -> None:
    t = IncidentTracker(replace(RULES, update_every=2))
    changes = run(t, [0.9] * 7 + [0.0, 0.0])
    assert [(c.kind, c.incident.seq) for c in changes] == [
        ("open", 0),
        ("update", 1),
        ("update", 2),
        ("update", 3),
        ("close", 4),
    ]


def test_windows_seen_already_change_nothing() -> None:
    t = IncidentTracker(RULES)
    first = run(t, [0.9, 0.9, 0.9])
    assert kinds(first) == [("open", 0)]
    assert run(t, [0.9, 0.9, 0.9]) == []  # re-read after a restart: no second open


def test_devices_with_nothing_going_on_are_not_kept() -> None:
    t = IncidentTracker(RULES)
    for d in range(1000):
        t.observe(f"d{d}", obs(0, "normal", fire=0.1), T0)
    assert t.devices == {}
    t.observe("hit", obs(0, "fire", fire=0.9), T0)
    assert set(t.devices) == {"hit"}  # a hit that may still count
    for i in range(1, 4):
        t.observe("hit", obs(i, "normal", fire=0.1), T0)
    assert t.devices == {}  # it fell out of the last n windows


def _scores(rng: random.Random, n: int) -> list[float]:
    """Bursty fire scores: runs of high and low windows, with flicker in both."""
    out, high = [], False
    for _ in range(n):
        if rng.random() < 0.15:
            high = not high
        base = 0.8 if high else 0.15
        out.append(min(1.0, max(0.0, base + rng.uniform(-0.45, 0.45))))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_saved_state_restored_after_a_crash_gives_the_same_incidents(seed: int) -> None:
    """The property restarts rely on: a tracker rebuilt from the last saved state, fed the
    windows from any point at or before that save again (a restart re-reads what was not
    committed), produces exactly the changes an uninterrupted tracker produces after it."""
    rng = random.Random(seed)
    rules = replace(RULES, update_every=3)
    scores = _scores(rng, 80)
    whole = IncidentTracker(rules)
    expected = [
        (c.kind, c.incident.incident_id, c.incident.seq)
        for i, s in enumerate(scores)
        for c in whole.observe("d", obs(i, "fire" if s >= 0.5 else "x", fire=s), T0)
    ]
    crash = rng.randrange(1, 79)
    first = IncidentTracker(rules)
    before, saved = [], None
    for i, s in enumerate(scores[:crash]):
        before += [
            (c.kind, c.incident.incident_id, c.incident.seq)
            for c in first.observe("d", obs(i, "fire" if s >= 0.5 else "x", fire=s), T0)
        ]
        for device, state, last in first.take_saves():
            saved = state_value(device, state, last)  # what the state topic keeps
    second = IncidentTracker(rules)
    if saved is not None:
        device, state = parse_state(saved)
        second.restore(device, state, T0)
    reread = rng.randrange(0, crash + 1)  # committed offsets lag the saved state
    after = [
        (c.kind, c.incident.incident_id, c.incident.seq)
        for i, s in enumerate(scores[reread:], reread)
        for c in second.observe("d", obs(i, "fire" if s >= 0.5 else "x", fire=s), T0)
    ]
    assert before + after == expected


def test_incident_and_state_records_have_the_contract_fields() -> None:
    t = IncidentTracker(replace(RULES, update_every=0))
    event = {
        "schema": "iotfuse.event/v1",
        "device_id": "cell-02",
        "window": {"start_ms": T0, "end_ms": T0 + W},
        "label": "fire",
        "confidence": 0.8,
        "scores": {"normal": 0.1, "fire": 0.8, "intrusion": 0.1},
        "attribution": {"camera": 0.2, "audio": 0.3, "telemetry": 0.1},
    }
    device, first = window_obs(event, RULES)
    assert device == "cell-02" and first.scores == {"fire": 0.8, "intrusion": 0.1}
    t.observe(device, first, T0)
    [opened] = t.observe(device, replace(first, start_ms=T0 + W, end_ms=T0 + 2 * W), T0)
    value = incident_value(opened, RULES, {"name": "m", "version": "sha256:x"}, 123)
    assert value == {
        "schema": INCIDENT_SCHEMA,
        "incident_id": f"cell-02/fire/{T0}",
        "seq": 0,
        "device_id": "cell-02",
        "class": "fire",
        "state": "open",
        "change": "open",
        "close_reason": None,
        "start_ms": T0,
        "end_ms": None,
        "last_window": {"start_ms": T0 + W, "end_ms": T0 + 2 * W},
        "peak_score": 0.8,
        "mean_score": 0.8,
        "windows": 2,
        "attribution": {"audio": 0.3, "camera": 0.2, "telemetry": 0.1},
        "rule": {"open": 0.5, "close": 0.35, "k": 2, "n": 3, "m": 2},
        "model": {"name": "m", "version": "sha256:x"},
        "processed_at_ms": 123,
    }
    [(_, state, last)] = t.take_saves()
    saved = json.loads(state_value(device, state, last))
    assert saved["schema"] == "iotfuse.incident-state/v1" and saved["last_start_ms"] == T0 + W
    assert parse_state(state_value(device, state, last))[1].open["fire"].seq == 0


def test_per_class_rules_parse_and_bad_ones_say_how_to_fix_them() -> None:
    default = ClassRule(0.5, 0.35, 2, 3, 2)
    rules = parse_per_class("fire: open=0.4 close=0.25 k=1 n=1; intrusion: m=3", default)
    assert rules == {
        "fire": ClassRule(0.4, 0.25, 1, 1, 2),
        "intrusion": replace(default, m=3),
    }
    built = IncidentRules.from_settings(
        IncidentSettings(per_class="fire: k=1 n=1", ignore_classes="normal, alarm_test"), 2000
    )
    assert built.default == ClassRule()  # the settings' defaults are the rule's
    assert built.rule("fire") == replace(ClassRule(), k=1, n=1)
    assert built.rule("alarm_test") is None and built.rule("normal") is None
    assert built.rule("intrusion") == ClassRule()
    for text, says in [
        ("fire open=0.4", "is not CLASS: key=value"),
        ("fire: opn=0.4", "open=, close=, k=, n=, m="),
        ("fire: k=1.5", "k must be a whole number"),
        ("fire: open=0.3 close=0.4", "close (0.4) <= open (0.3)"),
        ("fire: k=4", "k (4) <= n (3)"),
    ]:
        with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
            parse_per_class(text, default)
