"""Window semantics of the contract: alignment, watermark, lateness, idle timeout."""

from __future__ import annotations

import itertools

import pytest

from encoders.modality import Modality
from pipeline.stream.windows import Item, Position, Window, WindowConfig, Windower

CAM, AUD, TEL = Modality.CAMERA, Modality.AUDIO, Modality.TELEMETRY
T0 = 1_767_225_600_000  # a multiple of 2000


class Feed:
    """Adds items with increasing offsets and a controllable wall clock."""

    def __init__(self, cfg: WindowConfig | None = None) -> None:
        self.w = Windower(
            cfg or WindowConfig(window_ms=2000, allowed_lateness_ms=500, idle_timeout_ms=5000)
        )
        self.offset = 0
        self.now = 0
        self.closed: list[Window] = []
        self.completed: list[Window] = []
        self.late: list[int] = []

    def add(self, ts: int, device: str = "d1", modality: Modality = TEL, nbytes: int = 10) -> None:
        self.offset += 1
        item = Item(modality, ts, None, Position(str(modality), 0, self.offset), nbytes)
        result = self.w.add(device, item, self.now)
        if result.late:
            self.late.append(ts)
        self.closed += result.closed
        self.completed += result.completed


def spans(windows: list[Window]) -> list[tuple[str, int, int]]:
    return [(w.device_id, w.start_ms - T0, w.end_ms - T0) for w in windows]


def test_windows_align_to_epoch_multiples() -> None:
    f = Feed()
    f.add(T0 + 1999)
    f.add(T0 + 2000)
    f.add(T0 + 10_000)  # watermark 9500 closes [0,2000) and [2000,4000)
    assert spans(f.closed) == [("d1", 0, 2000), ("d1", 2000, 4000)]
    assert [it.ts_ms - T0 for it in f.closed[0].items[TEL]] == [1999]


def test_window_closes_only_when_watermark_reaches_its_end() -> None:
    f = Feed()
    f.add(T0 + 100)
    f.add(T0 + 2499)  # watermark 1999 < 2000: still open
    assert f.closed == []
    f.add(T0 + 2500)  # watermark 2000 == end: closes
    assert spans(f.closed) == [("d1", 0, 2000)]


def test_records_within_allowed_lateness_join_their_window() -> None:
    f = Feed()
    f.add(T0 + 100)
    f.add(T0 + 2400)  # watermark 1900
    f.add(T0 + 1950)  # out of order but not late
    f.add(T0 + 2600)
    assert spans(f.closed) == [("d1", 0, 2000)]
    assert f.closed[0].count(TEL) == 2
    assert f.late == []


def test_late_record_is_reported_and_does_not_reopen_a_window() -> None:
    f = Feed()
    f.add(T0 + 100)
    f.add(T0 + 5000)  # closes [0,2000); watermark 4500 also passes [2000,4000)
    f.add(T0 + 1500)  # late: window closed
    f.add(T0 + 3000)  # late: window passed by the watermark even though it never opened
    assert f.late == [T0 + 1500, T0 + 3000]
    assert spans(f.closed) == [("d1", 0, 2000)]
    assert f.w.open_windows == 1


def test_watermark_is_per_device_and_the_smallest_over_its_modalities() -> None:
    f = Feed()
    f.add(T0 + 100, device="a", modality=CAM)
    f.add(T0 + 100, device="a", modality=AUD)
    f.add(T0 + 3000, device="b")  # another device's time moves nothing of a's
    f.add(T0 + 3000, device="a", modality=AUD)  # a's camera still at 100: held
    assert f.closed == []
    f.add(T0 + 2500, device="a", modality=CAM)  # both modalities past 2000 + 500
    assert spans(f.closed) == [("a", 0, 2000)]
    assert (f.closed[0].count(CAM), f.closed[0].count(AUD)) == (1, 1)
    assert f.late == []


def test_idle_timeout_closes_a_silent_device_on_the_injected_clock() -> None:
    f = Feed()
    f.now = 1_000
    f.add(T0 + 100, device="quiet")
    f.add(T0 + 2100, device="quiet")
    f.now = 3_000
    f.add(T0 + 100, device="busy")
    assert f.w.expire_idle(5_999) == []
    closed = f.w.expire_idle(6_000)
    assert spans(closed) == [("quiet", 0, 2000), ("quiet", 2000, 4000)]
    f.add(T0 + 2200, device="quiet")  # its window was closed: late
    assert f.late == [T0 + 2200]
    assert spans(f.w.expire_idle(8_000)) == [("busy", 0, 2000)]


