"""Assemble the pipeline from settings: the engine, and the two drivers that run it.

- `run_offline(records)`: any iterable of records (a recording, a list in a test) in, the
  outputs out, as fast as the machine allows. End of input closes every window.
- `KafkaWorker` (pipeline/kafka/worker.py): the same engine between a consumer and a producer.

With `incidents.enabled` (the default) the engine is an `IncidentEngine`: its events are
followed by the incidents they open, update and close (pipeline/incidents/).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from pipeline.clock import Clock, wall_clock_ms
from pipeline.errors import UserError
from pipeline.incidents.rules import IncidentRules
from pipeline.incidents.stage import IncidentEngine, IncidentStage, StageConfig, StateStore
from pipeline.metrics import Metrics
from pipeline.records import Record, number_unset_offsets
from pipeline.settings import Settings
from pipeline.sinks import build_sinks
from pipeline.stream.align import Aligner
from pipeline.stream.engine import Engine, EngineConfig
from pipeline.stream.ingest import IngestConfig
from pipeline.stream.model_runner import ModelRunner
from pipeline.stream.outputs import Output
from pipeline.stream.windows import WindowConfig


class ConfigMismatchError(UserError):
    pass


def window_config(settings: Settings, model_window_ms: int) -> WindowConfig:
    w = settings.windows
    if w.window_ms and w.window_ms != model_window_ms:
        raise ConfigMismatchError(
            f"windows.window_ms={w.window_ms} but the model was trained on {model_window_ms} ms "
            "windows; leave windows.window_ms at 0 (use the model's) or train a model for it"
        )
    return WindowConfig(
        window_ms=model_window_ms,
        allowed_lateness_ms=w.allowed_lateness_ms,
        idle_timeout_ms=w.idle_timeout_ms,
        forget_after_ms=w.forget_after_ms,
        modality_silence_ms=w.modality_silence_ms,
    )


def build_engine(
    settings: Settings,
    runner: ModelRunner,
    metrics: Metrics | None = None,
    clock: Clock = wall_clock_ms,
    *,
    incident_store: StateStore | None = None,
    sinks: bool = False,
) -> Engine:
    """The engine `settings` describe. `incident_store`: where saved incident states are
    read back after a restart (the Kafka worker's); `sinks`: send incidents on to the MQTT
    and webhook sinks of `[sinks]` (`iotfuse run` only: never a replay)."""
    features = runner.features
    cfg = EngineConfig(
        ingest=IngestConfig.from_settings(settings.topics, settings.limits, features.sample_rate),
        windows=window_config(settings, features.window_ms),
        features=features,
        events_topic=settings.topics.events,
        deadletter_topic=settings.topics.deadletter,
        model=runner.model_id,
        max_batch=settings.runtime.max_batch,
        batch_timeout_ms=settings.runtime.batch_timeout_ms,
        max_open_windows=settings.windows.max_open_windows,
        max_buffered_bytes=settings.windows.max_buffered_bytes,
        feature_threads=feature_threads(settings.runtime.feature_threads),
        early_inference=settings.runtime.early_inference,
        model_thread=model_thread(settings.runtime.model_thread, runner.exported),
        model_timeout_s=settings.runtime.model_timeout_s,
    )
    metrics = metrics or Metrics()
    classify = runner.classifier(settings.runtime.explain_telemetry_top)
    if not settings.incidents.enabled:
        return Engine(cfg, classify, metrics, clock)
    stage_cfg = StageConfig(
        rules=IncidentRules.from_settings(settings.incidents, features.window_ms),
        events_topic=settings.topics.events,
        incidents_topic=settings.topics.incidents,
        state_topic=settings.topics.incident_state,
        model=runner.model_id,
    )
    outlets = build_sinks(settings.sinks, metrics) if sinks else None
    stage = IncidentStage(
        stage_cfg,
        metrics,
        clock,
        sink=outlets.offer if outlets else None,
        store=incident_store,
    )
    on_close = outlets.close if outlets else None
    return IncidentEngine(cfg, classify, metrics, clock, stage, on_close)


def model_thread(setting: str, exported: bool) -> bool:
    """runtime.model_thread: on, off, or auto (on for an exported model)."""
    if setting not in ("auto", "on", "off"):
        raise UserError(f"runtime.model_thread={setting!r}: use auto, on or off")
    return setting == "on" or (setting == "auto" and exported)


def feature_threads(setting: int) -> int:
    """runtime.feature_threads: 0 = one per CPU core this process may use, at most 4."""
    if setting > 0:
        return setting
    return max(1, min(4, len(os.sched_getaffinity(0))))


ALIGN_CHUNK = 64  # records buffered before the aligner is asked what it can release


def run_offline(
    engine: Engine, records: Iterable[Record], on_record: Callable[[int], None] | None = None
) -> Iterator[Output]:
    """Drive the engine over a finite stream in event time; yields outputs as produced.

    Records pass the same aligner as in the Kafka worker (a recording holds the topics in
    the order they were consumed); records of other topics (labels) are skipped. Records
    without offsets (simulated) are numbered first: positions identify records.
    """
    inputs = tuple(engine.cfg.ingest.topics)
    aligner = Aligner(inputs)
    for n, record in enumerate(number_unset_offsets(records), 1):
        if record.topic in inputs:
            aligner.push(record)
            if n % ALIGN_CHUNK == 0:  # releases in the same order as per record, cheaper
                for ready in aligner.pop_ready(lambda _topic, _partition: False):
                    yield from engine.process(ready)
            if engine.queued() >= engine.cfg.max_batch:
                yield from engine.run_batch()
        if on_record is not None:
            on_record(n)
    for ready in aligner.flush():
        yield from engine.process(ready)
    yield from engine.finish()
