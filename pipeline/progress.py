"""Window progress stored in the committed offsets' metadata.

A committed offset alone cannot tell whoever re-reads the uncommitted records which of
them belong to windows that were already emitted (devices interleave in a partition).
So every commit carries, per partition, each device's boundary: all its windows ending
at or before it were emitted and acknowledged. Encoded as
`iotfuse/1:` + base64(zlib(JSON {device: boundary_ms})), within the broker's default
`offset.metadata.max.bytes` (4096): when a partition has too many devices to fit, the
devices with the oldest boundaries are left out (their re-read records are then
re-emitted: at-least-once, never lost) and the worker warns once.
"""

from __future__ import annotations

import base64
import heapq
import json
import logging
import zlib
from collections.abc import Mapping
from operator import itemgetter

log = logging.getLogger(__name__)

PREFIX = "iotfuse/1:"
MAX_METADATA_BYTES = 4000
MAX_PROGRESS_DEVICES = 4096  # more never fit: of ids like "dev-0000001", ~1,100 do


def encode_progress(progress: Mapping[str, int], limit: int = MAX_METADATA_BYTES
                    ) -> tuple[str, int]:
    """The metadata text and how many devices it names: the newest boundaries first, as
    many as fit in `limit` characters. Only the newest MAX_PROGRESS_DEVICES are tried: a
    commit a second must not sort and serialise a whole fleet (100,000 devices: 1.9 s)."""
    items = heapq.nlargest(MAX_PROGRESS_DEVICES, progress.items(), key=itemgetter(1))
    keep = len(items)
    while True:
        body = json.dumps(dict(items[:keep]), separators=(",", ":")).encode()
        text = PREFIX + base64.b64encode(zlib.compress(body, 9)).decode()
        if len(text) <= limit or keep == 0:
            return text, keep
        keep = min(keep - 1, keep * limit * 9 // (len(text) * 10))  # size ~ devices


class ProgressMetadata:
    """A partition's progress -> its commit metadata; warns once when devices are left out."""

    def __init__(self) -> None:
        self._warned = False

    def __call__(self, partition: int, progress: Mapping[str, int]) -> str:
        text, kept = encode_progress(progress)
        if kept < len(progress) and not self._warned:
            self._warned = True
            log.warning("window progress of %d devices of partition %d does not fit the "
                        "offset metadata: the %d oldest are left out (their re-read records "
                        "may be re-emitted after a restart or rebalance)",
                        len(progress), partition, len(progress) - kept)
        return text


def decode_progress(metadata: str | None) -> dict[str, int]:
    if not metadata or not metadata.startswith(PREFIX):
        return {}
    try:
        data = json.loads(zlib.decompress(base64.b64decode(metadata[len(PREFIX):])))
    except (ValueError, zlib.error):
        log.warning("ignoring unreadable window progress in the committed offset metadata")
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}
