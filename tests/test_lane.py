"""The model thread (runtime.model_thread): the engine reads on while a batch is classified,
and what comes out is what comes out without it."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import replace

import pytest

from pipeline.errors import UserError
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine, model_thread
from pipeline.stream.engine import Engine
from pipeline.stream.lane import ModelStalledError
from pipeline.stream.model_runner import ModelRunner, Window
from pipeline.stream.outputs import Decision, Output
from pipeline.testing import FakeClock
from tests.factory import T0, device_stream, number

DEVICES = ("a", "b", "c")


class GatedRunner(ModelRunner):
    """The test model, whose every call waits until the test opens the gate."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner.model, runner.config, runner.version, runner.device)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []

    def classify(self, windows: Sequence[Window], explain_top: int = 0) -> list[Decision]:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().classify(windows, explain_top)


def engine(runner: ModelRunner, thread: str, clock: FakeClock, timeout_s: float = 0) -> Engine:
    s = Settings()
    runtime = replace(
        s.runtime, model_thread=thread, early_inference=False, model_timeout_s=timeout_s
    )
    return build_engine(replace(s, runtime=runtime), runner, clock=clock)


def records_until(start_s: float, end_s: float) -> list[Record]:
    """Every device's records (telemetry, camera, audio) stamped from `start_s` to before
    `end_s` seconds into the stream, in time order. Records up to 2 n + 2.7 s close window
    n: every modality is past its end plus the allowed lateness (docs/contract.md)."""
    recs = [r for d in DEVICES for r in device_stream(d, T0, 8)]
    recs = sorted(number(recs), key=lambda r: r.timestamp_ms)
    return [r for r in recs if start_s * 1000 <= r.timestamp_ms - T0 < end_s * 1000]


def feed(e: Engine, records: list[Record], clock: FakeClock) -> None:
    for r in records:
        clock.now = r.timestamp_ms
        assert e.process(r) == []


def events(outputs: list[Output]) -> list[tuple[str, int, str]]:
    out = []
    for o in outputs:
        v = json.loads(o.value or b"{}")
        if "window" in v:
            out.append((v["device_id"], v["window"]["start_ms"], v["label"]))
    return out


def test_windows_are_read_while_the_model_thread_classifies(runner: ModelRunner) -> None:
    clock = FakeClock()
    gated = GatedRunner(runner)
    e = engine(gated, "on", clock)
    feed(e, records_until(0, 2.7), clock)  # window 0 closes
    assert e.queued() == 3
    e.start_batch()
    assert gated.entered.wait(10)
    assert e.in_flight() == 1 and e.queued() == 0
    assert e.collect() == []  # still classifying: nothing to publish yet
    assert e.progress(0) == {d: T0 for d in DEVICES}  # a commit now names none of them

    feed(e, records_until(2.7, 4.7), clock)  # read on: window 1 closes
    assert e.queued() == 3 and e.collect() == []

    gated.gate.set()
    first = events(e.collect(wait=True))
    assert e.progress(0) == {d: T0 + 2000 for d in DEVICES}  # window 1 waits in the queue
    second = events(e.run_batch())
    assert [(d, s) for d, s, _ in first] == [(d, T0) for d in DEVICES]
    assert [(d, s) for d, s, _ in second] == [(d, T0 + 2000) for d in DEVICES]
    assert set(gated.threads) == {"iotfuse-model"}  # never the caller's thread
    e.close()


def test_the_model_thread_changes_no_event(runner: ModelRunner) -> None:
    got = {}
    for thread in ("off", "on"):
        clock = FakeClock()
        e = engine(runner, thread, clock)
        outputs: list[Output] = []
        for n in range(3):
            feed(e, records_until(2 * n + 0.7 if n else 0, 2 * n + 2.7), clock)
            e.start_batch()
            outputs += e.collect(wait=True)
        got[thread] = events(outputs + e.finish())
        e.close()
    assert got["on"] == got["off"] and len(got["on"]) == 4 * len(DEVICES)


def test_a_batch_the_model_never_returns_stops_the_engine_at_model_timeout(
    runner: ModelRunner,
) -> None:
    """A model call that hangs (a wedged accelerator, a deadlock) would leave the worker
    alive and publishing nothing: past runtime.model_timeout_s collecting raises, and so
    does the shutdown's wait for it; closing does not wait for the stuck thread."""
    clock = FakeClock()
    gated = GatedRunner(runner)
    e = engine(gated, "on", clock, timeout_s=60)
    feed(e, records_until(0, 2.7), clock)
    e.start_batch()
    assert gated.entered.wait(10)
    clock.now += 59_000
    assert e.collect() == []  # slow, not yet stalled
    clock.now += 800  # 0.2 s left: the shutdown's wait gives up after that
    with pytest.raises(ModelStalledError, match=r"runtime.model_timeout_s=60\)"):
        e.collect(wait=True)
    clock.now += 1_000
    with pytest.raises(ModelStalledError, match="with the model for 61 s"):
        e.collect()
    e.close()  # returns: the stuck thread is a daemon, not joined
    gated.gate.set()


class BrokenRunner(ModelRunner):
    def classify(self, windows: Sequence[Window], explain_top: int = 0) -> list[Decision]:
        raise RuntimeError("model broke")


@pytest.mark.parametrize("thread", ["off", "on"])
def test_a_failing_model_call_fails_the_caller_as_without_the_thread(
    runner: ModelRunner, thread: str
) -> None:
    clock = FakeClock()
    broken = BrokenRunner(runner.model, runner.config, runner.version, runner.device)
    e = engine(broken, thread, clock)
    feed(e, records_until(0, 2.7), clock)
    e.start_batch()
    with pytest.raises(RuntimeError, match="model broke"):
        e.collect(wait=True)
    e.close()


def test_model_thread_auto_is_on_for_an_exported_model_only() -> None:
    assert model_thread("auto", exported=True) and not model_thread("auto", exported=False)
    assert model_thread("on", exported=False) and not model_thread("off", exported=True)
    with pytest.raises(UserError, match="use auto, on or off"):
        model_thread("yes", exported=True)
