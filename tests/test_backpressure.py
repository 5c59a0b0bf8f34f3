"""The back-pressure rule (pipeline/stream/backpressure.py), branch by branch."""

from __future__ import annotations

import pytest

from pipeline.stream.backpressure import Decision, Flow, Limits, Load, decide

LIMITS = Limits(max_open_windows=10, max_buffered_bytes=1000)
UNDER = Load(open_windows=9, buffered_bytes=999, queued_windows=3, released_records=5)
OVER = Load(open_windows=12, buffered_bytes=0, queued_windows=0, released_records=0)
QUEUED = Load(open_windows=12, buffered_bytes=0, queued_windows=1, released_records=0)
RELEASED = Load(open_windows=12, buffered_bytes=0, queued_windows=0, released_records=1)


@pytest.mark.parametrize(
    ("load", "over"),
    [
        (Load(9, 999, 0, 0), False),
        (Load(10, 0, 0, 0), True),  # at the limit is over it
        (Load(0, 1000, 0, 0), True),  # either limit
        (Load(11, 2000, 0, 0), True),
    ],
)
def test_a_load_is_over_the_limits_at_or_past_either(load: Load, over: bool) -> None:
    assert load.over(LIMITS) is over


@pytest.mark.parametrize("previous", list(Flow))
def test_under_the_limits_it_reads_whatever_came_before(previous: Flow) -> None:
    d = decide(previous, UNDER, LIMITS)
    assert d == Decision(Flow.READING, previous)
    assert not d.pause and not d.pause_started and not d.over_capacity_started


@pytest.mark.parametrize("load", [QUEUED, RELEASED], ids=["windows queued", "records released"])
def test_over_the_limits_it_pauses_while_windows_can_close_without_input(load: Load) -> None:
    assert load.can_close_windows
    d = decide(Flow.READING, load, LIMITS)
    assert d.flow is Flow.PAUSED and d.pause and d.pause_started
    assert not d.over_capacity_started


def test_a_pause_goes_on_while_windows_can_close_and_starts_only_once() -> None:
    d = decide(Flow.PAUSED, QUEUED, LIMITS)
    assert d.flow is Flow.PAUSED and d.pause and not d.pause_started


@pytest.mark.parametrize("previous", [Flow.READING, Flow.PAUSED])
def test_over_the_limits_it_reads_on_and_warns_when_windows_need_more_input(
    previous: Flow,
) -> None:
    assert not OVER.can_close_windows
    d = decide(previous, OVER, LIMITS)
    assert d.flow is Flow.OVER_CAPACITY and not d.pause and d.over_capacity_started


@pytest.mark.parametrize("load", [OVER, QUEUED, RELEASED])
def test_reading_on_over_capacity_neither_pauses_nor_warns_again_until_under_the_limits(
    load: Load,
) -> None:
    d = decide(Flow.OVER_CAPACITY, load, LIMITS)
    assert d.flow is Flow.OVER_CAPACITY
    assert not d.pause and not d.pause_started and not d.over_capacity_started


def test_an_episode_ends_under_the_limits_and_the_next_one_pauses_again() -> None:
    flows = [Flow.READING]
    for load in (RELEASED, RELEASED, OVER, RELEASED, OVER, UNDER, RELEASED):
        flows.append(decide(flows[-1], load, LIMITS).flow)
    assert flows[1:] == [
        Flow.PAUSED,
        Flow.PAUSED,
        Flow.OVER_CAPACITY,  # nothing released: windows close only with more input
        Flow.OVER_CAPACITY,  # records released again, but the episode reads on
        Flow.OVER_CAPACITY,
        Flow.READING,
        Flow.PAUSED,  # a new episode
    ]
