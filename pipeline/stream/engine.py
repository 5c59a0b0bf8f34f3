"""The stream core: records in, outputs (events and dead letters) out.

Plain, single-threaded logic with Kafka only at the edges: the Kafka worker, offline
replay and the tests all drive the same `Engine`:

    for record in source:
        outputs += engine.process(record)     # dead letters now; windows queue as they close
    engine.tick()                             # idle timeouts (injected wall clock)
    engine.idle()                             # nothing to read now: decode frames ahead
    if engine.batch_due(): outputs += engine.run_batch()   # encode + fuse closed windows
    elif not engine.queued(): engine.infer_early()          # spare time: see below
    engine.take_released()                    # positions that need no output (late records)

`run_batch` is `start_batch` then `collect(wait=True)`; with `model_thread` the Kafka worker
starts a batch and collects it on a later step, reading on meanwhile (pipeline/stream/lane.py).

Early inference (`early_inference`, `infer_early`) classifies complete windows before
they close: pipeline/stream/early.py.

Every position an output holds is released by the caller once the broker acknowledged it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from encoders.modality import Modality
from pipeline.clock import Clock, wall_clock_ms
from pipeline.decode import RejectedRecord
from pipeline.logs import Throttle
from pipeline.metrics import Metrics
from pipeline.records import Record
from pipeline.stream.device_checks import DeviceChecks
from pipeline.stream.early import Classified, EarlyResults, WindowKey, window_key
from pipeline.stream.features import FeatureSpec, WindowInputs, window_inputs
from pipeline.stream.ingest import IngestConfig, ingest
from pipeline.stream.lane import ModelLane
from pipeline.stream.outputs import (
    Decision,
    ModelId,
    Output,
    dead_letter,
    event_output,
    event_value,
)
from pipeline.stream.prefetch import FramePrefetch
from pipeline.stream.window_progress import DeviceProgress
from pipeline.stream.windows import Position, Window, WindowConfig, Windower

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

Classify = Callable[[Sequence[dict[Modality, np.ndarray]]], list[Decision]]


MIN_SPLIT = 8  # windows per concurrent model call at least


@dataclass(frozen=True, slots=True)
class EngineConfig:
    ingest: IngestConfig
    windows: WindowConfig
    features: FeatureSpec
    events_topic: str
    deadletter_topic: str
    model: ModelId
    max_batch: int = 64
    batch_timeout_ms: int = 20
    max_open_windows: int = 10000
    max_buffered_bytes: int = 512 * 1024 * 1024
    feature_threads: int = 1  # threads preparing one batch's window inputs (frame decode)
    early_inference: bool = False  # classify complete windows before they close
    model_thread: bool = False  # classify batches on a thread of their own (lane.py)
    model_timeout_s: float = 0.0  # longest a batch may stay with that thread; 0 = no limit


@dataclass(slots=True)
class _Closed:
    window: Window
    closed_at_ms: int


_Started = tuple[list[_Closed], dict[WindowKey, Classified]]  # a batch, its early results


class Engine:
    def __init__(
        self, cfg: EngineConfig, classify: Classify, metrics: Metrics, clock: Clock = wall_clock_ms
    ) -> None:
        self.cfg = cfg
        self.classify = classify
        self.metrics = metrics
        self.clock = clock
        self.windower = Windower(cfg.windows)
        self._queue: list[_Closed] = []
        self._released: list[Position] = []
        self._records: dict[Position, Record] = {}  # camera records, for decode-time rejects
        self._device_partition: dict[str, int] = {}
        self._progress = DeviceProgress()
        self._checks = DeviceChecks(metrics)
        self.prefetch = FramePrefetch(cfg.features, cfg.feature_threads)
        self._early = EarlyResults()
        self._lane: ModelLane[_Started, dict[WindowKey, Classified]] = ModelLane(
            cfg.model_thread, cfg.model_timeout_s, lambda: clock() / 1000
        )
        self._rejections = Throttle(log)  # one line per reason a minute: floods stay quiet

    # -- records in ---------------------------------------------------------------------
    def _reject(self, record: Record, err: RejectedRecord) -> Output:
        """Count a rejected record, say so (once a minute per reason), dead-letter it."""
        self.metrics.labelled(self.metrics.dead_letters, str(err.reason)).inc()
        self._rejections.log(
            logging.WARNING,
            str(err.reason),
            "dead-lettered %s/%d@%d: %s",
            record.topic,
            record.partition,
            record.offset,
            err,
        )
        return dead_letter(record, err, self.cfg.deadletter_topic)

    def process(self, record: Record) -> list[Output]:
        """Ingest one record; returns its dead letter if it is rejected."""
        now = self.clock()
        try:
            got = ingest(record, self.cfg.ingest)
        except RejectedRecord as err:
            return [self._reject(record, err)]
        self.metrics.labelled(self.metrics.records_in, got.item.modality).inc()
        seen = self._device_partition.setdefault(got.device_id, record.partition)
        self._checks.partition(got.device_id, record, seen)
        self._checks.clock(got.device_id, got.item.ts_ms, now)
        if self._progress.already_emitted(got.device_id, self.cfg.windows.start_of(got.item.ts_ms)):
            self.metrics.reread_skipped.inc()
            self._released.append(got.item.position)
            self._note_progress(got.device_id)
            return []
        result = self.windower.add(got.device_id, got.item, now)
        self._note_progress(got.device_id)
        self._enqueue(result.closed, now)  # first: a closed window tells what frames to expect
        if self.cfg.early_inference:
            self._early.note(result.completed, result.window)
        if result.late:
            self.metrics.labelled(self.metrics.late_records, got.item.modality).inc()
            self._released.append(got.item.position)
        elif got.item.modality is Modality.CAMERA:
            self._records[got.item.position] = record
            if Modality.CAMERA in self.cfg.features.modalities:
                start = self.cfg.windows.start_of(got.item.ts_ms)
                self.prefetch.on_frame(got.device_id, start, got.item)
        return []

    def idle(self) -> None:
        """The reader has no records now: decode frames ahead (pipeline/stream/prefetch.py)."""
        self.prefetch.idle()

    def tick(self, read_through: int | None = None) -> None:
        """Close windows of devices that went silent (wall-clock idle timeout).

        `read_through`: the wall time up to which the input has been read, when the
        reader knows it (the Kafka worker: pipeline/kafka/log_end.py); silence is timed to
        it, so records still unread (a broker away, a lagging partition) are not silence."""
        now = self.clock()
        heard_until = now if read_through is None else min(now, read_through)
        self._enqueue(self.windower.expire_idle(heard_until), now)
        self._forget_devices(self.windower.forget_silent(heard_until))
        self.metrics.open_windows.set(self.windower.open_windows)
        self.metrics.buffered_bytes.set(self.windower.buffered_bytes)

    def finish(self) -> list[Output]:
        """End of a finite stream: close every window and classify everything queued."""
        self._enqueue(self.windower.close_all(), self.clock())
        outputs: list[Output] = []
        while self._queue or self._lane:
            outputs += self.run_batch()
        return outputs

    # -- batching -----------------------------------------------------------------------
    def queued(self) -> int:
        return len(self._queue)

    def batch_due(self) -> bool:
        """A full batch, one that waited `batch_timeout_ms` for company, or one whose
        windows were all classified early (nothing left to batch)."""
        if not self._queue:
            return False
        waited = self.clock() - self._queue[0].closed_at_ms
        return (
            len(self._queue) >= self.cfg.max_batch
            or waited >= self.cfg.batch_timeout_ms
            or self.queue_classified_early()
        )

    def queue_classified_early(self) -> bool:
        """Every queued window has its early result: nothing to compute, publish it now."""
        return bool(self._queue) and all(self._early.valid(c.window) for c in self._queue)

    def over_capacity(self) -> bool:
        return (
            self.windower.open_windows >= self.cfg.max_open_windows
            or self.windower.buffered_bytes >= self.cfg.max_buffered_bytes
        )

    def in_flight(self) -> int:
        """Batches started and not yet collected."""
        return len(self._lane)

    def run_batch(self) -> list[Output]:
        """Encode and fuse up to `max_batch` closed windows as one batch, after every batch
        already started (windows classified early and unchanged since are not classified
        again)."""
        self.start_batch()
        return self.collect(wait=True)

    def start_batch(self) -> None:
        """Take up to `max_batch` closed windows to classify: on the model thread with
        `model_thread` (collect them later), else now."""
        batch, self._queue = self._queue[: self.cfg.max_batch], self._queue[self.cfg.max_batch :]
        if not batch:
            return
        windows = [c.window for c in batch]
        known = self._early.reuse(windows, self.metrics)
        todo = [w for w in windows if window_key(w) not in known]
        self._lane.start((batch, known), lambda: self._infer(todo), inline=not todo)

    def collect(self, wait: bool = False) -> list[Output]:
        """The outputs of the batches that finished (with `wait`: of all started), in the
        order they were started."""
        outputs: list[Output] = []
        for (batch, known), computed in self._lane.done(wait):
            outputs += self._batch_outputs(batch, known | computed)
        return self._emit(outputs)

    def _emit(self, outputs: list[Output]) -> list[Output]:
        """What leaves with a finished batch's outputs (the incident stage adds its own)."""
        return outputs

    def _batch_outputs(
        self, batch: list[_Closed], results: dict[WindowKey, Classified]
    ) -> list[Output]:
        for closed in batch:
            self.prefetch.done(closed.window)
        outputs: list[Output] = []
        now = self.clock()
        for closed in batch:
            result = results[window_key(closed.window)]
            outputs += self._window_outputs(closed, result, now)
            self.metrics.unknown_metrics.inc(result.unknown_metrics)
        self.metrics.windows_emitted.inc(len(batch))
        return outputs

    def infer_early(self) -> int:
        """Classify up to `max_batch` complete, still open windows; returns how many."""
        windows = self._early.take(self.cfg.max_batch)
        if not windows:
            return 0
        self._early.store(self._infer(windows))
        self.metrics.labelled(self.metrics.early_windows, "classified").inc(len(windows))
        return len(windows)

    def _infer(self, windows: list[Window]) -> dict[WindowKey, Classified]:
        """Prepare and classify windows as one batch (the model inputs are not kept)."""
        if not windows:
            return {}
        t0 = time.perf_counter()
        prepared = self._prepare(windows)
        t1 = time.perf_counter()
        decisions = self._classify([p.raw for p in prepared])
        t2 = time.perf_counter()
        self.metrics.stage_seconds.labels(stage="features").observe(t1 - t0)
        self.metrics.stage_seconds.labels(stage="model").observe(t2 - t1)
        self.metrics.batch_size.observe(len(windows))
        return {
            window_key(w): Classified(w.added, p.rejected, p.unknown_metrics, d)
            for w, p, d in zip(windows, prepared, decisions, strict=True)
        }

    def _classify(self, raws: list[dict[Modality, np.ndarray]]) -> list[Decision]:
        """One model call, or with feature_threads > 1 a large batch split into that many
        concurrent calls (torch runs them without the GIL), so a burst of windows closing
        together uses every core. Each window's decision does not depend on its batch."""
        parts = min(self.cfg.feature_threads, len(raws) // MIN_SPLIT)
        if parts <= 1:
            return self.classify(raws)
        size = -(-len(raws) // parts)  # ceil
        chunks = [raws[i : i + size] for i in range(0, len(raws), size)]
        return [d for got in _pool_map(self.classify, chunks, "model") for d in got]

    def _prepare(self, windows: list[Window]) -> list[WindowInputs]:
        """Model inputs of each window; with feature_threads > 1 on a thread pool (OpenCV
        decodes frames without holding the GIL). The pool lives for one batch only."""
        spec, decode = self.cfg.features, self.prefetch.decode
        return _pool_map(
            lambda w: window_inputs(w, spec, decode), windows, "features", self.cfg.feature_threads
        )

    def _window_outputs(self, closed: _Closed, result: Classified, now: int) -> list[Output]:
        window = closed.window
        outputs = []
        bad = {it.position for it, _ in result.rejected}
        for item, err in result.rejected:
            outputs.append(self._reject(self._records[item.position], err))
        holds = tuple(p for p in window.positions if p not in bad)
        for it in window.items.get(Modality.CAMERA, ()):
            self._records.pop(it.position, None)
        value = event_value(window, result.decision, self.cfg.model, now, excluded=len(bad))
        outputs.append(
            event_output(window, value, self.cfg.events_topic, holds, closed.closed_at_ms)
        )
        return outputs

    # -- progress across restarts and rebalances -----------------------------------------
    def progress(self, partition: int) -> dict[str, int]:
        """Per device of this partition: every window ending at or before it was published.

        The worker stores it with the committed offsets once everything published is
        acknowledged, so whoever re-reads the uncommitted records next skips the ones whose
        windows were already emitted instead of emitting them again, split. A window closed
        but not published yet (queued, or with the model) holds its device's boundary back
        to its start: its records are re-read and the window built again.
        """
        out = self._progress.of(partition)
        pending = [c.window for c in self._queue]
        pending += [c.window for batch, _ in self._lane.payloads() for c in batch]
        for w in pending:
            if w.device_id in out:
                out[w.device_id] = min(out[w.device_id], w.start_ms)
        return out

    def _note_progress(self, device: str) -> None:
        until = self.windower.closed_until(device)
        if until is not None:
            self._progress.note(self._device_partition[device], device, until)

    def resume(self, partition: int, progress: dict[str, int]) -> None:
        """Take over devices of `partition` whose windows up to the given boundaries were
        already emitted (see DeviceProgress.resume)."""
        for device, until in self._progress.resume(partition, progress):
            self.windower.restore(device, until, self.clock())

    # -- bookkeeping --------------------------------------------------------------------
    def take_released(self) -> list[Position]:
        released, self._released = self._released, []
        return released

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> int:
        """Drop the open windows of devices on revoked partitions (re-read by the new owner)."""
        numbers = {p for _, p in partitions}
        devices = [d for d, p in self._device_partition.items() if p in numbers]
        dropped = self.windower.drop_devices(devices)
        for w in dropped:
            for it in w.items.get(Modality.CAMERA, ()):
                self._records.pop(it.position, None)
            self._early.forget(w)
        for d in devices:
            self._device_partition.pop(d, None)
        self._progress.revoke(numbers, devices)
        self.prefetch.forget(dropped, devices)
        return len(dropped)

    def _forget_devices(self, devices: list[str]) -> None:
        """Devices the windower forgot (long silent): their bookkeeping goes too, but not
        all of their progress (DeviceProgress.forget)."""
        for d in devices:
            self._device_partition.pop(d, None)
            self._checks.forget(d)
        self.prefetch.forget([], devices)
        self._progress.forget(devices, self._device_partition.keys())

    def close(self) -> None:
        """Stop the model and frame-decoding threads (the engine is not used afterwards)."""
        self._lane.close()
        self.prefetch.close()

    def _enqueue(self, windows: list[Window], now: int) -> None:
        for w in windows:
            self.prefetch.closed(w)
            self._note_progress(w.device_id)
        self._queue += [_Closed(w, now) for w in windows]


def _pool_map(
    fn: Callable[[T], R], items: list[T], name: str, threads: int | None = None
) -> list[R]:
    """`[fn(x) for x in items]` on a pool of `threads` (default: one per item) that lives for
    this call only; inline when one thread would do."""
    threads = min(threads or len(items), len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads, thread_name_prefix=f"iotfuse-{name}") as pool:
        return list(pool.map(fn, items))
