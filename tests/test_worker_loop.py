"""The worker's record loop without a broker: when a closed window's event goes out, when
back-pressure pauses (on a real engine's load; every branch of the rule: test_backpressure)."""

from __future__ import annotations

from dataclasses import replace

from encoders.modality import Modality
from pipeline.stream.align import Aligner
from pipeline.stream.backpressure import Flow, decide
from pipeline.stream.model_runner import ModelRunner
from pipeline.stream.outputs import Output
from pipeline.stream.worker_loop import backpressure_inputs, process_ready
from tests.factory import T0, TOPICS, device_stream, engine_with_early, number

TEL = (TOPICS.telemetry,)


def all_caught_up(_topic: str, _partition: int) -> bool:
    """Every partition read to its end: the aligner releases what it holds."""
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

    def publish(outputs: list[Output]) -> None:
        order.extend("event" for o in outputs if o.topic == TOPICS.events)

    assert process_ready(aligner, all_caught_up, engine, publish) == 5 + 10
    assert order.index("event") == order.index("a@2500") + 1  # not after b's records
    assert order.count("event") == 1 and len(order) == 5 + 10 + 1
    assert order[-1] == "b@2900"  # b's later records came after it


def test_over_capacity_pauses_while_windows_can_close_then_reads_on_until_under_it(
    runner: ModelRunner,
) -> None:
    engine = engine_with_early(runner, False)
    engine.cfg = replace(engine.cfg, max_open_windows=2)
    for device in ("a", "b", "c"):  # three open windows: over the cap of 2
        engine.process(number(device_stream(device, T0, 1, (Modality.TELEMETRY,)))[0])
    flow, calls, warnings = Flow.READING, list[str](), 0  # calls: the consumer's, in order
    for released in (1, 1, 0, 1, 0, 1):  # records the aligner released each step
        decision = decide(flow, *backpressure_inputs(engine, released))
        if decision.pause != (flow is Flow.PAUSED):
            calls.append("pause" if decision.pause else "resume")
        warnings += decision.over_capacity_started
        flow = decision.flow
    # paused while the aligner released records; read on once it released none (the open
    # windows close only with more input), and not paused again while still over the cap
    assert calls == ["pause", "resume"]
    assert warnings == 1
    engine.cfg = replace(engine.cfg, max_open_windows=10)  # under the limit again
    flow = decide(flow, *backpressure_inputs(engine, 0)).flow
    engine.cfg = replace(engine.cfg, max_open_windows=2)
    decision = decide(flow, *backpressure_inputs(engine, 1))  # a new episode pauses again
    assert decision.pause and decision.pause_started
