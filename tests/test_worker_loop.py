"""The worker's record loop without a broker: when a closed window's event goes out, when
back-pressure pauses."""

from __future__ import annotations

from dataclasses import replace

from kafka import TopicPartition

from encoders.modality import Modality
from pipeline.kafka.worker import KafkaWorker
from pipeline.metrics import Metrics
from pipeline.stream.align import Aligner
from pipeline.stream.model_runner import ModelRunner
from tests.factory import T0, TOPICS, device_stream, engine_with_early, number

TEL = (TOPICS.telemetry,)


class AllCaughtUp:
    """Every partition read to its end: the aligner releases what it holds."""

    def caught_up(self, _topic: str, _partition: int) -> bool:
        return True


def test_a_window_closing_with_its_early_result_is_published_before_the_rest_of_the_poll(
    runner: ModelRunner,
) -> None:
    tel = (Modality.TELEMETRY,)
    recs = number(device_stream("a", T0, 3, tel) + device_stream("b", T0 + 2000, 1, tel))
    a, b = recs[:30], recs[30:]  # telemetry every 100 ms
    engine = engine_with_early(runner, True)
    for r in a[:21]:  # up to 2.0 s: a's window [0, 2 s) is complete
        engine.process(r)
    assert engine.infer_early() == 1
    # one poll: a's records up to 2.5 s (the window closes) and 10 records of device b
    aligner = Aligner(TEL)
    for r in a[21:26] + b:
        aligner.push(r)
    order: list[str] = []
    process = engine.process
    engine.process = lambda r: order.append(f"{r.key.decode()}@{r.timestamp_ms - T0}") or process(r)
    worker = KafkaWorker.__new__(KafkaWorker)  # no broker: only the loop runs
    worker.aligner, worker.engine, worker.metrics = aligner, engine, Metrics()
    worker.log_end = AllCaughtUp()
    worker._publish = lambda outputs: order.extend(
        "event" for o in outputs if o.topic == TOPICS.events
    )
    worker._process_ready()
    assert order.index("event") == order.index("a@2500") + 1  # not after b's records
    assert order.count("event") == 1 and len(order) == 5 + 10 + 1
    assert order[-1] == "b@2900"  # b's later records came after it


class PauseLog:
    """The consumer's pause and resume calls, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self, *partitions: object) -> None:
        self.calls.append("pause")

    def resume(self, *partitions: object) -> None:
        self.calls.append("resume")


def test_over_capacity_pauses_while_windows_can_close_then_reads_on_until_under_it(
    runner: ModelRunner,
) -> None:
    engine = engine_with_early(runner, False)
    engine.cfg = replace(engine.cfg, max_open_windows=2)
    for device in ("a", "b", "c"):  # three open windows: over the cap of 2
        engine.process(number(device_stream(device, T0, 1, (Modality.TELEMETRY,)))[0])
    worker = KafkaWorker.__new__(KafkaWorker)  # no broker: only the decision runs
    worker.engine, worker.metrics, worker.consumer = engine, Metrics(), PauseLog()
    worker._owned, worker._held_back = {TopicPartition(TOPICS.telemetry, 0)}, set()
    worker._paused = worker._over_capacity = False
    for progressed in (True, True, False, True, False, True):
        worker._backpressure(progressed)
    # paused while the aligner released records; read on once it released none (the open
    # windows close only with more input), and not paused again while still over the cap
    assert worker.consumer.calls == ["pause", "resume"]
    assert worker.metrics.value("iotfuse_over_capacity_total") == 1
    engine.cfg = replace(engine.cfg, max_open_windows=10)  # under the limit again
    worker._backpressure(False)
    engine.cfg = replace(engine.cfg, max_open_windows=2)
    worker._backpressure(True)  # a new episode pauses again
    assert worker.consumer.calls == ["pause", "resume", "pause"]
