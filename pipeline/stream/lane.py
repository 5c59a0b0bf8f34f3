"""The model thread (`runtime.model_thread`): a batch is classified while the worker reads on.

Without it the Kafka worker calls the model between two polls, so nothing is fetched,
parsed or windowed while the model runs, and the CPU the model leaves idle (ONNX Runtime
runs its whole graph without Python's lock) is lost. With it, `start` hands the batch to
one thread of its own and returns; `done` gives back the batches that finished, in the
order they were started, so events leave in the order their windows closed.

    lane.start(payload, work)        # work() runs on the model thread (inline when off)
    for payload, result in lane.done(wait=False): ...   # finished ones, in order

One thread: the model is never called twice at once, and a batch that waits for the
thread gathers the windows that close meanwhile (the next batch is larger, not later).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class ModelStalledError(RuntimeError):
    """A batch stayed with the model thread past runtime.model_timeout_s: the worker stops
    (a restart is what helps) rather than living on without publishing."""


class ModelLane(Generic[P, R]):
    """`timeout_s` (0: none) bounds how long a batch may stay with the model thread; the
    thread is a daemon, so a model call that never returns does not hold the process."""

    def __init__(
        self,
        threaded: bool,
        timeout_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threaded = threaded
        self.timeout_s = timeout_s
        self.clock = clock
        self._tasks: queue.SimpleQueue[tuple[Future[R], Callable[[], R]] | None] | None = None
        self._started: deque[tuple[P, Future[R], float]] = deque()

    def start(self, payload: P, work: Callable[[], R], *, inline: bool = False) -> None:
        """Run `work` for `payload`: on the model thread, or now (`inline`, or threads off;
        an exception is then raised by `done`, as the thread's is)."""
        future: Future[R] = Future()
        if self.threaded and not inline:
            if self._tasks is None:
                self._tasks = queue.SimpleQueue()
                threading.Thread(
                    target=_serve, args=(self._tasks,), name="iotfuse-model", daemon=True
                ).start()
            self._tasks.put((future, work))
        else:
            _run(future, work)
        self._started.append((payload, future, self.clock()))

    def done(self, wait: bool = False) -> list[tuple[P, R]]:
        """The batches that finished, oldest first, up to the first still running (with
        `wait`: all of them). A batch whose work raised raises here; one with the model
        thread for longer than `timeout_s` raises ModelStalledError."""
        out: list[tuple[P, R]] = []
        while self._started:
            payload, future, started = self._started[0]
            if not future.done():
                left = self.timeout_s - (self.clock() - started) if self.timeout_s > 0 else None
                if left is not None and left <= 0:
                    raise self._stalled(started)
                if not wait:
                    break
                if not wait_for([future], timeout=left).done:
                    raise self._stalled(started)
            self._started.popleft()
            out.append((payload, future.result()))
        return out

    def _stalled(self, started: float) -> ModelStalledError:
        return ModelStalledError(
            f"a batch has been with the model for {self.clock() - started:.0f} s "
            f"(runtime.model_timeout_s={self.timeout_s:g}); stopping without publishing it "
            "(a restart re-reads its windows): check the model's device"
        )

    def payloads(self) -> list[P]:
        """The payloads of the batches started and not yet handed back, oldest first."""
        return [payload for payload, _, _ in self._started]

    def __len__(self) -> int:
        """Batches started and not yet handed back."""
        return len(self._started)

    def close(self) -> None:
        """Stop the model thread once its batch in hand is done (without waiting for it)."""
        if self._tasks is not None:
            self._tasks.put(None)
            self._tasks = None


def _run(future: Future[R], work: Callable[[], R]) -> None:
    try:
        future.set_result(work())
    except Exception as exc:  # noqa: BLE001  (handed to whoever collects, as a thread's)
        future.set_exception(exc)


def _serve(tasks: queue.SimpleQueue[tuple[Future[R], Callable[[], R]] | None]) -> None:
    while (task := tasks.get()) is not None:
        _run(*task)
