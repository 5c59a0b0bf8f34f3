"""What the incident stage reads and writes: events in, incident and state records out.

- `window_obs(event)`: an `iotfuse.event/v1` value as the tracker sees it;
- `incident_value(change, rules, model, now)`: an `iotfuse.incident/v1` record
  (docs/contract.md, "Incidents");
- `IncidentRecord`: an incident record as the sinks (pipeline/sinks/) get it;
- `state_value(device, state, last_start)` / `parse_state(value)`: a device's incident state
  as saved to `topics.incident_state` (compacted, keyed by device), and read back.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.incidents.rules import IncidentRules
from pipeline.incidents.tracker import Change, DeviceState, Incident, WindowObs

INCIDENT_SCHEMA = "iotfuse.incident/v1"
STATE_SCHEMA = "iotfuse.incident-state/v1"


@dataclass(frozen=True, slots=True)
class IncidentRecord:
    """An incident record as sinks get it: the JSON body published to Kafka, and what a
    sink routes or deduplicates by."""

    device_id: str
    cls: str
    incident_id: str
    seq: int
    change: str
    body: bytes


class BadEvent(ValueError):
    """An event value the incident stage cannot read (not iotfuse.event/v1)."""


def window_obs(event: Mapping[str, Any], rules: IncidentRules) -> tuple[str, WindowObs]:
    """(device, observation) of an event; only the scores of classes that can open."""
    try:
        scores = {
            str(c): float(v) for c, v in event["scores"].items() if rules.rule(str(c)) is not None
        }
        window = event["window"]
        obs = WindowObs(
            start_ms=int(window["start_ms"]),
            end_ms=int(window["end_ms"]),
            label=str(event["label"]),
            scores=scores,
            attribution={str(m): float(v) for m, v in event.get("attribution", {}).items()},
        )
        return str(event["device_id"]), obs
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadEvent(f"not an iotfuse.event/v1 value: {exc!r}") from exc


def incident_value(
    change: Change, rules: IncidentRules, model: Mapping[str, str], processed_at_ms: int
) -> dict[str, Any]:
    i = change.incident
    rule = rules.rule(i.cls) or rules.default
    closed = change.kind == "close"
    return {
        "schema": INCIDENT_SCHEMA,
        "incident_id": i.incident_id,
        "seq": i.seq,
        "device_id": i.device_id,
        "class": i.cls,
        "state": "closed" if closed else "open",
        "change": change.kind,
        "close_reason": change.reason if closed else None,
        "start_ms": i.start_ms,
        "end_ms": i.end_ms if closed else None,
        "last_window": {"start_ms": i.last_start_ms, "end_ms": i.last_end_ms},
        "peak_score": round(i.peak, 6),
        "mean_score": round(i.mean, 6),
        "windows": i.windows,
        "attribution": {m: round(v, 6) for m, v in i.mean_attribution().items()},
        "rule": {"open": rule.open, "close": rule.close, "k": rule.k, "n": rule.n, "m": rule.m},
        "model": dict(model),
        "processed_at_ms": processed_at_ms,
    }


# -- saved state ---------------------------------------------------------------------------


class _Keys:
    """The class and modality names of a saved state, listed once: each window's scores and
    attribution are lists in that order (a state is saved at nearly every window of a
    device with something going on, so its size counts)."""

    def __init__(self, windows: list[WindowObs]) -> None:
        self.classes = sorted({c for o in windows for c in o.scores})
        self.modalities = sorted({m for o in windows for m in o.attribution})

    def pack(self, o: WindowObs) -> list[Any]:
        scores = [o.scores.get(c) for c in self.classes]
        attribution = [o.attribution.get(m) for m in self.modalities]
        return [o.start_ms, o.end_ms - o.start_ms, o.label, scores, attribution]


def _unpack(d: list[Any], classes: list[str], modalities: list[str]) -> WindowObs:
    start, length, label, scores, attribution = d
    return WindowObs(
        int(start),
        int(start) + int(length),
        str(label),
        {c: float(v) for c, v in zip(classes, scores, strict=True) if v is not None},
        {m: float(v) for m, v in zip(modalities, attribution, strict=True) if v is not None},
    )


def _incident(i: Incident, keys: _Keys) -> dict[str, Any]:
    return {
        "incident_id": i.incident_id,
        "class": i.cls,
        "start_ms": i.start_ms,
        "end_ms": i.end_ms,
        "last_window": [i.last_start_ms, i.last_end_ms],
        "seq": i.seq,
        "peak": i.peak,
        "total": round(i.total, 6),
        "windows": i.windows,
        "attribution": {m: round(v, 6) for m, v in i.attribution.items()},
        "attributed": i.attributed,
        "pending": [keys.pack(o) for o in i.pending],
        "below": i.below,
        "since_record": i.since_record,
    }


def _parse_incident(
    device: str, d: Mapping[str, Any], classes: list[str], modalities: list[str]
) -> Incident:
    last_start, last_end = d["last_window"]
    return Incident(
        incident_id=str(d["incident_id"]),
        device_id=device,
        cls=str(d["class"]),
        start_ms=int(d["start_ms"]),
        end_ms=int(d["end_ms"]),
        last_start_ms=int(last_start),
        last_end_ms=int(last_end),
        seq=int(d["seq"]),
        peak=float(d["peak"]),
        total=float(d["total"]),
        windows=int(d["windows"]),
        attribution={str(k): float(v) for k, v in d["attribution"].items()},
        attributed=int(d["attributed"]),
        pending=[_unpack(o, classes, modalities) for o in d["pending"]],
        below=int(d["below"]),
        since_record=int(d["since_record"]),
    )


def state_value(device: str, state: DeviceState | None, last_start_ms: int) -> bytes:
    """A device's saved state; `state` None: it holds nothing (only its last window)."""
    body: dict[str, Any] = {
        "schema": STATE_SCHEMA,
        "device_id": device,
        "last_start_ms": last_start_ms,
    }
    if state is not None:
        windows = [*state.history, *(o for i in state.open.values() for o in i.pending)]
        keys = _Keys(windows)
        body["classes"], body["modalities"] = keys.classes, keys.modalities
        body["history"] = [keys.pack(o) for o in state.history]
        body["open"] = [_incident(i, keys) for i in state.open.values()]
        body["cleared"] = state.cleared
    return json.dumps(body, separators=(",", ":")).encode()


def parse_state(value: bytes) -> tuple[str, DeviceState]:
    """The device and state of a saved state record; ValueError when it is not one."""
    try:
        body = json.loads(value)
        if body.get("schema") != STATE_SCHEMA:
            raise ValueError(f"schema {body.get('schema')!r}")
        device = str(body["device_id"])
        classes = [str(c) for c in body.get("classes", ())]
        modalities = [str(m) for m in body.get("modalities", ())]
        state = DeviceState(last_start_ms=int(body["last_start_ms"]))
        state.history = deque(_unpack(o, classes, modalities) for o in body.get("history", ()))
        opened = (_parse_incident(device, d, classes, modalities) for d in body.get("open", ()))
        state.open = {i.cls: i for i in opened}
        state.cleared = {str(k): int(v) for k, v in body.get("cleared", {}).items()}
        return device, state
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not an {STATE_SCHEMA} record: {exc!r}") from exc
