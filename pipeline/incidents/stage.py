"""The incident stage after classification, and the engine that runs it.

`IncidentEngine` is the stream `Engine` whose outputs also carry incidents: every event it
publishes is followed, in the same list, by the incident records it causes (topic
`incidents`) and the device's saved state (topic `incident_state`). The Kafka worker sends
them all through its one producer, so under `--exactly-once` they share the events' Kafka
transaction, and at-least-once flushes them before the offsets are committed: the state
saved is never older than what was committed (docs/contract.md, "Incidents").

After a restart or a rebalance the worker resumes each gained partition; the stage then
loads the saved states of that partition's devices from a `StateStore` (Kafka:
pipeline/kafka/incident_state.py) and goes on where they were. Windows re-read up to a
device's saved last window are not counted again, so an incident is opened once and
closed once whatever is re-read. Revoked partitions' devices are forgotten (the new owner
loads them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pipeline.clock import Clock, wall_clock_ms
from pipeline.incidents.records import (
    BadEvent,
    IncidentRecord,
    incident_value,
    parse_state,
    state_value,
    window_obs,
)
from pipeline.incidents.rules import IncidentRules
from pipeline.incidents.tracker import Change, IncidentTracker
from pipeline.logs import Throttle
from pipeline.metrics import Metrics
from pipeline.stream.engine import Classify, Engine, EngineConfig
from pipeline.stream.outputs import ModelId, Output

log = logging.getLogger(__name__)

JSON: tuple[tuple[str, bytes | None], ...] = (("content-type", b"application/json"),)
IDLE_CHECK_MS = 1000  # how often devices are checked for idleness


Sink = Callable[[IncidentRecord], None]


class StateStore(Protocol):
    """Where saved device states are read back from (Kafka: the compacted state topic)."""

    def load(self, partition: int) -> list[bytes]:
        """The latest saved state of every device of input partition `partition`."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StageConfig:
    rules: IncidentRules
    events_topic: str
    incidents_topic: str
    state_topic: str
    model: ModelId


class IncidentStage:
    def __init__(
        self,
        cfg: StageConfig,
        metrics: Metrics,
        clock: Clock = wall_clock_ms,
        sink: Sink | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.sink = sink
        self.store = store
        self.tracker = IncidentTracker(cfg.rules)
        self._partition: dict[str, int] = {}  # devices the tracker holds -> input partition
        self._resumed: set[int] = set()
        self._last_idle_check = clock()
        self._bad = Throttle(log)
        self._model = {"name": cfg.model.name, "version": cfg.model.version}

    def follow(self, outputs: list[Output]) -> list[Output]:
        """`outputs` with each event followed by the incident and state records it causes."""
        out: list[Output] = []
        for o in outputs:
            out.append(o)
            if o.topic == self.cfg.events_topic and o.value is not None:
                out += self._event(o)
        return out

    def _event(self, o: Output) -> list[Output]:
        try:
            device, obs = window_obs(json.loads(o.value or b""), self.cfg.rules)
        except (BadEvent, json.JSONDecodeError) as exc:  # not ours: say so, go on
            self._bad.log(logging.WARNING, "event", "incidents: skipped an event: %s", exc)
            return []
        if o.holds:
            self._partition[device] = o.holds[0].partition
        return self._outputs(self.tracker.observe(device, obs, self.clock()))

    def tick(self, read_through: int | None = None) -> list[Output]:
        """Close the incidents of devices gone idle (checked once a second), idleness timed
        to `read_through` as `Engine.tick` does."""
        now = self.clock()
        if now - self._last_idle_check < IDLE_CHECK_MS:
            return []
        self._last_idle_check = now
        heard_until = now if read_through is None else min(now, read_through)
        out = self._outputs(self.tracker.idle(heard_until))
        for device in [d for d in self._partition if d not in self.tracker.devices]:
            del self._partition[device]
        return out

    def _outputs(self, changes: Iterable[Change]) -> list[Output]:
        now = self.clock()
        out = []
        for change in changes:
            i = change.incident
            body = json.dumps(
                incident_value(change, self.cfg.rules, self._model, now), separators=(",", ":")
            ).encode()
            out.append(
                Output(
                    self.cfg.incidents_topic, i.device_id.encode(), body, JSON, i.last_end_ms, ()
                )
            )
            self.metrics.labelled(self.metrics.incidents, change.kind).inc()
            if self.sink is not None:
                self.sink(
                    IncidentRecord(i.device_id, i.cls, i.incident_id, i.seq, change.kind, body)
                )
        for device, state, last_start in self.tracker.take_saves():
            value = state_value(device, state, last_start)
            end = last_start + self.cfg.rules.window_ms
            out.append(Output(self.cfg.state_topic, device.encode(), value, JSON, end, ()))
        self.metrics.incidents_open.set(self.tracker.open_incidents())
        return out

    # -- partitions ----------------------------------------------------------------------
    def resume(self, partition: int) -> None:
        """A gained partition: load its devices' saved states (once per assignment)."""
        if partition in self._resumed:
            return
        self._resumed.add(partition)
        if self.store is None:
            return
        latest = {}  # a log not compacted yet holds older states first: the last one wins
        for value in self.store.load(partition):
            try:
                device, state = parse_state(value)
            except ValueError as exc:
                self._bad.log(logging.WARNING, "state", "incidents: skipped a saved state: %s", exc)
                continue
            latest[device] = state
        now, opened = self.clock(), 0
        for device, state in latest.items():
            if device in self.tracker.devices:
                continue  # seen since the assignment: what it did since is newer
            self.tracker.restore(device, state, now)
            self._partition[device] = partition
            opened += len(state.open)
        loaded = len(latest)
        self.metrics.incidents_open.set(self.tracker.open_incidents())
        if loaded:
            log.info(
                "incidents: partition %d: %d device states loaded, %d incidents open",
                partition,
                loaded,
                opened,
            )

    def revoke(self, partitions: set[int]) -> None:
        gone = [d for d, p in self._partition.items() if p in partitions]
        self.tracker.drop(gone)
        for d in gone:
            del self._partition[d]
        self._resumed -= partitions
        self.metrics.incidents_open.set(self.tracker.open_incidents())

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class IncidentEngine(Engine):
    """The stream engine with the incident stage after it (see the module docstring)."""

    def __init__(
        self,
        cfg: EngineConfig,
        classify: Classify,
        metrics: Metrics,
        clock: Clock,
        stage: IncidentStage,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(cfg, classify, metrics, clock)
        self.incidents = stage
        self._on_close = on_close
        self._pending: list[Output] = []  # idle closes, out with the next batch

    def _emit(self, outputs: list[Output]) -> list[Output]:
        pending, self._pending = self._pending, []
        return pending + self.incidents.follow(outputs)

    def batch_due(self) -> bool:
        return bool(self._pending) or super().batch_due()

    def tick(self, read_through: int | None = None) -> None:
        super().tick(read_through)
        self._pending += self.incidents.tick(read_through)

    def finish(self) -> list[Output]:
        outputs = super().finish()
        pending, self._pending = self._pending, []
        return outputs + pending

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> int:
        partitions = list(partitions)
        dropped = super().revoke(partitions)
        self.incidents.revoke({p for _, p in partitions})
        return dropped

    def resume(self, partition: int, progress: dict[str, int]) -> None:
        super().resume(partition, progress)
        self.incidents.resume(partition)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.incidents.close()
            if self._on_close is not None:
                self._on_close()
