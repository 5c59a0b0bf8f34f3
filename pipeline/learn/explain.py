"""`iotfuse explain`: which pixels, which sounds and which sensor made a window's label.

Windows come from a recording through the live pipeline's own code path
(`pipeline.learn.dataset.closed_windows`, `pipeline.stream.features.window_inputs`); the
attributions from `fusion.explain` (Captum). Each explained window gets, per modality it
has, both of its methods:

    camera     integrated gradients per frame, occlusion (patches in every frame)
    audio      integrated gradients and occlusion over the log-mel cells
    telemetry  integrated gradients per metric and time step (summed per metric), and the
               exact Shapley values of the metrics (the ranking)

`explanation_json` holds the numbers; `pipeline.learn.explain_report` draws them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from encoders.modality import Modality
from pipeline.errors import UserError
from pipeline.learn.dataset import Labels, closed_windows
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.features import FeatureSpec, window_inputs
from pipeline.stream.ingest import IngestConfig
from pipeline.stream.model_runner import ModelRunner

SCHEMA = "iotfuse.explanation/v1"
MAX_WINDOWS = 24  # one report; more do not fit a page a person reads


@dataclass(frozen=True)
class WindowRef:
    """One window of a recording and the model's raw inputs of it."""

    device_id: str
    start_ms: int
    end_ms: int
    inputs: dict[Modality, np.ndarray]
    truth: str | None = None  # the label of the recording's labels topic, if any


@dataclass(frozen=True)
class ModalityView:
    """The attributions of one modality of one window, and what they are drawn on."""

    modality: Modality
    baseline: str
    maps: dict[str, np.ndarray]  # method -> camera [T, S, S], audio [F, L], telemetry [steps, M]
    per_metric: dict[str, np.ndarray] = field(default_factory=dict)  # telemetry: method -> [M]
    picture: np.ndarray | None = None  # camera uint8 [T, S, S, 3]; audio log-mel [F, L]
    ig_steps: int = 0
    ig_delta: float = 0.0  # completeness: sum of IG cells - (f(x) - f(baseline))


@dataclass(frozen=True)
class WindowExplanation:
    window: WindowRef
    label: str  # the class explained: the predicted one
    confidence: float
    scores: dict[str, float]
    attribution: dict[str, float]  # exact modality Shapley values, as in the event
    views: dict[Modality, ModalityView]
    metrics: tuple[str, ...]  # telemetry metric names, in column order

    def ranking(self) -> list[tuple[str, float]]:
        """Telemetry metrics by Shapley value, largest first ([] without telemetry)."""
        view = self.views.get(Modality.TELEMETRY)
        if view is None:
            return []
        values = view.per_metric["shapley_values"]
        order = sorted(range(len(values)), key=lambda j: -float(values[j]))
        return [(self.metrics[j], float(values[j])) for j in order]


# -- windows of a recording -----------------------------------------------------------------
def _ingest(settings: Settings, spec: FeatureSpec) -> IngestConfig:
    return IngestConfig.from_settings(settings.topics, settings.limits, spec.sample_rate)


def _windows(
    records: Iterable[Record], settings: Settings, spec: FeatureSpec, labels: Labels
) -> Iterator[WindowRef]:
    """Every window with inputs; the labels topic's records go into `labels` (complete once
    the last window is out)."""
    from pipeline.stream.assembly import window_config

    def other(record: Record) -> None:
        if record.topic == settings.topics.labels:
            labels.add(record)

    for w in closed_windows(
        records, _ingest(settings, spec), window_config(settings, spec.window_ms), other
    ):
        raw = window_inputs(w, spec).raw
        if raw:
            yield WindowRef(w.device_id, w.start_ms, w.end_ms, raw)


def _with_truth(ref: WindowRef, labels: Labels) -> WindowRef:
    truth = labels.label_of(ref.device_id, ref.start_ms, ref.end_ms)
    return WindowRef(ref.device_id, ref.start_ms, ref.end_ms, ref.inputs, truth)


