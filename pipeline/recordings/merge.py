"""Records of several (topic, partition) streams in one timestamp order, memory bounded.

A recorder writes partitions in the order it fetched them, not in timestamp order; live
replay (pipeline/kafka/replay.py) and offline replay (offline.py) both merge them here
before anything else sees them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator

from pipeline.records import Record, record_size

_RECORD_OVERHEAD = 200  # bytes a buffered Record costs beyond its key, value and headers


def merge_by_time(blocks: Iterable[list[Record]], lookahead_bytes: int) -> Iterator[Record]:
    """Records in timestamp order across (topic, partition) streams, each stream in its
    file order, holding at most ~`lookahead_bytes` of records (plus one block).

    Exact when streams are skewed by less than the look-ahead in the file; a record found
    later than that comes out late (its timestamp behind ones already sent)."""
    queues: dict[tuple[str, int], deque[tuple[Record, int]]] = {}  # (record, buffered bytes)
    heads: list[tuple[int, int, tuple[str, int]]] = []  # (head timestamp, tie-break, stream)
    tie = itertools.count()
    source = iter(blocks)
    buffered = 0
    exhausted = False
    while True:
        while not exhausted and buffered < lookahead_bytes:
            block = next(source, None)
            if block is None:
                exhausted = True
                break
            for rec in block:
                stream = (rec.topic, rec.partition)
                queue = queues.setdefault(stream, deque())
                if not queue:
                    heapq.heappush(heads, (rec.timestamp_ms, next(tie), stream))
                cost = record_size(rec) + _RECORD_OVERHEAD
                queue.append((rec, cost))
                buffered += cost
        if not heads:
            return
        _, _, stream = heapq.heappop(heads)
        queue = queues[stream]
        rec, cost = queue.popleft()
        buffered -= cost
        if queue:
            heapq.heappush(heads, (queue[0][0].timestamp_ms, next(tie), stream))
        yield rec
