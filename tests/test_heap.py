"""The worker's heap trimming (pipeline/stream/heap.py): freed memory goes back to the system."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

from pipeline.stream.heap import HeapTrim, freeze_start_up
from pipeline.testing import FakeClock

# frame-sized arrays freed every other one, as decoded frames and batches are: glibc keeps
# the holes in its heap (a freed 16 MB array first raised its mmap threshold above them)
FRAGMENTED_HEAP = textwrap.dedent(
    """
    import os
    import numpy as np
    from pipeline.stream.heap import HeapTrim, freeze_start_up
    from pipeline.testing import FakeClock

    def rss_mib():
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    big = np.ones(2_000_000)
    del big
    blocks = [np.ones(900_000 // 8) for _ in range(300)]
    for i in range(0, 300, 2):
        blocks[i] = None
    clock = FakeClock()
    trim = HeapTrim(clock, every_ms=10_000)
    before = rss_mib()
    trim()  # not yet due
    clock.now += 10_000
    trim()
    print(before, rss_mib(), trim.trims)
    """
)


@pytest.mark.skipif(not HeapTrim(FakeClock()).available, reason="no glibc malloc_trim here")
def test_freed_frames_go_back_to_the_system() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    before, after, trims = out.stdout.split()
    assert int(trims) == 1
    assert float(before) - float(after) > 60  # of ~130 MiB of holes


def test_trims_at_most_once_an_interval() -> None:
    clock = FakeClock()
    trim = HeapTrim(clock, every_ms=1000)
    for _ in range(5):
        trim()
    clock.now += 999
    trim()
    assert trim.trims == 0
    clock.now += 1
    trim()
    trim()
    assert trim.trims == (1 if trim.available else 0)


def test_full_collections_walk_only_what_is_made_after_start_up() -> None:
    """A started worker's full collections walked every module and model object, and the
    windows closing meanwhile waited."""
    made_at_start_up = [{"a": 1}]
    try:
        freeze_start_up()
        made_later = [{"b": 2}]
        tracked = gc.get_objects()  # what a collection walks
        assert not any(o is made_at_start_up for o in tracked)
        assert any(o is made_later for o in tracked)
    finally:
        gc.unfreeze()
