"""Window progress stored in the committed offsets' metadata.

A committed offset alone cannot tell whoever re-reads the uncommitted records which of
them belong to windows that were already emitted (devices interleave in a partition).
So every commit carries, per partition, each device's boundary: all its windows ending
at or before it were emitted and acknowledged. Encoded as
`iotfuse/1:` + base64(zlib(JSON {device: boundary_ms})), within the broker's default
`offset.metadata.max.bytes` (4096): when a partition has too many devices to fit, the
devices with the oldest boundaries are left out (their re-read records are then
re-emitted: at-least-once, never lost) and a warning is logged.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib

log = logging.getLogger(__name__)

PREFIX = "iotfuse/1:"
MAX_METADATA_BYTES = 4000


def encode_progress(progress: dict[str, int], limit: int = MAX_METADATA_BYTES) -> str:
    items = sorted(progress.items(), key=lambda kv: kv[1], reverse=True)  # newest first
    keep = len(items)
    while True:
        body = json.dumps(dict(items[:keep]), separators=(",", ":")).encode()
        text = PREFIX + base64.b64encode(zlib.compress(body, 9)).decode()
        if len(text) <= limit or keep == 0:
            break
        keep = keep * 3 // 4
    if keep < len(items):
        log.warning("window progress of %d devices does not fit the offset metadata; "
                    "%d oldest left out (their re-read records may be re-emitted)",
                    len(items), len(items) - keep)
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
