"""Labelled training windows from recordings, through the live pipeline's own code path.

Records go through the same aligner, `ingest()`, `Windower` and `window_inputs()` as in
`iotfuse run`; only the last stage differs: instead of classifying a closed window, its
raw inputs are paired with the ground truth of the labels topic. A window's label is the
label covering most of it (labels are half-open spans per device).

`windows_from_recordings` does this for recording files (training and evaluation).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.modality import Modality
from pipeline.decode import RejectedRecord
from pipeline.errors import UserError
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.align import Aligner
from pipeline.stream.features import FeatureSpec, window_inputs
from pipeline.stream.ingest import IngestConfig, ingest
from pipeline.stream.windows import Window, WindowConfig, Windower

log = logging.getLogger(__name__)
OnRecords = Callable[[int, int], None]  # (records, bytes) read so far


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
            log.warning(
                "ignoring malformed label record at %s/%d/%d",
                record.topic,
                record.partition,
                record.offset,
            )
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
    records: Iterable[Record],
    ingest_cfg: IngestConfig,
    windows: WindowConfig,
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
    records: Iterable[Record],
    ingest_cfg: IngestConfig,
    windows: WindowConfig,
    spec: FeatureSpec,
    labels_topic: str,
) -> list[LabelledWindow]:
    """Every window with a label, with the model's raw inputs (labels may come late)."""
    labels = Labels()

    def other(record: Record) -> None:
        if record.topic == labels_topic:
            labels.add(record)

    pending = [
        (w.device_id, w.start_ms, w.end_ms, window_inputs(w, spec).raw)
        for w in closed_windows(records, ingest_cfg, windows, other)
    ]
    out = []
    for device, start, end, raw in pending:
        label = labels.label_of(device, start, end)
        if label is not None and raw:
            out.append(LabelledWindow(device, start, raw, label))
    return out


@dataclass
class Tally:
    records: int = 0
    bytes: int = 0  # keys and values


def counted(
    records: Iterable[Record], tally: Tally, on_records: OnRecords | None, every: int = 200
) -> Iterator[Record]:
    """Pass records through, adding them to `tally` and reporting it every `every` records."""
    for record in records:
        tally.records += 1
        tally.bytes += len(record.key or b"") + len(record.value or b"")
        if on_records is not None and tally.records % every == 0:
            on_records(tally.records, tally.bytes)
        yield record


def windows_from_recordings(
    paths: Sequence[Path],
    settings: Settings,
    spec: FeatureSpec,
    on_records: OnRecords | None = None,
) -> list[LabelledWindow]:
    """Labelled windows of every recording, one after the other."""
    return [w for got in recording_windows(paths, settings, spec, on_records) for w in got]


def recording_windows(
    paths: Sequence[Path],
    settings: Settings,
    spec: FeatureSpec,
    on_records: OnRecords | None = None,
) -> list[list[LabelledWindow]]:
    """Labelled windows of each recording (each read on its own: device ids may repeat)."""
    from pipeline.recordings.file import RecordingError, read_records
    from pipeline.stream.assembly import window_config

    ingest_cfg = IngestConfig.from_settings(settings.topics, settings.limits, spec.sample_rate)
    windows: WindowConfig = window_config(settings, spec.window_ms)
    out: list[list[LabelledWindow]] = []
    tally = Tally()
    for path in paths:
        try:
            records = counted(read_records(path), tally, on_records)
            got = labelled_windows(records, ingest_cfg, windows, spec, settings.topics.labels)
        except FileNotFoundError:
            raise UserError(f"recording {path} does not exist") from None
        except (RecordingError, OSError) as exc:
            raise UserError(f"cannot read recording {path}: {exc}") from exc
        if not got:
            raise UserError(
                f"{path} yields no labelled windows: it needs input records and "
                f"labels on topic {settings.topics.labels!r} for the same devices"
            )
        out.append(got)
    return out
