"""The Kafka worker's record loop without a broker: what a step does between poll and commit.

- `process_ready`: hand the records the aligner releases to the engine and publish what
  comes out, a window closing with its early result at once;
- `classify_due`: publish finished batches, start the ones due, classify early in spare time;
- `backpressure_inputs` and `backpressure_step`: back-pressure's decision on a step's load
  (the rule: pipeline/stream/backpressure.py), counted and logged when a pause, or reading
  on over capacity, starts. The worker applies it to its partitions (pipeline/kafka/worker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.stream.align import Aligner, CaughtUp
from pipeline.stream.backpressure import Decision, Flow, Limits, Load, decide
from pipeline.stream.engine import Engine
from pipeline.stream.outputs import Output

log = logging.getLogger(__name__)


def process_ready(
    aligner: Aligner,
    caught_up: CaughtUp,
    engine: Engine,
    publish: Callable[[list[Output]], None],
) -> int:
    """Hand the records the aligner releases to the engine, in event-time order, and
    `publish` what comes out; returns how many. A window that closes with its early result
    is published at once, not after the rest of the poll's records (the figures:
    docs/performance.md)."""
    ready = aligner.pop_ready(caught_up)
    engine.metrics.aligning_bytes.set(aligner.buffered_bytes)
    for record in ready:
        publish(engine.process(record))
        if engine.queue_classified_early():
            engine.start_batch()  # nothing to compute: done at once, after any in flight
            publish(engine.collect())
    return len(ready)


def classify_due(engine: Engine, publish: Callable[[list[Output]], None]) -> None:
    """Publish the batches the model finished, and start those due: with the model thread
    (runtime.model_thread) one batch runs while the worker reads on, and the windows that
    close meanwhile wait for the next; without it every due batch runs now. Complete open
    windows are classified early only when nothing else waits for the model."""
    publish(engine.collect())
    while engine.batch_due() and not engine.in_flight():
        engine.start_batch()
        publish(engine.collect())
    if not engine.queued() and not engine.in_flight():
        engine.infer_early()


def backpressure_inputs(engine: Engine, released: int) -> tuple[Load, Limits]:
    """What back-pressure decides on after a step: the engine's load (`released`: records
    the aligner released this step) and its limits."""
    windower, cfg = engine.windower, engine.cfg
    load = Load(
        open_windows=windower.open_windows,
        buffered_bytes=windower.buffered_bytes,
        queued_windows=engine.queued(),
        released_records=released,
    )
    return load, Limits(cfg.max_open_windows, cfg.max_buffered_bytes)


def backpressure_step(previous: Flow, engine: Engine, released: int) -> Decision:
    """Back-pressure's decision on this step's load, given the flow the last step decided:
    a pause, or reading on over capacity, is counted and logged when it starts; the paused
    gauge follows the decision."""
    load, limits = backpressure_inputs(engine, released)
    decision = decide(previous, load, limits)
    metrics = engine.metrics
    if decision.over_capacity_started:
        metrics.over_capacity.inc()
        log.warning(
            "over capacity: %d open windows, %d buffered bytes (windows.max_open_windows "
            "%d, windows.max_buffered_bytes %d), and they close only with more input; "
            "reading on. Raise the limits if memory allows, or spread the devices over "
            "more workers (more partitions)",
            load.open_windows,
            load.buffered_bytes,
            limits.max_open_windows,
            limits.max_buffered_bytes,
        )
    if decision.pause_started:
        metrics.pauses.inc()
        log.info(
            "back-pressure: %d open windows, %d buffered bytes; pausing consumption",
            load.open_windows,
            load.buffered_bytes,
        )
    metrics.paused.set(1 if decision.pause else 0)
    return decision
