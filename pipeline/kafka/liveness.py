"""Is the worker still consuming? Its group membership and its fetching, watched.

A worker can stop consuming without stopping: kafka-python 3.0.12 lets a rebalance that
only a metadata change asked for (partitions added; at start, a first assignment made from
metadata the coordinator had not seen yet) finish on the client's I/O thread after `poll()`
stopped waiting for it. Only the waiting side marks the member STABLE and turns its
heartbeats back on, and the next polls no longer wait (the finished assignment made
`need_rejoin()` false): the member stayed REBALANCING for good, commits failed with
[Error 27] RebalanceInProgressError, and the broker evicted it after its session timeout.
`rearm_unobserved_join` asks for the join again after every poll; while the member is out
of its group the worker polls for `JOIN_POLL_MS` so that the answers are awaited.

Whatever the cause, the liveness rule (`Liveness`, pure, clock injected): a worker out of
its group, or that fetched nothing while a partition it reads has records past its
position, for `kafka.stall_timeout_ms`, rejoins; still so after as long again, it stops
with `GroupStalledError` (`iotfuse run` exits 1 and its supervisor restarts it). Time the
broker does not answer is waited out, not counted: a restart does not bring a broker back.
The metrics endpoint's `/healthz` answers 503 past the timeout, broker away included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import MemberState

from pipeline.clock import Clock
from pipeline.kafka.log_end import LOG_END_TIMEOUT_MS, LogEnd
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

JOIN_POLL_MS = 1000  # a poll while out of the group waits this long for JoinGroup/SyncGroup

_STATE_NAMES = {
    MemberState.UNJOINED: "unjoined",
    MemberState.REBALANCING: "rebalancing",
    MemberState.STABLE: "stable",
}


class GroupStalledError(RuntimeError):
    """Out of the group or not fetching, and still so after a rejoin: stop, so that the
    supervisor starts a fresh worker (the input is read again from the committed offsets)."""


def group_state(consumer: Any) -> str:
    """The member's state (one of `GROUP_STATES`), from kafka-python's public group metadata."""
    return _STATE_NAMES.get(consumer.group_metadata().state, "unjoined")


def rearm_unobserved_join(consumer: Any) -> bool:
    """Ask again for a join that kafka-python 3.0.12 stopped following (module docstring);
    True if it had. Private API of the pinned kafka-python (constraints.txt), kept here
    alone; tests/test_liveness_kafka.py fails if it no longer helps."""
    coordinator = consumer._coordinator
    if getattr(coordinator, "rejoining", False) and not coordinator.need_rejoin():
        coordinator.request_rejoin()
        return True
    return False


def request_rejoin(consumer: Any) -> None:
    """Rejoin the group at the next poll (kafka-python has no public call for it)."""
    consumer._coordinator.request_rejoin()


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # "ok", "rejoin" or "fail"
    problem: str = ""  # what is wrong, in words, for the log line


class Liveness:
    """The liveness rule, fed after every poll (`polled`) and every commit interval
    (`checked`), asked for a `verdict` after each check. Also what the metrics endpoint
    shows: group state, seconds since a fetch and out of the group, health."""

    def __init__(self, stall_timeout_ms: int, clock: Clock) -> None:
        self.stall_ms, self.clock = stall_timeout_ms, clock
        self.started_ms = clock()
        self.state = "unjoined"
        self.stepped_ms: int | None = None  # the loop came round (a poll returned)
        self.fetched_ms: int | None = None  # a poll returned records
        self.out_of_group_since: int | None = self.started_ms
        self.starved_since: int | None = None  # records to fetch, none fetched
        self.unreachable_since: int | None = None  # the broker did not answer
        self.rejoined_ms: int | None = None  # the rule's rejoin, in this episode
        self._fetched_since_check = False

    def polled(self, state: str, fetched: bool) -> None:
        """A poll returned: the member's state then, and whether it returned records."""
        now = self.stepped_ms = self.clock()
        self.state = state
        if state == "stable":
            self.out_of_group_since = None
        elif self.out_of_group_since is None:
            self.out_of_group_since = now
        if fetched:
            self.fetched_ms, self.starved_since, self._fetched_since_check = now, None, True

    def checked(self, answered: bool, behind: bool) -> None:
        """A commit interval's check: whether the broker answered for end offsets, and
        whether a partition this worker reads (owned, not paused) has records past its
        position. Not fetching counts from the first check that saw such records with
        nothing fetched since the one before."""
        now = self.clock()
        if not answered:  # waited out: the clocks of what is wrong do not run
            if self.unreachable_since is None:
                self.unreachable_since = now
            for name in ("out_of_group_since", "starved_since", "rejoined_ms"):
                if getattr(self, name) is not None:
                    setattr(self, name, now)
            return
        self.unreachable_since = None
        if not behind:
            self.starved_since = None
        elif not self._fetched_since_check and self.starved_since is None:
            self.starved_since = now
        self._fetched_since_check = False

    def problem(self) -> tuple[int, str] | None:
        """Since when, and what, is wrong (out of the group first), or None."""
        now = self.clock()
        if self.out_of_group_since is not None:
            s = (now - self.out_of_group_since) / 1000
            return self.out_of_group_since, f"out of its consumer group ({self.state}) {s:.0f} s"
        if self.starved_since is not None:
            s = (now - self.starved_since) / 1000
            return self.starved_since, (
                f"fetched nothing for {s:.0f} s while its partitions have records to read"
            )
        return None

    def verdict(self) -> Verdict:
        """ok; rejoin (once per episode) after `stall_ms` of a problem; fail `stall_ms` after
        that rejoin if a problem is still there. An episode ends when nothing is wrong."""
        found = self.problem() if self.stall_ms > 0 else None
        if found is None:
            self.rejoined_ms = None
            return Verdict("ok")
        since, what = found
        now = self.clock()
        if self.rejoined_ms is None:
            if now - since < self.stall_ms:
                return Verdict("ok")
            self.rejoined_ms = now
            return Verdict("rejoin", what)
        if now - self.rejoined_ms < self.stall_ms:
            return Verdict("ok")
        return Verdict("fail", what)

    # -- what the metrics endpoint shows (read on its threads, at scrape time) ----------
    def group_state(self) -> str:
        return self.state

    def seconds_since_fetch(self) -> float:
        return (self.clock() - (self.fetched_ms or self.started_ms)) / 1000

    def seconds_out_of_group(self) -> float:
        since = self.out_of_group_since
        return 0.0 if since is None else (self.clock() - since) / 1000

    def health(self) -> tuple[bool, str]:
        """Whether the worker consumes (or has nothing to consume), and why not."""
        now, stall = self.clock(), self.stall_ms
        if self.stepped_ms is None:
            return False, "starting: the worker has not polled yet"
        if stall <= 0:
            return True, f"ok: {self.state} (kafka.stall_timeout_ms = 0: not judged)"
        limit = f"(kafka.stall_timeout_ms {stall})"
        if now - self.stepped_ms > stall:
            s = (now - self.stepped_ms) / 1000
            return False, f"the worker loop has not polled for {s:.0f} s {limit}"
        if self.unreachable_since is not None and now - self.unreachable_since > stall:
            s = (now - self.unreachable_since) / 1000
            return False, f"the broker has not answered for {s:.0f} s {limit}"
        found = self.problem()
        if found is not None and now - found[0] > stall:
            return False, f"{found[1]} {limit}"
        return True, f"ok: {self.state}, last fetch {self.seconds_since_fetch():.1f} s ago"


