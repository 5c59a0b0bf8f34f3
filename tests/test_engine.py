"""The stream engine on the in-memory source: the contract suite, plus engine specifics."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from encoders.modality import Modality
from pipeline.metrics import Metrics
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.engine import Engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.testing import FakeClock
from tests.contract import Published, check_contract, scenario
from tests.factory import (
    CLASSES,
    T0,
    TOPICS,
    device_stream,
    engine_with_early,
    make_model,
    number,
    record,
    strict_json,
    telemetry,
)


def published(outputs: list) -> list[Published]:
    return [Published(o.topic, o.key, o.value, o.headers, o.timestamp_ms) for o in outputs]


def test_contract_on_the_in_memory_source(runner: ModelRunner) -> None:
    records, bad = scenario()
    engine = build_engine(Settings(), runner)
    outputs = list(run_offline(engine, records))
    check_contract(records, bad, published(outputs), CLASSES, runner.version)


def test_every_output_holds_exactly_the_positions_it_derives_from(runner: ModelRunner) -> None:
    records, bad = scenario()
    engine = build_engine(Settings(), runner)
    outputs = list(run_offline(engine, records))
    held = [p for o in outputs for p in o.holds] + engine.take_released()
    assert sorted((p.topic, p.partition, p.offset) for p in held) == sorted(
        (r.topic, r.partition, r.offset) for r in records
    )


def test_windows_closing_together_are_classified_in_one_batch(runner: ModelRunner) -> None:
    metrics = Metrics()
    engine = build_engine(Settings(), runner, metrics)
    recs = []
    for d in range(12):
        recs += device_stream(f"dev-{d}", T0, 2, (Modality.TELEMETRY,))
    recs.sort(key=lambda r: r.timestamp_ms)
    outputs = list(run_offline(engine, number(recs)))
    assert len(outputs) == 12
    assert metrics.value("iotfuse_batch_windows_count") == 1
    assert metrics.value("iotfuse_batch_windows_sum") == 12


def test_silence_is_timed_to_what_the_reader_has_read_through(runner: ModelRunner) -> None:
    """The reader knows its input only up to `read_through` (a broker away): a device is
    not silent for longer than that, however far the wall clock runs."""
    clock = FakeClock()
    engine: Engine = build_engine(Settings(), runner, clock=clock)
    for r in number(device_stream("quiet", T0, 1, (Modality.TELEMETRY,))):
        engine.process(r)
    read_through = clock.now
    clock.now += 60_000
    engine.tick(read_through)
    assert engine.queued() == 0  # nothing known of the last minute
    engine.tick(read_through + 5_000)  # read through the idle timeout: silent
    assert engine.queued() == 1


def test_idle_timeout_and_batch_delay_follow_the_injected_clock(runner: ModelRunner) -> None:
    clock = FakeClock()
    engine: Engine = build_engine(Settings(), runner, clock=clock)
    for r in number(device_stream("quiet", T0, 1, (Modality.TELEMETRY,))):
        assert engine.process(r) == []
    engine.tick()
    assert engine.queued() == 0
    clock.now += 5_000  # idle_timeout_ms default
    engine.tick()
    assert engine.queued() == 1
    assert not engine.batch_due()  # closed just now; waits batch_timeout_ms for company
    clock.now += 20
    assert engine.batch_due()
    [event] = engine.run_batch()
    assert json.loads(event.value)["window"] == {"start_ms": T0, "end_ms": T0 + 2000}


def test_late_records_are_counted_released_and_not_published(runner: ModelRunner) -> None:
    metrics = Metrics()
    engine = build_engine(Settings(), runner, metrics)
    recs = number(device_stream("d", T0, 4, (Modality.TELEMETRY,)))
    late = number(device_stream("d", T0, 1, (Modality.TELEMETRY,)))[:3]
    late = [
        type(r)(r.topic, r.partition, 1000 + i, r.timestamp_ms, r.key, r.value, r.headers)
        for i, r in enumerate(late)
    ]
    outputs = list(run_offline(engine, recs + late))
    assert len([o for o in outputs if o.topic == TOPICS.events]) == 2
    assert metrics.value("iotfuse_late_records_total", {"modality": "telemetry"}) == 3
    assert sorted(p.offset for p in engine.take_released()) == [1000, 1001, 1002]


def test_a_model_without_a_modality_ignores_it_but_still_counts_it(tmp_path: Path) -> None:
    runner = ModelRunner.load(make_model(tmp_path, (Modality.TELEMETRY,)), "cpu")
    engine = build_engine(Settings(), runner)
    outputs = list(run_offline(engine, number(device_stream("d", T0, 2))))
    [event] = [json.loads(o.value) for o in outputs]
    assert event["modalities"]["camera"]["records"] == 10
    assert event["attribution"]["camera"] == 0.0
    # one modality present: its Shapley value is p(full) - p(no modality) for the label
    import torch

    k = CLASSES.index(event["label"])
    empty = torch.zeros(1, 1, runner.config.fusion.dim)  # [B=1, M=1, D]
    with torch.inference_mode():
        p_empty = runner.model.fuse(empty, torch.zeros(1, 1, dtype=torch.bool)).softmax(-1)
    expected = event["confidence"] - float(p_empty[0, k])
    assert event["attribution"]["telemetry"] == pytest.approx(expected, abs=1e-4)


def test_metrics_endpoint_serves_the_pipeline_counters(runner: ModelRunner) -> None:
    import urllib.request

    metrics = Metrics()
    port = metrics.serve(0, "127.0.0.1")
    records, bad = scenario()
    list(run_offline(build_engine(Settings(), runner, metrics), records))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    telemetry_in = sum(1 for r in records if r.topic == TOPICS.telemetry) - sum(
        1 for r, _ in bad if r.topic == TOPICS.telemetry
    )
    assert f'iotfuse_records_in_total{{modality="telemetry"}} {float(telemetry_in)}' in body
    assert 'iotfuse_dead_letters_total{reason="telemetry_non_finite"} 2.0' in body
    assert "iotfuse_stage_seconds_bucket" in body and "iotfuse_windows_emitted_total" in body


def test_open_windows_and_buffered_bytes_are_capped_for_back_pressure(runner: ModelRunner) -> None:
    s = Settings()
    engine = build_engine(replace(s, windows=replace(s.windows, max_open_windows=3)), runner)
    for d in range(3):
        assert not engine.over_capacity()
        for r in number(device_stream(f"d{d}", T0, 1, (Modality.TELEMETRY,))):
            engine.process(r)
    assert engine.over_capacity()  # the worker pauses the consumer here
    engine.tick()
    engine.finish()
    assert not engine.over_capacity()
    s2 = replace(s, windows=replace(s.windows, max_buffered_bytes=2000))
    engine = build_engine(s2, runner)
    for r in number(device_stream("big", T0, 1, (Modality.AUDIO,))):
        engine.process(r)  # two 0.5 s chunks resampled: 2 x 32 KB of float32
    assert engine.over_capacity()


def test_frames_decoded_on_threads_give_the_same_outputs(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import pipeline.stream.engine

    records, _ = scenario()
    threads_seen: set[str] = set()
    original = pipeline.stream.engine.window_inputs

    def recording_thread(*args, **kwargs):
        threads_seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline.stream.engine, "window_inputs", recording_thread)

    def outputs(threads: int) -> list[Published]:
        s = Settings()
        s = replace(s, runtime=replace(s.runtime, feature_threads=threads))
        return published(list(run_offline(build_engine(s, runner, clock=FakeClock()), records)))

    one = outputs(1)
    assert threads_seen == {threading.current_thread().name}
    threads_seen.clear()
    assert outputs(3) == one
    assert len(threads_seen) > 1 and all(n.startswith("iotfuse-features") for n in threads_seen)


def test_a_large_batch_split_over_threads_gives_the_same_decisions(runner: ModelRunner) -> None:
    recs = []
    for d in range(24):
        recs += device_stream(f"dev-{d}", T0, 2)
    recs = number(sorted(recs, key=lambda r: r.timestamp_ms))

    def events(threads: int) -> dict[str, dict]:
        s = Settings()
        s = replace(s, runtime=replace(s.runtime, feature_threads=threads))
        engine = build_engine(s, runner, clock=FakeClock())
        calls: list[int] = []
        classify = engine.classify
        engine.classify = lambda raws: calls.append(len(raws)) or classify(raws)
        got = [json.loads(o.value) for o in run_offline(engine, recs) if o.topic == TOPICS.events]
        assert sum(calls) == 24 and (len(calls) > 1) == (threads > 1)  # split, or one call
        return {e["device_id"]: e for e in got}

    one, three = events(1), events(3)
    assert one.keys() == three.keys() and len(one) == 24
    for device, e in one.items():
        assert e["label"] == three[device]["label"]
        assert abs(e["confidence"] - three[device]["confidence"]) < 1e-5


def live(
    runner: ModelRunner,
    records: list,
    early: bool,
    metrics: Metrics | None = None,
    polls: list[int] | None = None,
) -> tuple[list[dict], list[int]]:
    """Drive the engine as the Kafka worker does, one record per poll (or `polls[i]`
    records in poll i); returns the events (without processed_at_ms) and the sizes of the
    model calls."""
    engine = engine_with_early(runner, early, metrics)
    calls: list[int] = []
    classify = engine.classify
    engine.classify = lambda raws: calls.append(len(raws)) or classify(raws)
    outputs, rest = [], list(records)
    for size in (polls or []) + [1] * len(records):
        polled, rest = rest[:size], rest[size:]
        for r in polled:
            outputs += engine.process(r)
        if engine.queued():
            outputs += engine.run_batch()
        else:
            engine.infer_early()
    outputs += engine.finish()
    events = [json.loads(o.value) for o in outputs if o.topic == TOPICS.events]
    for e in events:
        e.pop("processed_at_ms")
    return events, calls


def test_a_window_classified_before_it_closes_publishes_that_result_at_close(
    runner: ModelRunner,
) -> None:
    recs = number(
        sorted(device_stream("a", T0, 3) + device_stream("b", T0, 3), key=lambda r: r.timestamp_ms)
    )
    metrics = Metrics()
    early, calls = live(runner, recs, True, metrics)
    late, late_calls = live(runner, recs, False)
    assert early == late and len(early) == 4  # same events: [0, 2 s) and [2 s, 4 s) per device
    # the first windows were classified as each device passed 2 s, and not again when they
    # closed at 2.5 s; the last ones never completed (classified at the end)
    assert calls == [1, 1, 2] and late_calls == [1, 1, 2]
    assert metrics.value("iotfuse_early_windows_total", {"result": "used"}) == 2
    assert metrics.value("iotfuse_early_windows_total", {"result": "redone"}) == 0


def test_a_record_joining_after_early_inference_gets_the_window_classified_again(
    runner: ModelRunner,
) -> None:
    tel = (Modality.TELEMETRY,)
    recs = device_stream("a", T0, 2, tel) + device_stream("a", T0 + 2000, 1, tel)[:1]
    joining = device_stream("a", T0 + 1000, 1, tel)[-1:]  # at 1.9 s, within lateness
    recs = number(recs + joining + device_stream("a", T0 + 2100, 1, tel)[4:5])  # 2.5 s: closes
    expected = live(runner, recs, False)[0]
    assert expected[0]["modalities"]["telemetry"]["records"] == 21  # the joining one counted
    # spare time after the joining record: classified again early, that result published
    metrics = Metrics()
    events, calls = live(runner, recs, True, metrics)
    assert events == expected and calls == [1, 1, 1]  # early, early again, the last window
    assert metrics.value("iotfuse_early_windows_total", {"result": "used"}) == 1
    # the joining and the closing record in one poll: classified again at close
    metrics = Metrics()
    events, calls = live(runner, recs, True, metrics, polls=[1] * 21 + [2])
    assert events == expected and calls == [1, 1, 1]  # early, at close, the last window
    assert metrics.value("iotfuse_early_windows_total", {"result": "redone"}) == 1


def test_a_closed_window_classified_early_does_not_wait_for_company(runner: ModelRunner) -> None:
    recs = number(device_stream("a", T0, 3, (Modality.TELEMETRY,)))  # every 100 ms
    for early in (True, False):
        engine = engine_with_early(runner, early)
        for r in recs[:21]:  # up to 2.0 s: [0, 2 s) is complete
            engine.process(r)
        assert engine.infer_early() == (1 if early else 0)
        for r in recs[21:26]:  # up to 2.5 s: it closes
            engine.process(r)
        assert engine.queued() == 1
        assert engine.batch_due() == early  # without: waits batch_timeout_ms for others


def test_a_record_stamped_far_ahead_is_counted_and_reported_once_per_device(
    runner: ModelRunner, caplog: pytest.LogCaptureFixture
) -> None:
    """A device clock an hour ahead (or a producer stamping microseconds) makes the device's
    later records late until real time catches up: the contract keeps it so, and the
    operator is told which device, once."""
    clock, metrics = FakeClock(), Metrics()
    clock.now = T0
    engine = build_engine(Settings(), runner, metrics, clock=clock)
    tel = (Modality.TELEMETRY,)
    ahead = number(device_stream("skewed", T0 + 3_600_000, 1, tel))[:2]
    on_time = [replace(r, offset=100) for r in number(device_stream("skewed", T0, 1, tel))[:1]]
    slightly = number(device_stream("fine", T0 + 30_000, 1, tel))[:1]  # within a minute
    with caplog.at_level(logging.WARNING, logger="pipeline.stream.device_checks"):
        for r in ahead + on_time + slightly:
            engine.process(r)
    assert metrics.value("iotfuse_future_records_total") == 2
    assert metrics.value("iotfuse_late_records_total", {"modality": "telemetry"}) == 1
    [warning] = [r.getMessage() for r in caplog.records if "ahead of" in r.getMessage()]
    assert "device skewed" in warning and "3600 s ahead" in warning


@pytest.mark.parametrize("reading", [1e300, -1e39, 3e38])
def test_readings_beyond_float32_give_a_valid_event_not_a_crash(
    shipped: ModelRunner, reading: float
) -> None:
    """Telemetry takes any finite JSON number. 1e300 is infinite in float32: the model's
    input check raised and the worker stopped at every restart. 3e38 fits, but normalised
    by the shipped model's statistics it overflowed: scores NaN, an event not valid JSON."""
    records = number(
        [
            record(
                TOPICS.telemetry,
                "dev-1",
                T0 + 100 * i,
                telemetry(temperature_c=reading if i == 3 else 21.0, vibration_rms=0.2),
            )
            for i in range(20)
        ]
    )
    outputs = list(run_offline(build_engine(Settings(), shipped), records))
    [event] = [strict_json(o.value) for o in outputs if o.topic == TOPICS.events]
    assert event["modalities"]["telemetry"]["records"] == 20
    assert sum(event["scores"].values()) == pytest.approx(1.0, abs=1e-3)
