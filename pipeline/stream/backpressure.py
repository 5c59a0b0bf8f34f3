"""Back-pressure as a rule: from a step's load, whether the Kafka worker consumes.

The rule. Under the limits (open windows and buffered bytes both below theirs), read. At or
over either limit:
- pause all consumption while windows can close without more input: closed windows wait
  for the model, or the aligner released records this step (they move watermarks, which
  close windows);
- otherwise the open windows close only with more input: read on over capacity, and say so
  once, until back under the limits. Such an episode does not pause again.
No record is lost for the limits: they bound memory as far as the data allows. Consumption
is paused as a whole, never one partition running ahead of its peers (the aligner's
per-partition limit bounds what a leading partition buffers).

`decide` is pure; the worker gathers the `Load` each step, keeps the `Flow` and applies
the `Decision` (pause or resume its partitions, count and log what started).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Flow(Enum):
    """Whether the worker consumes, and why."""

    READING = "reading"  # under the limits
    PAUSED = "paused"  # over a limit; windows can close without more input
    OVER_CAPACITY = "over_capacity"  # over a limit, reading on: windows need more input


@dataclass(frozen=True, slots=True)
class Limits:
    max_open_windows: int
    max_buffered_bytes: int


@dataclass(frozen=True, slots=True)
class Load:
    """What the engine holds after a step, and what can free some of it without input."""

    open_windows: int
    buffered_bytes: int
    queued_windows: int  # closed, waiting for the model
    released_records: int  # released by the aligner this step

    def over(self, limits: Limits) -> bool:
        """At or over either limit."""
        return (
            self.open_windows >= limits.max_open_windows
            or self.buffered_bytes >= limits.max_buffered_bytes
        )

    @property
    def can_close_windows(self) -> bool:
        """Windows close (and memory frees) without reading more input."""
        return self.queued_windows > 0 or self.released_records > 0


@dataclass(frozen=True, slots=True)
class Decision:
    flow: Flow  # from now on
    previous: Flow

    @property
    def pause(self) -> bool:
        """Consume nothing until the next decision."""
        return self.flow is Flow.PAUSED

    @property
    def pause_started(self) -> bool:
        return self.pause and self.previous is not Flow.PAUSED

    @property
    def over_capacity_started(self) -> bool:
        """An episode of reading on over capacity starts: the one time to warn."""
        return self.flow is Flow.OVER_CAPACITY and self.previous is not Flow.OVER_CAPACITY


def decide(previous: Flow, load: Load, limits: Limits) -> Decision:
    """The rule (module docstring) for one step, given the flow the last step decided."""
    if not load.over(limits):
        flow = Flow.READING
    elif previous is Flow.OVER_CAPACITY:
        flow = Flow.OVER_CAPACITY  # reads on until under the limits
    elif load.can_close_windows:
        flow = Flow.PAUSED
    else:
        flow = Flow.OVER_CAPACITY
    return Decision(flow, previous)