def test_a_device_heard_again_is_not_expired_behind_one_that_stayed_silent() -> None:
    """Idle devices are found in last-seen order: a device heard from again moves to the
    back, one whose windows closed by watermark leaves nothing to close."""
    f = Feed()
    f.add(T0 + 100, device="a")  # now 0
    f.now = 1_000
    f.add(T0 + 100, device="b")
    f.add(T0 + 100, device="done")
    f.add(T0 + 2600, device="done")  # watermark closes [0, 2000) at once
    f.now = 2_000
    f.add(T0 + 300, device="a")
    assert spans(f.closed) == [("done", 0, 2000)]
    assert f.w.expire_idle(5_999) == []
    assert spans(f.w.expire_idle(6_000)) == [("b", 0, 2000), ("done", 2000, 4000)]
    assert f.w.expire_idle(6_999) == []
    assert spans(f.w.expire_idle(7_000)) == [("a", 0, 2000)]
    f.now = 7_500
    f.add(T0 + 4100, device="b")  # heard again: a new window, expired in its turn
    assert f.w.expire_idle(12_499) == []
    assert spans(f.w.expire_idle(12_500)) == [("b", 4000, 6000)]


def test_a_device_silent_past_forget_after_is_forgotten_watermark_included() -> None:
    f = Feed(
        WindowConfig(
            window_ms=2000, allowed_lateness_ms=500, idle_timeout_ms=5000, forget_after_ms=60_000
        )
    )
    f.add(T0 + 100, device="gone")
    f.add(T0 + 4100, device="gone")  # its watermark closes [0, 2000)
    f.add(T0 + 100, device="back")
    f.w.restore("resumed", T0 + 2000, now_wall_ms=0)  # taken over, never heard from
    assert spans(f.w.expire_idle(5_000)) == [("gone", 4000, 6000), ("back", 0, 2000)]
    f.now = 30_000
    f.add(T0 + 2100, device="back")  # heard again: stays
    assert f.w.forget_silent(59_999) == []
    assert f.w.forget_silent(60_000) == ["resumed"]  # silent since its restore at 0
    assert f.w.forget_silent(64_999) == []  # counted from when it was found idle, at 5,000
    assert f.w.forget_silent(65_000) == ["gone"]
    assert sorted(f.w.devices()) == ["back"]
    assert f.w.closed_until("gone") is None
    # a record behind its old watermark now opens a window instead of being late
    f.add(T0 + 1000, device="gone")
    assert f.late == [] and f.w.open_windows == 2
    assert f.w.forget_silent(10**9) == []  # "gone" has a window open again


def test_a_device_is_not_forgotten_in_the_tick_that_closed_its_windows() -> None:
    """Ticks an hour apart (a long backlog skips them): the windows closed by that tick may
    still be queued, and a record for one of them must be late, not reopen it."""
    f = Feed(
        WindowConfig(
            window_ms=2000, allowed_lateness_ms=500, idle_timeout_ms=5000, forget_after_ms=60_000
        )
    )
    f.add(T0 + 100, device="d")
    assert spans(f.w.expire_idle(3_600_000)) == [("d", 0, 2000)]
    assert f.w.forget_silent(3_600_000) == []
    f.now = 3_600_000
    f.add(T0 + 900, device="d")
    assert f.late == [T0 + 900]


def test_a_clock_stepping_back_delays_only_the_devices_seen_before_the_step() -> None:
    f = Feed()
    f.now = 100_000
    f.add(T0 + 100, device="before")
    f.now = 40_000  # the wall clock stepped back by 60 s
    f.add(T0 + 100, device="after")
    assert spans(f.w.expire_idle(45_000)) == [("after", 0, 2000)]  # not held up by "before"
    assert spans(f.w.expire_idle(50_000)) == [("before", 0, 2000)]  # idle from the step on


