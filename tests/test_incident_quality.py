"""Incidents against ground truth (pipeline/incidents/quality.py): what
scripts/incident_quality.py measures the defaults by."""

from __future__ import annotations

from pipeline.incidents.quality import incident_quality
from pipeline.incidents.rules import ClassRule, IncidentRules
from pipeline.simulate import Episode

W = 2000
RULES = IncidentRules(ClassRule(open=0.5, close=0.35, k=2, n=3, m=2), window_ms=W)


def events(device: str, labels: str) -> list[dict]:
    """One event per character: `f` fire (score 0.9), `.` normal (fire 0.1)."""
    return [
        {
            "device_id": device,
            "window": {"start_ms": i * W, "end_ms": (i + 1) * W},
            "label": "fire" if c == "f" else "normal",
            "scores": {"fire": 0.9 if c == "f" else 0.1, "normal": 0.1 if c == "f" else 0.9},
            "attribution": {},
        }
        for i, c in enumerate(labels)
    ]


TRUTH = {"d": [Episode(0, 9000, "normal"), Episode(9000, 21000, "fire")]}
LABELS = "..f..ff.fff......"


def test_one_incident_per_true_one_despite_flicker_and_the_time_it_took() -> None:
    # truth: fire from 9 s to 21 s (windows 4..10); labels: a blip at window 2, the fire
    # seen from window 5 with a one-window dip at 7
    q = incident_quality(events("d", LABELS), TRUTH, RULES)
    assert (q.true_incidents, q.opened, q.matched, q.detected) == (1, 1, 1, 1)
    assert q.opened_per_true == 1.0 and q.split == 0 and q.false_opened == 0
    assert q.windows_to_open == [2]  # the true start in window 4; opened at window 6
    assert q.seconds_to_open == [5.0]  # at the end of window 6 (14 s), 5 s after 9 s
    assert (q.blips, q.dips) == (1, 1)


def test_without_hysteresis_flicker_opens_and_splits_incidents() -> None:
    eager = IncidentRules(ClassRule(open=0.5, close=0.5, k=1, n=1, m=1), window_ms=W)
    q = incident_quality(events("d", LABELS), TRUTH, eager)
    assert (q.opened, q.false_opened, q.split) == (3, 1, 1)
    assert q.opened_per_true == 3.0
