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

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class ModelLane(Generic[P, R]):
    def __init__(self, threaded: bool) -> None:
        self.threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        self._started: deque[tuple[P, Future[R]]] = deque()

    def start(self, payload: P, work: Callable[[], R], *, inline: bool = False) -> None:
        """Run `work` for `payload`: on the model thread, or now (`inline`, or threads off;
        an exception is then raised by `done`, as the thread's is)."""
        if self.threaded and not inline:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="iotfuse-model")
            self._started.append((payload, self._pool.submit(work)))
            return
        future: Future[R] = Future()
        try:
            future.set_result(work())
        except Exception as exc:  # noqa: BLE001  (handed to whoever collects, as a thread's)
            future.set_exception(exc)
        self._started.append((payload, future))

    def done(self, wait: bool = False) -> list[tuple[P, R]]:
        """The batches that finished, oldest first, up to the first still running (with
        `wait`: all of them). A batch whose work raised raises here."""
        out: list[tuple[P, R]] = []
        while self._started and (wait or self._started[0][1].done()):
            payload, future = self._started.popleft()
            out.append((payload, future.result()))
        return out

    def payloads(self) -> list[P]:
        """The payloads of the batches started and not yet handed back, oldest first."""
        return [payload for payload, _ in self._started]

    def __len__(self) -> int:
        """Batches started and not yet handed back."""
        return len(self._started)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