def window_at(
    records: Iterable[Record], settings: Settings, spec: FeatureSpec, device: str, at_ms: int
) -> WindowRef:
    """The window of `device` holding event time `at_ms`; UserError if the data has none."""
    key = device.encode()
    start = at_ms // spec.window_ms * spec.window_ms
    found: WindowRef | None = None
    starts: list[int] = []
    labels = Labels()
    for ref in _windows((r for r in records if r.key == key), settings, spec, labels):
        starts.append(ref.start_ms)
        if ref.start_ms == start:
            found = ref
    if found is None:
        span = (
            f"its windows run from {iso(min(starts))} to {iso(max(starts) + spec.window_ms)}"
            if starts
            else "the recording has no input records of that device"
        )
        raise UserError(
            f"device {device!r} has no window holding {iso(at_ms)} ({at_ms}): {span}; "
            "pass --at a time inside one of them"
        )
    return _with_truth(found, labels)


def most_confident(
    records: Iterable[Record],
    settings: Settings,
    runner: ModelRunner,
    label: str,
    limit: int,
    batch_size: int = 64,
) -> list[WindowRef]:
    """The `limit` windows the model labels `label` with the highest confidence, most
    confident first; at most `limit` + `batch_size` windows' inputs are held at a time."""
    classes = list(runner.config.classes)
    if label not in classes:
        raise UserError(f"the model has no class {label!r}; its classes: {', '.join(classes)}")
    k = classes.index(label)
    best: list[tuple[float, int, WindowRef]] = []  # min-heap of the `limit` best
    pending: list[WindowRef] = []
    seen = 0
    labels = Labels()

    def score(batch: list[WindowRef]) -> None:
        nonlocal seen
        for ref, decision in zip(batch, runner.classify([r.inputs for r in batch]), strict=True):
            seen += 1
            if decision.label == label:
                item = (float(decision.scores[classes[k]]), -seen, ref)
                (heapq.heappush if len(best) < limit else heapq.heappushpop)(best, item)

    for ref in _windows(records, settings, runner.features, labels):
        pending.append(ref)
        if len(pending) >= batch_size:
            score(pending)
            pending = []
    score(pending)
    if not best:
        raise UserError(
            f"the model labels none of the {seen} windows {label!r}; "
            "pick another class or recording"
        )
    return [_with_truth(ref, labels) for _, _, ref in sorted(best, reverse=True)]


# -- explaining ---------------------------------------------------------------------------
def explain_windows(runner: ModelRunner, windows: Sequence[WindowRef]) -> list[WindowExplanation]:
    """Every modality of every window explained for its predicted class, by both methods."""
    import torch

    from fusion.batch import WindowBatch
    from fusion.explain import BASELINES, Attributions, Explainer

    cfg = runner.config
    rate = cfg.audio.sample_rate if cfg.audio is not None else 16000
    batch = WindowBatch.collate([w.inputs for w in windows], audio_sample_rate=rate)
    with torch.inference_mode(False):
        ex = Explainer(runner.model, batch)
        pred = ex.prediction()
        got: dict[Modality, list[Attributions]] = {}
        for m in ex.modalities:
            second = ex.metric_shapley() if m is Modality.TELEMETRY else ex.occlusion(m)
            got[m] = [ex.integrated_gradients(m), second]
        pictures = {m: x.detach().cpu() for m, x in ex.batch.raw.items()}
        logmel = ex.input(Modality.AUDIO) if Modality.AUDIO in ex.batch.raw else None
    probs = pred.probs.cpu().numpy()  # [B, C]
    phi = pred.attribution.cpu().numpy()  # [B, M]
    metrics = tuple(cfg.telemetry.metrics) if cfg.telemetry is not None else ()
    out = []
    for b, ref in enumerate(windows):
        views: dict[Modality, ModalityView] = {}
        for m, results in got.items():
            rows = results[0].rows.cpu().tolist()
            if b not in rows:
                continue
            i = rows.index(b)
            ig, other = results
            maps = {r.method: r.cells[i].cpu().numpy() for r in results if r.cells.dim() > 2}
            per_metric = (
                {r.method: r.per_metric()[i].cpu().numpy() for r in results}
                if m is Modality.TELEMETRY
                else {}
            )
            picture = pictures[m][i].numpy()
            if m is Modality.AUDIO and logmel is not None:
                picture = logmel[i].detach().cpu().numpy()
            delta = float(ig.delta[i]) if ig.delta is not None else 0.0
            views[m] = ModalityView(m, BASELINES[m], maps, per_metric, picture, ig.steps, delta)
        k = int(probs[b].argmax())
        out.append(
            WindowExplanation(
                window=ref,
                label=cfg.classes[k],
                confidence=float(probs[b, k]),
                scores={c: float(p) for c, p in zip(cfg.classes, probs[b], strict=True)},
                attribution={str(m): float(v) for m, v in zip(cfg.modalities, phi[b], strict=True)},
                views=views,
                metrics=metrics,
            )
        )
    return out


