"""Decode the camera frames a window will use while the window is still open.

All devices' windows end on the same epoch boundaries, so they close together: decoding
their frames only then puts every JPEG of a fleet into one burst, and the last window's
event waits for all of them. The prefetcher spreads that work over the window's lifetime:
as a frame arrives it predicts, from the frame count of the device's previous window,
whether `window_inputs` will pick it (the same `spread` rule), and if so keeps it to decode
on a thread pool (OpenCV decodes without the GIL) once the reader is `idle`. At close,
`decode` hands out the result or, for a frame it did not predict or has not started,
decodes it then. The frames picked and their pixels are exactly those of decoding at
close: only the moment of the work changes.

Why at idle, not on arrival: the frames of a fleet arrive together too, and the first
frame past a window's end plus the allowed lateness, the one that closes the window, is
often a frame the next window picks. Decoded on arrival, a fleet's frames took the cores
in the very moment its windows closed, and each event waited for them
(docs/performance.md). A reader that never idles (a backlog, a replay) decodes at close,
a batch at a time on every feature thread, as without prefetching.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from encoders.modality import Modality
from pipeline.stream.features import FeatureSpec, decode_frame, spread
from pipeline.stream.windows import Item, Position, Window


class FramePrefetch:
    def __init__(self, spec: FeatureSpec, threads: int) -> None:
        self.spec = spec
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._waiting: dict[Position, Item] = {}  # predicted, decoded once the reader idles
        self._pending: dict[Position, Future[np.ndarray]] = {}  # started
        self._lock = threading.Lock()  # `decode` runs on the model's and feature threads
        self._last_count: dict[str, int] = {}  # device -> frames in its last closed window
        self._arrived: dict[tuple[str, int], int] = {}  # (device, window start) -> frames
        self.started = 0  # frames whose decoding started ahead (when the reader idled)
        self.ahead = 0  # frames handed out decoded ahead
        self.at_close = 0  # frames decoded when asked (not predicted)

    def on_frame(self, device: str, window_start: int, item: Item) -> None:
        """A frame was added to the open window of `device` starting at `window_start`."""
        key = (device, window_start)
        index = self._arrived.get(key, 0)
        self._arrived[key] = index + 1
        # the previous window's frames, if it is still open (its end has passed: all its
        # frames are in, bar late ones), else the count its close left
        previous = self._arrived.get((device, window_start - self.spec.window_ms))
        expected = previous if previous is not None else self._last_count.get(device)
        if self.threads < 1 or expected is None:
            return  # a device's first window: nothing to predict from
        if index in spread(expected, self.spec.num_frames):
            with self._lock:
                self._waiting[item.position] = item

    def idle(self) -> None:
        """The reader has nothing to hand over now: start decoding the frames waiting."""
        if not self._waiting:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="iotfuse-frames")
        with self._lock:
            for position, item in self._waiting.items():
                future = self._pool.submit(decode_frame, item, self.spec.image_size)
                self._pending[position] = future
            self.started += len(self._waiting)
            self._waiting.clear()

    def decode(self, item: Item) -> np.ndarray:
        """The decoded frame (uint8 [S, S, 3]); raises RejectedRecord as decoding does."""
        with self._lock:
            future = self._pending.pop(item.position, None)
            self._waiting.pop(item.position, None)
            if future is not None:
                self.ahead += 1
            else:
                self.at_close += 1
        if future is not None:
            return future.result()
        return decode_frame(item, self.spec.image_size)

    def closed(self, window: Window) -> None:
        """The window closed: its frame count predicts the device's next windows."""
        frames = window.items.get(Modality.CAMERA, ())
        self._arrived.pop((window.device_id, window.start_ms), None)
        if frames:
            self._last_count[window.device_id] = len(frames)

    def done(self, window: Window) -> None:
        """The window's inputs are built: forget frames decoded but not picked."""
        for item in window.items.get(Modality.CAMERA, ()):
            with self._lock:
                self._waiting.pop(item.position, None)
                future = self._pending.pop(item.position, None)
            if future is not None:
                future.cancel()

    def forget(self, windows: list[Window], devices: list[str]) -> None:
        """Windows dropped unclassified (revoked partitions)."""
        for window in windows:
            self.closed(window)
            self.done(window)
        for device in devices:
            self._last_count.pop(device, None)

    @property
    def pending(self) -> int:
        """Frames predicted and not handed out yet, started or waiting."""
        return len(self._pending) + len(self._waiting)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
