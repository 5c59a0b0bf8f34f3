"""Labelled training windows from recordings, through the live pipeline's own code path.

Records go through the same aligner, `ingest()`, `Windower` and `window_inputs()` as in
`iotfuse run`; only the last stage differs: instead of classifying a closed window, its
raw inputs are paired with the ground truth of the labels topic. A window's label is the
label covering most of it (labels are half-open spans per device).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from encoders.modality import Modality
from pipeline.align import Aligner
from pipeline.decode import RejectedRecord
from pipeline.features import FeatureSpec, window_inputs
from pipeline.ingest import IngestConfig, ingest
from pipeline.records import Record
from pipeline.windows import Window, WindowConfig, Windower

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LabelSpan:
    label: str
    start_ms: int
    end_ms: int


@dataclass
class Labels:
    """Ground truth per device: sorted, half-open spans."""

    spans: dict[str, list[LabelSpan]] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        try:
            data = json.loads(record.value or b"")
            span = LabelSpan(str(data["label"]), int(data["start_ms"]), int(data["end_ms"]))
            device = (record.key or b"").decode()
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("ignoring malformed label record at %s/%d/%d",
                        record.topic, record.partition, record.offset)
            return
        spans = self.spans.setdefault(device, [])
        bisect.insort(spans, span, key=lambda s: s.start_ms)

    def label_of(self, device: str, start_ms: int, end_ms: int) -> str | None:
        """The label covering most of [start_ms, end_ms), or None if nothing covers it."""
        best, best_overlap = None, 0
        for span in self.spans.get(device, ()):
            overlap = min(end_ms, span.end_ms) - max(start_ms, span.start_ms)
            if overlap > best_overlap:
                best, best_overlap = span.label, overlap
        return best

    def classes(self) -> list[str]:
        return sorted({s.label for spans in self.spans.values() for s in spans})


@dataclass(frozen=True, slots=True)
class LabelledWindow:
    device_id: str
    start_ms: int
    inputs: dict[Modality, np.ndarray]
    label: str


def closed_windows(
    records: Iterable[Record], ingest_cfg: IngestConfig, windows: WindowConfig,
    on_other: Callable[[Record], None] | None = None,
) -> Iterator[Window]:
    """Windows in the order they close, over a finite stream (event time only)."""
    inputs = tuple(ingest_cfg.topics)
    aligner = Aligner(inputs)
    windower = Windower(windows)

    def feed(batch: list[Record]) -> Iterator[Window]:
        for record in batch:
            try:
                got = ingest(record, ingest_cfg)
            except RejectedRecord:
                continue  # the live pipeline dead-letters these; nothing to learn from
            yield from windower.add(got.device_id, got.item, 0).closed

    for record in records:
        if record.topic in inputs:
            aligner.push(record)
            yield from feed(aligner.pop_ready(lambda _t, _p: False))
        elif on_other is not None:
            on_other(record)
    yield from feed(aligner.flush())
    yield from windower.close_all()


def labelled_windows(
    records: Iterable[Record], ingest_cfg: IngestConfig, windows: WindowConfig,
    spec: FeatureSpec, labels_topic: str,
) -> list[LabelledWindow]:
    """Every window with a label, with the model's raw inputs (labels may come late)."""
    labels = Labels()

    def other(record: Record) -> None:
        if record.topic == labels_topic:
            labels.add(record)

    pending = [(w.device_id, w.start_ms, w.end_ms, window_inputs(w, spec).raw)
               for w in closed_windows(records, ingest_cfg, windows, other)]
    out = []
    for device, start, end, raw in pending:
        label = labels.label_of(device, start, end)
        if label is not None and raw:
            out.append(LabelledWindow(device, start, raw, label))
    return out
