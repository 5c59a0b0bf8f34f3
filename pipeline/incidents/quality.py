"""How well incidents match the truth: incidents opened per true incident, and time to open.

    score = incident_quality(events, truth, rules)   # events: iotfuse.event/v1 values
    score.opened_per_true, score.median_windows_to_open

A *true incident* is a ground-truth episode of a class that can open one (the simulator's
labels: every episode but `normal`). The tracker runs over each device's events in window
order; an incident is *matched* to the true incident of its class it overlaps most, or is
a *false* one. Opened per true incident = every incident opened (matched or not) / true
incidents: 1.0 is one incident per episode; a label that flickers for one window (2 s) and
opens or splits incidents pushes it up. Time to open of a detected true incident: windows
from the one holding the episode's start to the one at which its first incident opened (0:
the window of the start itself), and seconds from the start to that window's end (when the
data that opened it was complete).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.incidents.records import window_obs
from pipeline.incidents.rules import IncidentRules
from pipeline.incidents.tracker import IncidentTracker


class Episode(Protocol):
    """A labelled span (pipeline.simulate.Episode)."""

    @property
    def start_ms(self) -> int: ...
    @property
    def end_ms(self) -> int: ...
    @property
    def label(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Opened:
    device: str
    cls: str
    start_ms: int
    end_ms: int  # of its last window at or above close (or the last it saw, still open)
    opened_at_start_ms: int  # the window at which it opened
    opened_at_end_ms: int


@dataclass
class Quality:
    true_incidents: int = 0
    opened: int = 0
    matched: int = 0  # incidents that overlap a true incident of their class
    detected: int = 0  # true incidents with at least one matched incident
    split: int = 0  # true incidents with more than one
    windows_to_open: list[int] = field(default_factory=list)
    seconds_to_open: list[float] = field(default_factory=list)
    blips: int = 0  # single windows labelled with a class in the middle of `normal`
    dips: int = 0  # single windows labelled otherwise in the middle of a true incident

    @property
    def false_opened(self) -> int:
        return self.opened - self.matched

    @property
    def opened_per_true(self) -> float:
        return self.opened / self.true_incidents if self.true_incidents else 0.0

    @property
    def median_windows_to_open(self) -> float:
        return statistics.median(self.windows_to_open) if self.windows_to_open else float("nan")

    @property
    def median_seconds_to_open(self) -> float:
        return statistics.median(self.seconds_to_open) if self.seconds_to_open else float("nan")


def incidents_of(events: Iterable[Mapping[str, Any]], rules: IncidentRules) -> list[Opened]:
    """Every incident the tracker opens over `events` (any order: sorted per device)."""
    tracker = IncidentTracker(rules)
    first: dict[str, Opened] = {}
    last_end: dict[str, int] = {}
    ordered = sorted(events, key=lambda e: (e["device_id"], e["window"]["start_ms"]))
    for event in ordered:
        device, obs = window_obs(event, rules)
        for change in tracker.observe(device, obs, 0):
            i = change.incident
            if change.kind == "open":
                first[i.incident_id] = Opened(
                    device, i.cls, i.start_ms, i.end_ms, i.last_start_ms, i.last_end_ms
                )
            last_end[i.incident_id] = i.end_ms
    for change in tracker.idle(2**62):  # the end of the data: what is open ends here
        last_end[change.incident.incident_id] = change.incident.end_ms
    return [
        Opened(o.device, o.cls, o.start_ms, last_end[key], o.opened_at_start_ms, o.opened_at_end_ms)
        for key, o in first.items()
    ]


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def incident_quality(
    events: Sequence[Mapping[str, Any]],
    truth: Mapping[str, Sequence[Episode]],
    rules: IncidentRules,
) -> Quality:
    q = Quality()
    w = rules.window_ms
    episodes = {
        (device, i): e
        for device, eps in truth.items()
        for i, e in enumerate(eps)
        if rules.rule(e.label) is not None
    }
    q.true_incidents = len(episodes)
    matched: dict[tuple[str, int], list[Opened]] = {}
    for o in incidents_of(events, rules):
        q.opened += 1
        best = max(
            (
                (_overlap(o.start_ms, o.end_ms, e.start_ms, e.end_ms), key)
                for key, e in episodes.items()
                if key[0] == o.device and e.label == o.cls
            ),
            default=(0, None),
        )
        if best[0] > 0 and best[1] is not None:
            q.matched += 1
            matched.setdefault(best[1], []).append(o)
    for key, opened in matched.items():
        e = episodes[key]
        q.detected += 1
        q.split += len(opened) > 1
        o = min(opened, key=lambda x: x.opened_at_start_ms)
        q.windows_to_open.append((o.opened_at_start_ms - e.start_ms // w * w) // w)
        q.seconds_to_open.append((o.opened_at_end_ms - e.start_ms) / 1000)
    q.blips, q.dips = _flicker(events, truth, rules)
    return q


def _flicker(
    events: Sequence[Mapping[str, Any]],
    truth: Mapping[str, Sequence[Episode]],
    rules: IncidentRules,
) -> tuple[int, int]:
    """Single-window label flicker: a class in one window between two `normal` ones inside a
    normal stretch (blip), or another label in one window inside a true incident (dip)."""
    by_device: dict[str, list[tuple[int, str]]] = {}
    for e in events:
        by_device.setdefault(e["device_id"], []).append((e["window"]["start_ms"], e["label"]))
    blips = dips = 0
    for device, windows in by_device.items():
        windows.sort()
        eps = truth.get(device, ())
        triples = zip(windows, windows[1:], windows[2:], strict=False)
        for (_, before), (start, label), (_, after) in triples:
            middle = start + rules.window_ms // 2
            truth_here = next((e.label for e in eps if e.start_ms <= middle < e.end_ms), None)
            if truth_here is None or before != after or label == before:
                continue
            if rules.rule(truth_here) is None and before == truth_here:
                blips += 1
            elif rules.rule(truth_here) is not None and before == truth_here:
                dips += 1
    return blips, dips
