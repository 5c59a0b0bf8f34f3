"""Per-device tumbling event-time windows, exactly as the wire contract defines them.

- A record with event time `ts` belongs to the window starting at `floor(ts / W) * W`.
- Each modality of a device has a watermark: the largest event time seen on it minus the
  allowed lateness. The device's watermark is the smallest over its *active* modalities,
  and every window whose end is <= it closes (contract v1.1; v1 took the largest event
  time over all modalities, so a modality delivered a little after the others, e.g. by a
  gateway flushing one topic after another, found its windows closed and was dropped).
- A modality is active once heard from, until it has been silent for `modality_silence_ms`
  of wall-clock time while its device was heard from: a device without a microphone (never
  heard) or with a dead one (silent while the camera goes on) is not held back by audio.
  A stretch of `modality_silence_ms` or more in which the whole device is silent does not
  count (a gateway reconnecting after buffering a few windows): the modalities active when
  it went quiet hold its windows again until each is heard, or silent that long once more.
  Silence is judged when the device's records arrive, so a modality that went silent
  releases the windows it held at the device's next record (or at the idle timeout).
- A device silent for `idle_timeout_ms` of wall-clock time has all its windows closed (the
  caller's clock: the Kafka worker's stands while its input is unread).
- A window is complete once every active modality of its device sent a record at or past
  its end, though it stays open for late records until the watermark passes it; `add`
  reports windows as they complete, so their inference can start early
  (pipeline/stream/engine.py).
- A record whose window already closed (or was passed by the watermark) is late: it is
  reported to the caller, who counts and releases it; it never reopens a window. A record
  of a modality whose own watermark lags the others is not late as long as its window is
  open, and it holds the window open: that is the point of the per-modality watermark.
- A device silent for `forget_after_ms` of wall-clock time with no window open is
  forgotten, watermark included, so that devices coming and going (or a producer writing
  random keys) cannot grow memory without bound; a record of it arriving later starts
  afresh, as from a new device, instead of being late.

Pure logic: no Kafka, no decoding, no clock of its own (wall time is passed in).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from encoders.modality import Modality


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record came from; what the offset tracker holds and releases."""

    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Item:
    """One accepted record inside a window, with its modality-specific payload."""

    modality: Modality
    ts_ms: int
    payload: object
    position: Position
    nbytes: int


@dataclass(slots=True)
class Window:
    device_id: str
    start_ms: int
    end_ms: int
    items: dict[Modality, list[Item]] = field(default_factory=dict)
    nbytes: int = 0
    added: int = 0  # items added so far: tells whether a window changed since it was read

    def add(self, item: Item) -> None:
        self.items.setdefault(item.modality, []).append(item)
        self.nbytes += item.nbytes
        self.added += 1

    def count(self, modality: Modality) -> int:
        return len(self.items.get(modality, ()))

    @property
    def positions(self) -> list[Position]:
        return [it.position for items in self.items.values() for it in items]


