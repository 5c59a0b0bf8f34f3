"""Window semantics of the contract: alignment, watermark, lateness, idle timeout."""

from __future__ import annotations

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
    f.add(T0 + 1950, modality=CAM)  # out of order but not late
    f.add(T0 + 2600)
    assert spans(f.closed) == [("d1", 0, 2000)]
    assert f.closed[0].count(CAM) == 1 and f.closed[0].count(TEL) == 1
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


def test_watermark_is_per_device_and_spans_modalities() -> None:
    f = Feed()
    f.add(T0 + 100, device="a", modality=CAM)
    f.add(T0 + 100, device="b")
    f.add(T0 + 3000, device="a", modality=AUD)  # advances a's watermark only
    assert spans(f.closed) == [("a", 0, 2000)]
    assert f.closed[0].count(CAM) == 1


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
    f.add(T0 + 4100, modality=CAM)
    assert spans(f.completed) == [("d1", 0, 2000), ("d1", 2000, 4000)] and f.closed == []
    f.add(T0 + 7100)  # watermark 2100: closes [0, 2000), completes [4000, 6000)
    assert spans(f.completed)[2:] == [("d1", 4000, 6000)]
    f.add(T0 + 13500)  # watermark 8500: closes up to 8000, so [6000, 8000) never completes
    assert spans(f.closed) == [("d1", s, s + 2000) for s in (0, 2000, 4000, 6000)]
    assert len(f.completed) == 3
    f.add(T0 + 10100)  # opens [10000, 12000) behind the device's time: complete at once
    assert spans(f.completed)[3:] == [("d1", 10000, 12000)]
