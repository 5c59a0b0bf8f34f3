"""Window progress in the committed offsets' metadata: what fits, which devices, how fast."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.model_runner import ModelRunner
from pipeline.stream.window_progress import (
    MAX_METADATA_BYTES,
    MAX_PROGRESS_DEVICES,
    DeviceProgress,
    ProgressMetadata,
    decode_progress,
    encode_progress,
)
from tests.factory import T0, TOPICS, number, record, telemetry


def test_a_few_devices_round_trip_exactly() -> None:
    progress = {"dev-1": T0 + 2000, "dev-2": T0 + 4000, "ünïcode/dev": T0}
    text, kept = encode_progress(progress)
    assert kept == 3
    assert decode_progress(text) == progress


def test_a_large_fleet_keeps_the_newest_boundaries_within_the_limit() -> None:
    """100,000 devices: far more than fit; the newest are kept, the oldest left out."""
    progress = {f"dev-{i:07d}": T0 + 2000 * (i % 500) for i in range(100_000)}
    text, kept = encode_progress(progress)
    decoded = decode_progress(text)
    assert len(text) <= MAX_METADATA_BYTES
    assert len(decoded) == kept and 500 < kept < MAX_PROGRESS_DEVICES
    left_out = progress.keys() - decoded.keys()
    assert min(decoded.values()) >= max(progress[d] for d in left_out)
    assert all(progress[d] == until for d, until in decoded.items())


def test_devices_left_out_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    metadata = ProgressMetadata()
    fleet = {f"dev-{i:05d}": T0 for i in range(20_000)}
    with caplog.at_level(logging.WARNING, logger="pipeline.stream.window_progress"):
        for partition in (0, 1, 0):
            decode_progress(metadata(partition, fleet))
        metadata(2, {"dev-1": T0})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "20000 devices of partition 0" in warnings[0]


def test_progress_names_the_partitions_devices_and_forgets_revoked_ones(
    runner: ModelRunner,
) -> None:
    engine = build_engine(Settings(), runner)
    records = number(
        [
            record(
                TOPICS.telemetry, f"dev-{d}", T0 + ts, telemetry(temperature_c=20), partition=d % 2
            )
            for ts in (0, 500, 2600)
            for d in range(4)
        ]
    )
    for r in records:
        engine.process(r)
    while engine.queued():
        engine.run_batch()
    # each device's window [T0, T0+2000) closed when its record at T0+2600 passed lateness
    assert engine.progress(0) == {"dev-0": T0 + 2000, "dev-2": T0 + 2000}
    assert engine.progress(1) == {"dev-1": T0 + 2000, "dev-3": T0 + 2000}
    engine.revoke([(TOPICS.telemetry, 1)])
    assert engine.progress(1) == {}
    assert engine.progress(0) == {"dev-0": T0 + 2000, "dev-2": T0 + 2000}


def test_forgotten_devices_keep_their_progress_for_commits(runner: ModelRunner) -> None:
    now = [T0]
    engine = build_engine(Settings(), runner, clock=lambda: now[0])

    def tick(at: int) -> None:
        now[0] = at
        engine.tick()
        while engine.queued():
            engine.run_batch()

    for d in range(3):
        engine.process(number([record(TOPICS.telemetry, f"dev-{d}", T0, telemetry(t=1))])[0])
    engine.resume(0, {"dev-9": T0 + 2000})  # from committed progress, never heard from
    tick(T0 + 10_000)  # idle: the windows close
    assert engine.progress(0) == {f"dev-{d}": T0 + 2000 for d in (0, 1, 2, 9)}
    now[0] = T0 + Settings().windows.forget_after_ms
    engine.process(number([record(TOPICS.telemetry, "dev-1", T0 + 4000, telemetry(t=1))])[0])
    tick(now[0] + 20_000)
    assert sorted(engine.windower.devices()) == ["dev-1"]  # the others are forgotten
    assert engine.progress(0) == {
        "dev-0": T0 + 2000,
        "dev-1": T0 + 6000,
        "dev-2": T0 + 2000,
        "dev-9": T0 + 2000,
    }


def test_a_forgotten_device_is_not_split_when_its_records_are_read_again(
    runner: ModelRunner,
) -> None:
    """A device stamping records 2 h ahead keeps its window open, so the partition's commit
    cannot pass its first record. Device D, behind it in the log, is emitted, then silent
    until it is forgotten. A new owner re-reads from the held record with the committed
    progress: D's records must be skipped, not emitted again as a window missing its first
    record (what happened when forgetting D also dropped its progress)."""
    settings = Settings()
    settings = replace(settings, windows=replace(settings.windows, forget_after_ms=60_000))
    now = [T0]
    engine = build_engine(settings, runner, clock=lambda: now[0])
    log = [
        record(TOPICS.telemetry, "D", T0 + 100, telemetry(t=1)),
        record(TOPICS.telemetry, "E", T0 + 7_200_000, telemetry(t=1)),
    ]
    log += [record(TOPICS.telemetry, "D", T0 + ms, telemetry(t=1)) for ms in range(300, 3100, 200)]
    log = number(log)
    outputs = [o for r in log for o in engine.process(r)]
    for second in range(1, 100):  # E goes on (late records), D is silent
        now[0] = T0 + 3100 + second * 1000
        late = number(log + [record(TOPICS.telemetry, "E", now[0], telemetry(t=1))])[-1]
        log.append(late)
        outputs += engine.process(late)
        engine.tick()
        while engine.queued():
            outputs += engine.run_batch()
    assert "D" not in engine.windower.devices()  # forgotten
    assert [o.key for o in outputs if o.topic == TOPICS.events] == [b"D", b"D"]  # 2 windows
    again = build_engine(settings, runner, clock=lambda: now[0])
    again.resume(0, engine.progress(0))
    reread = [o for r in log[1:] for o in again.process(r)] + again.finish()
    assert [o.key for o in reread if o.topic == TOPICS.events] == [b"E"]


def test_resume_moves_boundaries_forward_only_and_skips_the_windows_before_them() -> None:
    progress = DeviceProgress()
    assert progress.resume(0, {"a": T0 + 4000, "b": T0 + 2000}) == [
        ("a", T0 + 4000),
        ("b", T0 + 2000),
    ]
    assert progress.resume(0, {"a": T0 + 2000, "b": T0 + 6000}) == [("b", T0 + 6000)]
    assert progress.of(0) == {"a": T0 + 4000, "b": T0 + 6000}
    assert progress.already_emitted("a", T0 + 2000)  # window [T0+2000, T0+4000)
    assert not progress.already_emitted("a", T0 + 4000)
    assert not progress.already_emitted("c", T0)  # never resumed
    progress.revoke([0], ["a"])
    assert progress.of(0) == {} and not progress.already_emitted("a", T0)
    assert progress.already_emitted("b", T0)  # still resumed: revoked with its partition only


def test_forgetting_trims_progress_to_the_newest_devices_and_the_active_ones() -> None:
    progress = DeviceProgress()
    n = 2 * (MAX_PROGRESS_DEVICES + 1)  # the threshold with one active device
    for i in range(n):
        progress.note(0, f"d{i}", T0 + 2000 * i)
    progress.note(1, "x", T0)
    progress.forget(["d0"], active={"d1"})
    assert len(progress.of(0)) == n  # at most twice the kept number: not trimmed yet
    progress.note(0, "d-extra", T0)
    progress.forget(["d0"], active={"d1"})
    kept = progress.of(0)
    newest = {f"d{i}" for i in range(n - MAX_PROGRESS_DEVICES, n)}
    assert set(kept) == newest | {"d1"}
    assert progress.of(1) == {"x": T0}


def test_re_read_records_of_emitted_windows_are_counted_as_skipped_not_late(
    runner: ModelRunner,
) -> None:
    engine = build_engine(Settings(), runner)
    engine.resume(0, {"dev-0": T0 + 2000})
    records = number(
        [record(TOPICS.telemetry, "dev-0", T0 + ms, telemetry(t=1)) for ms in (100, 1900, 2100)]
    )
    assert [o for r in records for o in engine.process(r)] == []
    assert engine.metrics.value("iotfuse_reread_skipped_total") == 2
    assert engine.metrics.value("iotfuse_late_records_total", {"modality": "telemetry"}) == 0
    assert sorted(p.offset for p in engine.take_released()) == [0, 1]


def test_a_window_not_yet_published_is_not_named_in_the_progress(runner: ModelRunner) -> None:
    """A commit need not wait for the model: the progress it stores stops at the start of
    every window still queued (or being classified: tests/test_lane.py), so a restart
    rebuilds those windows instead of skipping their records as already emitted."""
    settings = Settings()
    engine = build_engine(settings, runner)
    for ts in (0, 500, 2600, 4600):
        for r in number([record(TOPICS.telemetry, "dev-0", T0 + ts, telemetry(t=1))]):
            engine.process(replace(r, offset=ts))
    assert engine.queued() == 2  # [T0, T0 + 2000) and [T0 + 2000, T0 + 4000) closed
    assert engine.progress(0) == {"dev-0": T0}
    events = engine.run_batch()
    assert len([o for o in events if o.topic == settings.topics.events]) == 2
    assert engine.progress(0) == {"dev-0": T0 + 4000}