@dataclass(frozen=True, slots=True)
class WindowConfig:
    window_ms: int = 2000
    allowed_lateness_ms: int = 500
    idle_timeout_ms: int = 5000
    forget_after_ms: int = 3_600_000
    modality_silence_ms: int = 5000

    def __post_init__(self) -> None:
        if self.window_ms <= 0:
            raise ValueError(f"window_ms must be positive, got {self.window_ms}")
        if self.allowed_lateness_ms < 0 or self.idle_timeout_ms <= 0:
            raise ValueError("allowed_lateness_ms must be >= 0 and idle_timeout_ms > 0")
        if self.modality_silence_ms <= 0:
            raise ValueError(
                f"modality_silence_ms must be positive, got {self.modality_silence_ms}"
            )
        if self.forget_after_ms < self.idle_timeout_ms:
            raise ValueError("forget_after_ms must be at least idle_timeout_ms")

    def start_of(self, ts_ms: int) -> int:
        return (ts_ms // self.window_ms) * self.window_ms


@dataclass(slots=True)
class _Lane:
    """One modality of a device: its event time, and when it was last heard from."""

    modality: Modality
    max_ts: int
    heard_wall_ms: int  # moved forward past stretches in which the whole device was silent


@dataclass(slots=True)
class _Device:
    open: dict[int, Window] = field(default_factory=dict)  # start_ms -> window
    lanes: tuple[_Lane, ...] = ()  # the modalities heard from (a tuple: smaller than a dict)
    completed_until: int | None = None  # every window ending at or before this was complete
    closed_until: int | None = None  # every window ending at or before this is closed
    last_seen_wall_ms: int = 0


@dataclass(frozen=True, slots=True)
class AddResult:
    window: Window | None  # the one the item joined; None: the item is late
    closed: list[Window] = field(default_factory=list)
    completed: list[Window] = field(default_factory=list)  # still open, end passed

    @property
    def late(self) -> bool:
        return self.window is None


class Windower:
    """Holds the open windows of every device; returns windows as they close, in order."""

    def __init__(self, config: WindowConfig) -> None:
        self.config = config
        self._devices: dict[str, _Device] = {}
        # devices that may have open windows, least recently seen first: expire_idle looks
        # only at those it closes (scanning every device cost 22-42 ms a step at 100,000)
        self._seen: OrderedDict[str, None] = OrderedDict()
        # idle devices with nothing open -> when they were found idle (wall ms), oldest first
        self._silent: OrderedDict[str, int] = OrderedDict()
        self.open_windows = 0
        self.buffered_bytes = 0

    def add(self, device_id: str, item: Item, now_wall_ms: int) -> AddResult:
        dev = self._devices.setdefault(device_id, _Device())
        self._hear(dev, item, now_wall_ms)
        dev.last_seen_wall_ms = now_wall_ms
        self._seen[device_id] = None
        self._seen.move_to_end(device_id)
        self._silent.pop(device_id, None)
        start = self.config.start_of(item.ts_ms)
        end = start + self.config.window_ms
        if dev.closed_until is not None and end <= dev.closed_until:
            return AddResult(None)
        window = dev.open.get(start)
        opened = window is None
        if window is None:
            window = dev.open[start] = Window(device_id, start, end)
            self.open_windows += 1
        window.add(item)
        self.buffered_bytes += item.nbytes
        device_ts = self._device_ts(dev, now_wall_ms)
        watermark = device_ts - self.config.allowed_lateness_ms
        boundary = self.config.start_of(watermark)  # largest window boundary <= watermark
        closed = self._close_until(dev, boundary)
        before = dev.completed_until
        if before is not None and end <= before:  # opened behind the device's time: complete
            return AddResult(window, closed, [window] if opened else [])
        return AddResult(window, closed, self._completed(dev, device_ts))

    def expire_idle(self, now_wall_ms: int) -> list[Window]:
        """Close every window of devices silent for at least the idle timeout."""
        closed: list[Window] = []
        while self._seen:
            device_id = next(iter(self._seen))
            dev = self._devices[device_id]
            if dev.last_seen_wall_ms > now_wall_ms:  # the clock stepped back: seen just now
                dev.last_seen_wall_ms = now_wall_ms
                self._seen.move_to_end(device_id)
                continue
            if now_wall_ms - dev.last_seen_wall_ms < self.config.idle_timeout_ms:
                break  # nor any seen after it
            del self._seen[device_id]
            self._silent[device_id] = now_wall_ms
            if dev.open:
                closed += self._close_until(dev, max(dev.open) + self.config.window_ms)
        return closed

    def forget_silent(self, now_wall_ms: int) -> list[str]:
        """Forget devices found idle `forget_after_ms` ago and silent since; their ids.

        Counted from when expire_idle found them idle, not from their last record: a device
        is never forgotten in the tick that closed its windows (they may still be queued, and
        a record for one of them must stay late, not reopen it)."""
        forgotten: list[str] = []
        while self._silent:
            device_id, since = next(iter(self._silent.items()))
            if since > now_wall_ms:  # the clock stepped back
                self._silent[device_id] = now_wall_ms
                self._silent.move_to_end(device_id)
                continue
            if now_wall_ms - since < self.config.forget_after_ms:
                break
            del self._silent[device_id], self._devices[device_id]
            forgotten.append(device_id)
        return forgotten

    def close_all(self) -> list[Window]:
        """End of a finite stream: close everything (offline replay, shutdown drain)."""
        closed: list[Window] = []
        for dev in self._devices.values():
            if dev.open:
                closed += self._close_until(dev, max(dev.open) + self.config.window_ms)
        return closed

    def drop_devices(self, device_ids: Iterable[str]) -> list[Window]:
        """Forget devices entirely (their partitions were revoked); returns what was open."""
        dropped: list[Window] = []
        for device_id in device_ids:
            dev = self._devices.pop(device_id, None)
            self._seen.pop(device_id, None)
            self._silent.pop(device_id, None)
            if dev is not None:
                dropped += dev.open.values()
                self._forget(dev.open.values())
        return dropped

    def devices(self) -> list[str]:
        return list(self._devices)

    def closed_until(self, device_id: str) -> int | None:
        """Every window of the device ending at or before this has closed."""
        dev = self._devices.get(device_id)
        return None if dev is None else dev.closed_until

    def restore(self, device_id: str, closed_until: int, now_wall_ms: int) -> None:
        """Resume a device whose windows up to `closed_until` were already emitted."""
        dev = self._devices.get(device_id)
        if dev is None:  # forgotten in its turn unless it is heard from
            dev = self._devices[device_id] = _Device(last_seen_wall_ms=now_wall_ms)
            self._silent[device_id] = now_wall_ms
        if dev.closed_until is None or closed_until > dev.closed_until:
            dev.closed_until = closed_until

    def _hear(self, dev: _Device, item: Item, now: int) -> None:
        """Note the item's modality as heard from now, at its event time."""
        gap = now - dev.last_seen_wall_ms
        if dev.lanes and (gap >= self.config.modality_silence_ms or gap < 0):
            for lane in dev.lanes:
                # the whole device was silent that long: the gap is no modality's silence.
                # The clock stepped back: whatever was heard in its future was heard now.
                lane.heard_wall_ms = (
                    lane.heard_wall_ms + gap if gap > 0 else min(lane.heard_wall_ms, now)
                )
        for lane in dev.lanes:
            if lane.modality is item.modality:
                lane.max_ts = max(lane.max_ts, item.ts_ms)
                lane.heard_wall_ms = now
                return
        dev.lanes += (_Lane(item.modality, item.ts_ms, now),)

    def _device_ts(self, dev: _Device, now: int) -> int:
        """The device's event time: the smallest over its active modalities of the largest
        event time seen on each (the modality just heard is active)."""
        silence = self.config.modality_silence_ms
        return min(lane.max_ts for lane in dev.lanes if now - lane.heard_wall_ms < silence)

    def _completed(self, dev: _Device, device_ts: int) -> list[Window]:
        """Open windows whose end the device's event time has just reached. That time may
        step back (a modality heard again holds it back): each window completes once."""
        low = dev.completed_until
        high = self.config.start_of(device_ts)
        if low is not None and high <= low:
            return []  # no window end reached (most records)
        dev.completed_until = high
        return [
            w for w in dev.open.values() if w.end_ms <= high and (low is None or w.end_ms > low)
        ]

    def _close_until(self, dev: _Device, boundary: int) -> list[Window]:
        if dev.closed_until is None or boundary > dev.closed_until:
            dev.closed_until = boundary
        ready = sorted(start for start, w in dev.open.items() if w.end_ms <= boundary)
        closed = [dev.open.pop(start) for start in ready]
        self._forget(closed)
        return closed

    def _forget(self, windows: Iterable[Window]) -> None:
        for w in windows:
            self.open_windows -= 1
            self.buffered_bytes -= w.nbytes
