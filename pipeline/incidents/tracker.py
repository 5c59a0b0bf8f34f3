"""Incidents with hysteresis, per device and class: window observations in, changes out.

    tracker = IncidentTracker(rules)
    for change in tracker.observe("cell-02", obs, now_ms):   # one device window, in order
        ...   # Change("open" | "update" | "close", incident, reason)
    tracker.idle(now_ms)                                    # devices that went silent

Pure and single-threaded: what a device's incidents do depends only on its windows (and on
the wall clock for idle devices), so replaying the same windows from the same state gives
the same incidents, ids included (`incident_id` is device/class/start). A window no newer
than the device's last one is ignored, which makes re-reading after a restart harmless.

Rules (rules.py): a class opens when `k` of the device's last `n` windows (event time; a
missing window is no hit) score at least `open`; the incident starts at the first of those
hits and covers every window from there. It closes after `m` windows in a row below `close`
(missing windows count), ending with the last window at or above `close`; or when no
event of the device came for `idle_close_ms` of wall-clock time. Hits up to a close do not
count towards opening again. One device can have several classes open at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pipeline.incidents.rules import IncidentRules


@dataclass(frozen=True, slots=True)
class WindowObs:
    """What the incident stage keeps of one event: its window, label, scores, attribution."""

    start_ms: int
    end_ms: int
    label: str
    scores: Mapping[str, float]
    attribution: Mapping[str, float]


@dataclass(slots=True)
class Incident:
    incident_id: str
    device_id: str
    cls: str
    start_ms: int
    end_ms: int  # end of its last window at or above the close threshold
    last_start_ms: int  # the last window it saw (the trailing ones below close included)
    last_end_ms: int
    seq: int = -1  # of the last record published for it
    peak: float = 0.0
    total: float = 0.0
    windows: int = 0  # windows with an event in [start, end)
    attribution: dict[str, float] = field(default_factory=dict)  # sums over labelled windows
    attributed: int = 0  # windows labelled with its class
    pending: list[WindowObs] = field(default_factory=list)  # below close, not yet counted
    below: int = 0  # windows in a row below close (missing ones included)
    since_record: int = 0  # windows since its last record

    def add(self, obs: WindowObs) -> None:
        score = obs.scores.get(self.cls, 0.0)
        self.peak = max(self.peak, score)
        self.total += score
        self.windows += 1
        self.end_ms = obs.end_ms
        if obs.label == self.cls:
            self.attributed += 1
            for m, v in obs.attribution.items():
                self.attribution[m] = self.attribution.get(m, 0.0) + v

    @property
    def mean(self) -> float:
        return self.total / self.windows if self.windows else 0.0

    def mean_attribution(self) -> dict[str, float]:
        n = max(self.attributed, 1)
        return {m: v / n for m, v in sorted(self.attribution.items())}


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "open", "update" or "close"
    incident: Incident
    reason: str | None = None  # of a close: below_threshold, no_data or idle


@dataclass(slots=True)
class DeviceState:
    last_start_ms: int | None = None  # the newest window seen
    history: deque[WindowObs] = field(default_factory=deque)
    open: dict[str, Incident] = field(default_factory=dict)
    cleared: dict[str, int] = field(default_factory=dict)  # class -> hits up to here used
    seen_at_ms: int = 0  # wall clock of its last event (not persisted)


class IncidentTracker:
    """Every device's incident state. Devices that hold nothing (no open incident, no hit
    that may still count) are not kept: memory follows the devices with something going on.
    `take_saves` names the devices whose saved state changed (rebuilt after a restart from
    what was saved, see records.py)."""

    def __init__(self, rules: IncidentRules) -> None:
        self.rules = rules
        self.devices: dict[str, DeviceState] = {}
        self._saves: dict[str, int] = {}  # device -> its last window start, state changed

    # -- windows in ----------------------------------------------------------------------
    def observe(self, device: str, obs: WindowObs, now_ms: int) -> list[Change]:
        """One window of `device` (windows arrive in event-time order); its changes."""
        state = self.devices.get(device)
        if state is not None and state.last_start_ms is not None:
            if obs.start_ms <= state.last_start_ms:
                state.seen_at_ms = now_ms
                return []  # seen already (re-read after a restart), or older: no news
        was_active = state is not None and self._active(state)
        state = state or DeviceState()
        changes = self._missing(device, state, obs.start_ms)
        state.last_start_ms, state.seen_at_ms = obs.start_ms, now_ms
        self._remember(state, obs)
        for incident in list(state.open.values()):
            changes += self._follow(state, incident, obs)
        for cls in obs.scores:
            if cls not in state.open:
                opened = self._maybe_open(device, state, cls, obs)
                if opened is not None:
                    changes.append(opened)
        if self._active(state):
            self.devices[device] = state
            self._saves[device] = obs.start_ms
        else:  # nothing going on: not kept; saved once as such
            self.devices.pop(device, None)
            if was_active:
                self._saves[device] = obs.start_ms
        return changes

    def _missing(self, device: str, state: DeviceState, start_ms: int) -> list[Change]:
        """Windows between the device's last one and `start_ms` had no event: each counts
        as below the close threshold of every open incident."""
        if state.last_start_ms is None:
            return []
        gap = (start_ms - state.last_start_ms) // self.rules.window_ms - 1
        changes = []
        for cls, incident in list(state.open.items()):
            rule = self.rules.rule(cls)
            incident.below += max(gap, 0)
            if rule is None or incident.below >= rule.m:
                changes.append(self._close(state, incident, "no_data", state.last_start_ms))
        return changes

    def _remember(self, state: DeviceState, obs: WindowObs) -> None:
        state.history.append(obs)
        oldest = obs.start_ms - (self.rules.history_windows - 1) * self.rules.window_ms
        while state.history and state.history[0].start_ms < oldest:
            state.history.popleft()
        for cls in [c for c, at in state.cleared.items() if at < oldest]:
            del state.cleared[cls]

    def _follow(self, state: DeviceState, incident: Incident, obs: WindowObs) -> list[Change]:
        rule = self.rules.rule(incident.cls)
        incident.last_start_ms, incident.last_end_ms = obs.start_ms, obs.end_ms
        incident.since_record += 1
        if rule is not None and obs.scores.get(incident.cls, 0.0) >= rule.close:
            for held in incident.pending:  # a dip shorter than m windows: part of it
                incident.add(held)
            incident.pending.clear()
            incident.below = 0
            incident.add(obs)
        else:
            incident.pending.append(obs)
            incident.below += 1
            if rule is None or incident.below >= rule.m:
                return [self._close(state, incident, "below_threshold", obs.start_ms)]
        every = self.rules.update_every
        if every and incident.since_record >= every:
            return [self._record(Change("update", incident))]
        return []

    def _maybe_open(
        self, device: str, state: DeviceState, cls: str, obs: WindowObs
    ) -> Change | None:
        rule = self.rules.rule(cls)
        if rule is None or obs.scores.get(cls, 0.0) < rule.open:
            return None  # the count of hits grows only with a hit
        hits = [o.start_ms for o in state.history if self._hit(state, cls, o, obs.start_ms)]
        if len(hits) < rule.k:
            return None
        start = hits[0]
        incident = Incident(
            incident_id=f"{device}/{cls}/{start}",
            device_id=device,
            cls=cls,
            start_ms=start,
            end_ms=obs.end_ms,
            last_start_ms=obs.start_ms,
            last_end_ms=obs.end_ms,
        )
        for o in state.history:
            if o.start_ms >= start:
                incident.add(o)
        state.open[cls] = incident
        return self._record(Change("open", incident))

    def _hit(self, state: DeviceState, cls: str, obs: WindowObs, now_start_ms: int) -> bool:
        """Whether `obs` counts towards opening `cls` as of the window at `now_start_ms`:
        a hit among the last n windows, after the class's last close."""
        rule = self.rules.rule(cls)
        if rule is None or obs.scores.get(cls, 0.0) < rule.open:
            return False
        return obs.start_ms > max(
            now_start_ms - rule.n * self.rules.window_ms, state.cleared.get(cls, -(2**62))
        )

    def _close(self, state: DeviceState, incident: Incident, reason: str, at_ms: int) -> Change:
        del state.open[incident.cls]
        state.cleared[incident.cls] = at_ms
        return self._record(Change("close", incident, reason))

    @staticmethod
    def _record(change: Change) -> Change:
        """The change, with a copy of its incident as of now (it goes on changing)."""
        i = change.incident
        i.seq += 1
        i.since_record = 0
        copy = replace(i, attribution=dict(i.attribution), pending=list(i.pending))
        return replace(change, incident=copy)

    def _active(self, state: DeviceState) -> bool:
        """Whether the state decides anything later: an open incident, or a hit that may
        still count towards opening (at the device's next window)."""
        if state.open:
            return True
        if state.last_start_ms is None:
            return False
        nxt = state.last_start_ms + self.rules.window_ms
        return any(self._hit(state, cls, o, nxt) for o in state.history for cls in o.scores)

    # -- wall clock ----------------------------------------------------------------------
    def idle(self, now_ms: int) -> list[Change]:
        """Close the incidents of devices without an event for `idle_close_ms`, and forget
        those devices (their history too)."""
        changes: list[Change] = []
        gone = [
            d for d, s in self.devices.items() if now_ms - s.seen_at_ms >= self.rules.idle_close_ms
        ]
        for device in gone:
            state = self.devices.pop(device)
            if self._active(state) and state.last_start_ms is not None:
                self._saves[device] = state.last_start_ms
            for incident in list(state.open.values()):
                changes.append(self._close(state, incident, "idle", state.last_start_ms or 0))
        return changes

    # -- state ---------------------------------------------------------------------------
    def take_saves(self) -> list[tuple[str, DeviceState | None, int]]:
        """Devices whose saved state changed since the last call: (device, its state, or
        None when it holds nothing now, its last window start)."""
        saves, self._saves = self._saves, {}
        return [(d, self.devices.get(d), last) for d, last in saves.items()]

    def open_incidents(self) -> int:
        return sum(len(s.open) for s in self.devices.values())

    def restore(self, device: str, state: DeviceState, now_ms: int) -> None:
        """Take over a device's state saved by a previous owner (it counts as seen now).
        A state that holds nothing is kept too, for its last window: windows re-read up to
        it are not counted twice (it goes at the device's next window or when idle)."""
        state.seen_at_ms = now_ms
        self.devices[device] = state

    def drop(self, devices: list[str]) -> None:
        for d in devices:
            self.devices.pop(d, None)
            self._saves.pop(d, None)
