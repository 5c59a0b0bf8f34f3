"""Frames decoded while their window is open: the same outputs, the work done earlier."""

from __future__ import annotations

from dataclasses import replace

from encoders.modality import Modality
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.engine import Engine
from pipeline.stream.model_runner import ModelRunner
from tests.contract import Published
from tests.factory import T0, TOPICS, device_stream, jpeg_header_only, number, record


def engine_with(runner: ModelRunner, threads: int) -> Engine:
    s = Settings()
    engine = build_engine(
        replace(s, runtime=replace(s.runtime, feature_threads=threads)), runner, clock=lambda: 1_000
    )
    engine.prefetch.threads = threads  # 0: no prefetch (build_engine reads 0 as "auto")
    return engine


def stream_with_a_bad_frame() -> list:
    """Three devices x 8 s (5 fps: 10 frames a window); a corrupt frame in window 3 of
    dev-1 at an index the prefetcher predicts (the first frame of a window): its error
    comes out of the prefetch and another frame is decoded in its place."""
    records = [r for d in range(3) for r in device_stream(f"dev-{d}", T0, 8)]
    bad_ts = T0 + 4000
    records = [
        r
        for r in records
        if not (r.topic == TOPICS.camera and r.key == b"dev-1" and r.timestamp_ms == bad_ts)
    ]
    records.append(record(TOPICS.camera, "dev-1", bad_ts, jpeg_header_only(160, 120)))
    return number(sorted(records, key=lambda r: r.timestamp_ms))


def outputs(engine: Engine, records: list, idle: bool = True) -> list[Published]:
    """The engine's outputs over `records` (in event-time order), its reader idle after
    handing over each record (a live fleet's worker between ticks) or never (a backlog)."""
    got = []
    for r in records:
        got += engine.process(r)
        if idle:
            engine.idle()
        if engine.queued() >= engine.cfg.max_batch:
            got += engine.run_batch()
    got += engine.finish()
    return [Published(o.topic, o.key, o.value, o.headers, o.timestamp_ms) for o in got]


def test_prefetched_frames_give_the_outputs_of_decoding_at_close(runner: ModelRunner) -> None:
    records = stream_with_a_bad_frame()
    at_close = engine_with(runner, 0)
    expected = outputs(at_close, records)
    ahead = engine_with(runner, 2)
    assert outputs(ahead, records) == expected
    [letter] = [dict(p.headers) for p in expected if p.topic == TOPICS.deadletter]
    assert letter["iotfuse.error.stage"] == b"decode"  # the corrupt frame, found at decode
    # three devices x four windows x k picked frames, and one more for the corrupt one;
    # the first window of each device has no frame count to predict from
    k = runner.features.num_frames
    assert (at_close.prefetch.ahead, at_close.prefetch.at_close) == (0, 3 * 4 * k + 1)
    assert (ahead.prefetch.ahead, ahead.prefetch.at_close) == (3 * 3 * k, 3 * k + 1)
    assert ahead.prefetch.pending == 0


def test_revoked_windows_leave_no_decoded_frames_behind(runner: ModelRunner) -> None:
    engine = engine_with(runner, 2)
    records = number(device_stream("dev-0", T0, 3, (Modality.CAMERA,)))
    for r in records:
        engine.process(r)  # window 1 closed (its count is known), window 2 still open
    engine.run_batch()  # window 1 classified: what is pending is window 2's
    assert engine.prefetch.pending > 0
    engine.revoke([(TOPICS.camera, records[0].partition)])
    assert engine.prefetch.pending == 0
    engine.close()


def test_frames_are_decoded_ahead_only_while_the_reader_idles(runner: ModelRunner) -> None:
    """Decoding on arrival took both cores in the moment a fleet's windows closed: the
    frames wait for the reader to have nothing to hand over, and a reader that never has
    that moment decodes at close, with the same outputs."""
    records = stream_with_a_bad_frame()
    expected = outputs(engine_with(runner, 0), records)
    busy = engine_with(runner, 2)
    assert outputs(busy, records, idle=False) == expected
    k = runner.features.num_frames
    assert (busy.prefetch.ahead, busy.prefetch.at_close) == (0, 3 * 4 * k + 1)
    assert busy.prefetch.pending == 0