# -- the JSON -----------------------------------------------------------------------------
def _rounded(a: np.ndarray) -> Any:
    return np.round(a.astype(np.float64), 6).tolist()


def view_json(view: ModalityView, metrics: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline": view.baseline, "methods": {}}
    for method, cells in view.maps.items():
        entry: dict[str, Any] = {"cells": _rounded(cells)}
        if method == "integrated_gradients":  # the cells add up (occlusion's do not)
            entry |= {
                "sum": round(float(cells.sum()), 6),
                "steps": view.ig_steps,
                "completeness_error": round(view.ig_delta, 6),
            }
        out["methods"][method] = entry
    if view.modality is Modality.CAMERA:
        out["cells"] = "[frame][row][column], RGB summed"
    elif view.modality is Modality.AUDIO:
        out["cells"] = "[mel band][frame], low bands first"
    else:
        out["cells"] = "[time step][metric]"
        out["metrics"] = list(metrics)
        out["per_metric"] = {
            method: {name: round(float(v), 6) for name, v in zip(metrics, values, strict=True)}
            for method, values in view.per_metric.items()
        }
        for method, values in view.per_metric.items():
            out["methods"].setdefault(method, {})["sum"] = round(float(values.sum()), 6)
    return out


def explanation_json(e: WindowExplanation) -> dict[str, Any]:
    w = e.window
    return {
        "device_id": w.device_id,
        "window": {"start_ms": w.start_ms, "end_ms": w.end_ms, "start": iso(w.start_ms)},
        "truth": w.truth,
        "label": e.label,
        "confidence": round(e.confidence, 6),
        "scores": {k: round(v, 6) for k, v in e.scores.items()},
        "attribution": {k: round(v, 6) for k, v in e.attribution.items()},
        "telemetry_ranking": [[name, round(v, 6)] for name, v in e.ranking()],
        "modalities": {str(m): view_json(v, e.metrics) for m, v in e.views.items()},
    }


def report_json(runner: ModelRunner, explanations: Sequence[WindowExplanation]) -> dict[str, Any]:
    """The whole report: model, what each method and baseline is, and every window."""
    from fusion.explain import BASELINES

    return {
        "schema": SCHEMA,
        "model": {"name": runner.model_id.name, "version": runner.model_id.version},
        "explains": "each window's predicted class: inside a modality its log-odds "
        "log(p / (1 - p)) (which does not saturate near p = 1); `attribution` (the modality "
        "Shapley values) its probability, as in the event",
        "methods": {
            "integrated_gradients": "Captum IntegratedGradients from the baseline; the cells "
            "sum to the log-odds of the window minus those with this modality at its baseline",
            "occlusion": "Captum Occlusion: the fall of the log-odds when a patch holds the "
            "baseline, averaged over the patches covering a cell (camera: a quarter of the "
            "side, in every frame; audio: 1/8 of the bands x 0.21 s)",
            "shapley_values": "Captum ShapleyValues, exact over the telemetry metrics (absent "
            "outside a coalition); they sum to the log-odds of the window minus those "
            "without any metric",
        },
        "baselines": {str(m): text for m, text in BASELINES.items()},
        "windows": [explanation_json(e) for e in explanations],
    }


# -- times --------------------------------------------------------------------------------
def iso(ms: int) -> str:
    """Epoch milliseconds as UTC ISO 8601, to the millisecond."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_time(text: str) -> int:
    """--at: epoch milliseconds, or an ISO 8601 time (UTC when it names no offset)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UserError(
            f"--at {text!r} is neither epoch milliseconds nor an ISO 8601 time; "
            "pass e.g. 1767225610000 or 2026-01-01T00:00:10Z"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return math.floor(t.timestamp() * 1000)