def test_every_window_with_a_record_closes_exactly_once() -> None:
    f = Feed(WindowConfig(window_ms=1000, allowed_lateness_ms=300, idle_timeout_ms=1))
    timestamps = [T0 + (i * 377) % 9000 for i in range(200)]
    for ts in sorted(timestamps):
        f.add(ts, device=f"d{ts % 3}")
    f.closed += f.w.close_all()
    seen = [(w.device_id, w.start_ms) for w in f.closed]
    assert len(seen) == len(set(seen))
    expected = {(f"d{ts % 3}", ts // 1000 * 1000) for ts in timestamps}
    assert set(seen) == expected
    assert sum(len(w.positions) for w in f.closed) == 200
    assert f.w.open_windows == 0 and f.w.buffered_bytes == 0


def test_buffered_bytes_and_open_windows_are_tracked() -> None:
    f = Feed()
    f.add(T0 + 1, nbytes=100)
    f.add(T0 + 2001, nbytes=50)
    assert (f.w.open_windows, f.w.buffered_bytes) == (2, 150)
    f.add(T0 + 2600, nbytes=1)
    assert (f.w.open_windows, f.w.buffered_bytes) == (1, 51)
    dropped = f.w.drop_devices(["d1"])
    assert len(dropped) == 1 and (f.w.open_windows, f.w.buffered_bytes) == (0, 0)


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="window_ms"):
        WindowConfig(window_ms=0)


def test_a_window_completes_once_when_its_device_reaches_its_end() -> None:
    f = Feed()
    for ts in (100, 900, 1999):
        f.add(T0 + ts)
    assert f.completed == []
    f.add(T0 + 2000, device="d2")  # another device's time does not complete d1's window
    assert f.completed == []
    f.add(T0 + 2000)
    assert spans(f.completed) == [("d1", 0, 2000)] and f.closed == []
    f.add(T0 + 1500)  # within lateness: joins the completed window, which is not re-reported
    f.add(T0 + 2100)
    assert len(f.completed) == 1 and f.completed[0].added == 4
    f.add(T0 + 2500)
    assert spans(f.closed) == [("d1", 0, 2000)]
    assert spans(f.completed) == [("d1", 0, 2000)]


def test_a_jump_completes_every_open_window_it_passes_and_not_the_closed_ones() -> None:
    f = Feed(WindowConfig(window_ms=2000, allowed_lateness_ms=5000, idle_timeout_ms=5000))
    f.add(T0 + 100)
    f.add(T0 + 2100)
    f.add(T0 + 4100)
    assert spans(f.completed) == [("d1", 0, 2000), ("d1", 2000, 4000)] and f.closed == []
    f.add(T0 + 7100)  # watermark 2100: closes [0, 2000), completes [4000, 6000)
    assert spans(f.completed)[2:] == [("d1", 4000, 6000)]
    f.add(T0 + 13500)  # watermark 8500: closes up to 8000, so [6000, 8000) never completes
    assert spans(f.closed) == [("d1", s, s + 2000) for s in (0, 2000, 4000, 6000)]
    assert len(f.completed) == 3
    f.add(T0 + 10100)  # opens [10000, 12000) behind the device's time: complete at once
    assert spans(f.completed)[3:] == [("d1", 10000, 12000)]


# -- per-modality watermarks (contract v1.1) -------------------------------------------------
CADENCE = {TEL: 100, CAM: 200, AUD: 500}  # ms between records, as tests/factory.device_stream


def send(f: Feed, modality: Modality, start: int, end: int, device: str = "d1") -> None:
    """Every record of `modality` with event time in [start, end) at its cadence, at once
    (as a gateway flushing one topic)."""
    for ts in range(start, end, CADENCE[modality]):
        f.add(T0 + ts, device=device, modality=modality)


def counts(w: Window) -> tuple[int, int, int]:
    return w.count(CAM), w.count(AUD), w.count(TEL)


@pytest.mark.parametrize("delay_ms", [40, 3000])
@pytest.mark.parametrize("order", list(itertools.permutations((CAM, AUD, TEL))))
def test_modalities_delivered_one_after_another_find_their_windows_open(
    order: tuple[Modality, ...], delay_ms: int
) -> None:
    """Issue 15: a gateway flushes one topic of the last three windows after another. Under
    v1 the first topic's event time closed the windows before the others arrived: 13-14 of
    15 slices were classified without their records."""
    f = Feed()
    for m in (CAM, AUD, TEL):  # the device has been sending all three
        send(f, m, 0, 2000)
    f.now = 1_000
    for m in order:
        send(f, m, 2000, 8000)
        f.now += delay_ms
    assert f.late == []
    assert spans(f.closed) == [("d1", s, s + 2000) for s in (0, 2000, 4000)]
    assert [counts(w) for w in f.closed] == [(10, 4, 20)] * 3
    assert spans(f.w.expire_idle(f.now + 5000)) == [("d1", 6000, 8000)]


def test_a_device_without_a_microphone_is_not_held_back_by_audio() -> None:
    f = Feed()
    for ts in range(0, 2500, 100):
        f.now = ts
        f.add(T0 + ts, modality=CAM)
        f.add(T0 + ts, modality=TEL)
    assert f.closed == []
    f.now = 2500
    f.add(T0 + 2500, modality=CAM)
    assert f.closed == []  # telemetry not yet at 2500
    f.add(T0 + 2500, modality=TEL)
    assert spans(f.closed) == [("d1", 0, 2000)] and counts(f.closed[0]) == (20, 0, 20)


def test_a_dead_microphone_holds_windows_for_the_setting_then_stops() -> None:
    """The microphone's last chunk is at 1.5 s; telemetry goes on in real time. Audio holds
    the device's windows until it has been silent for modality_silence_ms (5 s): then they
    close at the next record, and later ones close on time."""
    f = Feed()
    for ts in range(0, 8500, 100):
        f.now = ts
        if ts < 2000 and ts % 500 == 0:
            f.add(T0 + ts, modality=AUD)
        f.add(T0 + ts, modality=TEL)
        if ts == 6400:
            assert f.closed == []  # audio heard at 1500, its watermark at 1000
        if ts == 6500:  # silent for 5 s now
            assert spans(f.closed) == [("d1", s, s + 2000) for s in (0, 2000, 4000)]
    assert counts(f.closed[0]) == (0, 4, 20)
    f.now = 8500
    f.add(T0 + 8500, modality=TEL)  # on time again: at end + allowed lateness
    assert spans(f.closed)[3:] == [("d1", 6000, 8000)]
    assert f.late == []


def test_the_setting_is_how_long_a_silent_modality_holds() -> None:
    f = Feed(
        WindowConfig(
            window_ms=2000, allowed_lateness_ms=500, idle_timeout_ms=5000, modality_silence_ms=800
        )
    )
    f.add(T0 + 100, modality=AUD)
    f.now = 799
    f.add(T0 + 2600, modality=CAM)
    assert f.closed == []
    f.now = 800
    f.add(T0 + 2700, modality=CAM)
    assert spans(f.closed) == [("d1", 0, 2000)]
    with pytest.raises(ValueError, match="modality_silence_ms"):
        WindowConfig(modality_silence_ms=0)


def test_a_whole_device_silent_past_the_setting_keeps_its_modalities_active() -> None:
    """A gateway that buffered past modality_silence_ms (and the idle timeout) flushes camera
    first: audio and telemetry, heard until it went quiet, still hold the windows. A
    microphone that died while its device talked does not come back to life."""
    f = Feed()
    for m in (CAM, AUD, TEL):
        send(f, m, 0, 2000, device="gw")
    f.add(T0, device="dead-mic", modality=AUD)
    for ts in range(0, 6000, 100):
        f.now = ts
        f.add(T0 + ts, device="dead-mic", modality=TEL)
    assert spans(f.closed) == [("dead-mic", 0, 2000), ("dead-mic", 2000, 4000)]  # at 5 s
    assert spans(f.w.expire_idle(10_900)) == [("gw", 0, 2000), ("dead-mic", 4000, 6000)]
    f.now = 30_000
    for m in (CAM, AUD, TEL):
        send(f, m, 2000, 8000, device="gw")
        f.now += 40
    send(f, CAM, 6000, 12000, device="dead-mic")
    send(f, TEL, 6000, 12000, device="dead-mic")
    assert f.late == []
    gw = [w for w in f.closed if w.device_id == "gw"]  # expire_idle's not in f.closed
    assert spans(gw) == [("gw", s, s + 2000) for s in (2000, 4000)]
    assert [counts(w) for w in gw] == [(10, 4, 20)] * 2
    dead = [w for w in f.closed if w.device_id == "dead-mic"][2:]
    assert spans(dead) == [("dead-mic", s, s + 2000) for s in (6000, 8000)]


def test_the_idle_timeout_still_closes_windows_a_lagging_modality_holds() -> None:
    f = Feed()
    for m in (CAM, AUD, TEL):
        send(f, m, 0, 2000)
    send(f, CAM, 2000, 8000)  # audio and telemetry never follow
    assert f.closed == []
    assert f.w.expire_idle(4_999) == []
    assert spans(f.w.expire_idle(5_000)) == [("d1", s, s + 2000) for s in range(0, 8000, 2000)]
    f.now = 5_000
    send(f, AUD, 2000, 4000)  # too late now: the idle timeout closed their windows
    assert len(f.late) == 4


def test_a_modality_first_heard_after_the_others_holds_only_windows_still_open() -> None:
    """It is not active until heard; a window the others already closed stays closed."""
    f = Feed()
    send(f, CAM, 0, 6000)  # watermark 5300: [0, 2000) and [2000, 4000) close
    assert spans(f.closed) == [("d1", 0, 2000), ("d1", 2000, 4000)]
    send(f, AUD, 3000, 6000)  # the first chunk is late; the others join [4000, 6000)
    assert f.late == [T0 + 3000, T0 + 3500]
    send(f, CAM, 6000, 7000)  # camera past 6500, audio at 5500: held now
    assert len(f.closed) == 2
    send(f, AUD, 6000, 7000)
    assert spans(f.closed)[2:] == [("d1", 4000, 6000)] and counts(f.closed[2]) == (10, 4, 0)


def test_a_window_completes_once_every_active_modality_reached_its_end() -> None:
    """Early inference waits for the same modalities as closing does, and a modality heard
    again after its silence, pulling the device's time back, completes no window twice."""
    f = Feed()
    for m in (CAM, AUD, TEL):
        send(f, m, 0, 2000)
    send(f, CAM, 2000, 2400)
    send(f, TEL, 2000, 2400)
    assert f.completed == []  # audio still at 1500
    f.add(T0 + 2000, modality=AUD)
    assert spans(f.completed) == [("d1", 0, 2000)] and f.closed == []
    for ts in range(2400, 6000, 100):  # audio goes silent, heard last at 0
        f.now = ts
        f.add(T0 + ts, modality=TEL)
        if ts % 200 == 0:
            f.add(T0 + ts, modality=CAM)
    assert spans(f.closed) == [("d1", 0, 2000), ("d1", 2000, 4000)]  # at 5 s
    f.now = 6000
    f.add(T0 + 6000, modality=TEL)
    assert len(f.completed) == 1  # the camera is at 5800
    f.add(T0 + 6000, modality=CAM)
    assert spans(f.completed) == [("d1", 0, 2000), ("d1", 4000, 6000)]
    f.add(T0 + 4500, modality=AUD)  # back: joins [4000, 6000), the device's time is 4500
    send(f, AUD, 5000, 6500)
    assert len(f.completed) == 2 and f.late == []


def test_modalities_arriving_together_close_windows_exactly_as_before() -> None:
    """No added latency: when every modality's records arrive with their event time, a
    window closes once the records at its end plus the allowed lateness arrived, as under
    v1 (which closed it at the first of them, v1.1 at the last: arriving together, the same
    moment). With a sparser modality it waits for that one's first record at or past that
    point: a 5 fps camera has no frame at 2.5 s, so [0, 2 s) closes at its frame at 2.6 s."""
    f = Feed()
    closed_at: dict[int, int] = {}
    for ts in range(0, 10_000, 100):
        f.now = ts
        for m in (TEL, CAM, AUD) if ts % 300 else (AUD, CAM, TEL):
            before = len(f.closed)
            f.add(T0 + ts, modality=m)
            closed_at.update((w.start_ms - T0, ts) for w in f.closed[before:])
            if len(f.closed) > before:
                assert m == (AUD if ts % 300 else TEL)  # the last record of the tick
    assert closed_at == {s: s + 2500 for s in range(0, 8000, 2000)}
    assert f.late == []


def test_a_clock_stepping_back_does_not_keep_a_silent_modality_active() -> None:
    f = Feed()
    f.now = 100_000
    f.add(T0, modality=AUD)
    f.now = 40_000  # stepped back by 60 s: audio counts as heard at 40,000
    for ts in range(0, 5100, 100):
        f.add(T0 + ts, modality=TEL)
        f.now += 100
    assert spans(f.closed) == [("d1", 0, 2000), ("d1", 2000, 4000)]  # at 45,000


def test_the_window_settings_reach_the_engine_windower() -> None:
    from pipeline.settings import Settings, WindowSettings
    from pipeline.stream.assembly import window_config

    s = Settings(windows=WindowSettings(modality_silence_ms=1234, idle_timeout_ms=4321))
    cfg = window_config(s, 2000)
    assert (cfg.modality_silence_ms, cfg.idle_timeout_ms) == (1234, 4321)
