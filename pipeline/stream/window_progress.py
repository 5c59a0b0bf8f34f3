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
from collections.abc import Collection, Iterable, Mapping
from operator import itemgetter

log = logging.getLogger(__name__)

PREFIX = "iotfuse/1:"
MAX_METADATA_BYTES = 4000
MAX_PROGRESS_DEVICES = 4096  # more never fit: of ids like "dev-0000001", ~1,100 do


def encode_progress(
    progress: Mapping[str, int], limit: int = MAX_METADATA_BYTES
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


class DeviceProgress:
    """What the commits carry: per partition and device, the boundary before which every
    window was emitted. Kept up to date as windows close (`note`), so that a commit a second
    need not visit every device of a large fleet (100,000: 0.2 s). Also the boundaries taken
    over from a previous owner (`resume`), below which re-read records are skipped."""

    def __init__(self) -> None:
        self._held: dict[int, dict[str, int]] = {}  # partition -> device -> boundary
        self._resumed: dict[str, int] = {}  # device -> windows before this were emitted

    def of(self, partition: int) -> dict[str, int]:
        return dict(self._held.get(partition, {}))

    def note(self, partition: int, device: str, until: int) -> None:
        self._held.setdefault(partition, {})[device] = until

    def resume(self, partition: int, progress: Mapping[str, int]) -> list[tuple[str, int]]:
        """Take over `progress`; the boundaries stay in this partition's progress, so that a
        commit made before those devices are heard from again still carries them. Returns
        the devices whose resumed boundary moved forward, with it."""
        held = self._held.setdefault(partition, {})
        moved = []
        for device, until in progress.items():
            if until > self._resumed.get(device, until - 1):
                self._resumed[device] = until
                moved.append((device, until))
            if until > held.get(device, until - 1):
                held[device] = until
        return moved

    def already_emitted(self, device: str, window_start_ms: int) -> bool:
        until = self._resumed.get(device)
        return until is not None and window_start_ms < until

    def revoke(self, partitions: Iterable[int], devices: Iterable[str]) -> None:
        for device in devices:
            self._resumed.pop(device, None)
        for partition in partitions:
            self._held.pop(partition, None)

    def forget(self, devices: Iterable[str], active: Collection[str]) -> None:
        """Devices long silent: their progress stays (a record of theirs may still be
        re-read after a restart, while another device's open window holds the commit back),
        but only the `active` devices' and the newest MAX_PROGRESS_DEVICES others' (no more
        are ever committed)."""
        for device in devices:
            self._resumed.pop(device, None)
        for partition, held in self._held.items():
            if len(held) > 2 * (MAX_PROGRESS_DEVICES + len(active)):
                newest = set(heapq.nlargest(MAX_PROGRESS_DEVICES, held, key=held.__getitem__))
                self._held[partition] = {
                    d: until for d, until in held.items() if d in newest or d in active
                }


class ProgressMetadata:
    """A partition's progress -> its commit metadata; warns once when devices are left out."""

    def __init__(self) -> None:
        self._warned = False

    def __call__(self, partition: int, progress: Mapping[str, int]) -> str:
        text, kept = encode_progress(progress)
        if kept < len(progress) and not self._warned:
            self._warned = True
            log.warning(
                "window progress of %d devices of partition %d does not fit the "
                "offset metadata: the %d oldest are left out (their re-read records "
                "may be re-emitted after a restart or rebalance)",
                len(progress),
                partition,
                len(progress) - kept,
            )
        return text


def decode_progress(metadata: str | None) -> dict[str, int]:
    if not metadata or not metadata.startswith(PREFIX):
        return {}
    try:
        data = json.loads(zlib.decompress(base64.b64decode(metadata[len(PREFIX) :])))
    except (ValueError, zlib.error):
        log.warning("ignoring unreadable window progress in the committed offset metadata")
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}