class GroupWatch:
    """The worker's side of liveness: feeds the rule from the consumer and the end offsets,
    keeps the lag metric (from the broker's end offsets: the consumer's highwater froze
    when nothing was fetched), and acts on the verdict."""

    def __init__(
        self,
        consumer: Any,
        log_end: LogEnd,
        metrics: Metrics,
        stall_timeout_ms: int,
        clock: Clock,
        probe: TopicPartition,
        positions: Any = None,
    ) -> None:
        """`probe`: a partition whose end offset says the broker answers when none is owned;
        `positions`: what gives the positions of records read (default: the consumer)."""
        self.consumer, self.log_end, self.metrics, self.probe = consumer, log_end, metrics, probe
        self.positions = consumer if positions is None else positions
        self.rule = Liveness(stall_timeout_ms, clock)
        metrics.watch(self.rule)

    def poll_timeout(self, timeout_ms: int) -> int:
        """Out of the group, a poll waits for the JoinGroup/SyncGroup answers."""
        return timeout_ms if self.rule.state == "stable" else max(timeout_ms, JOIN_POLL_MS)

    def polled(self, fetched: bool) -> None:
        if rearm_unobserved_join(self.consumer):
            self.metrics.labelled(self.metrics.forced_rejoins, "join_unobserved").inc()
            log.warning(
                "a group rebalance completed while no poll waited for it (kafka-python "
                "left the member rebalancing for good): rejoining"
            )
        self.rule.polled(group_state(self.consumer), fetched)

    def check(self, owned: set[TopicPartition], paused: set[TopicPartition]) -> None:
        """Every commit interval: lag, whether the worker starves, and the verdict; raises
        GroupStalledError when the rule says fail."""
        stable = self.rule.state == "stable"
        asked = sorted(owned) if stable and owned else [self.probe]
        ends = self.log_end.end_offsets(asked, "lag")
        behind = False
        if stable:
            for tp in owned:
                if tp not in ends:
                    continue
                try:
                    position = self.positions.position(tp, timeout_ms=LOG_END_TIMEOUT_MS)
                except KafkaError as exc:
                    self.log_end.on_error("lag", exc)
                    continue
                if position is None:
                    continue
                lag = ends[tp] - position
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    lag
                )
                behind = behind or (lag > 0 and tp not in paused)
        self.rule.checked(answered=bool(ends), behind=behind)
        self._act(self.rule.verdict())

    def _act(self, verdict: Verdict) -> None:
        stall = self.rule.stall_ms
        if verdict.action == "rejoin":
            reason = "out_of_group" if self.rule.out_of_group_since is not None else "starved"
            self.metrics.labelled(self.metrics.forced_rejoins, reason).inc()
            log.warning(
                "%s (kafka.stall_timeout_ms %d): rejoining the group", verdict.problem, stall
            )
            request_rejoin(self.consumer)
        elif verdict.action == "fail":
            raise GroupStalledError(
                f"{verdict.problem}, and still so {stall / 1000:g} s after rejoining the group "
                "(kafka.stall_timeout_ms): stopping so that a fresh worker takes over; the "
                "input is read again from the committed offsets"
            )
