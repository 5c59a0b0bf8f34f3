"""Soak (issue 15, part 6): a real `iotfuse run` at half load for minutes; does it stay the same?

    .venv/bin/python bench/soak.py --devices 100 --minutes 10 [--warm-up 5] [--model DIR]
    IOTFUSE_RUNTIME__ALLOCATOR=system .venv/bin/python bench/soak.py ...
        # glibc's malloc: `iotfuse run` otherwise runs on jemalloc where the machine has
        # it, as the docker images do (docs/performance.md, "Soak")

bench/outside.py for `--warm-up` then `--minutes` minutes (the worker in its own process,
latency from when a window can close to its event reaching a consumer, RSS sampled every
10 s), with the soak's targets over the `--minutes` after the warm-up: RSS slope <= 1 MB/min,
no late records, and the last minute's p99 no worse than the first minute's (within 25 % or
50 ms). Each line says PASS or FAIL; the exit status is 1 if any fails, or if an event is
lost or the worker does not exit 0 on SIGTERM.

The warm-up (default 5 minutes) is the time a fresh worker's RSS takes to settle: in three
10-minute runs at 100 devices it grew +13 MB/min for the first 4-5 minutes (the allocator's
arenas and the runtime's caches reaching their working size), then stayed within +-3 MB/min
(docs/performance.md). A leak keeps growing after it; that is what the slope is for.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from outside import Outcome, arguments, heading, measure, with_broker

MAX_SLOPE = 1.0  # MB/min
P99_SLACK, P99_SLACK_MS = 1.25, 50.0  # last minute's p99 within 25 % or 50 ms of the first's


def targets(out: Outcome, warm_up_s: float) -> list[tuple[bool, str]]:
    """(met, line) for each of the soak's targets, over the run after `warm_up_s`."""
    first_minute = out.part(warm_up_s, warm_up_s + 60)
    first, last = (
        float(np.percentile(p, 99)) if p.size else np.nan for p in (first_minute, out.last)
    )
    allowed = max(first * P99_SLACK, first + P99_SLACK_MS)
    slope = out.slope_after(warm_up_s)
    rss = [m for _, m in out.rss_after(warm_up_s)] or [np.nan]
    return [
        (
            slope <= MAX_SLOPE,
            f"RSS slope {slope:+.2f} MB/min after the warm-up, {min(rss):.0f}-{max(rss):.0f} "
            f"MiB (target <= {MAX_SLOPE:.0f})",
        ),
        (out.late == 0, f"late records {out.late:.0f} (target 0)"),
        (
            last <= allowed,
            f"p99 last minute {last:.0f} ms, first {first:.0f} ms (target <= {allowed:.0f} ms)",
        ),
        (not out.lost, f"events lost {len(out.lost)} of {out.expected} (target 0)"),
        (out.exit_code == 0, f"worker exit on SIGTERM {out.exit_code} (target 0)"),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments(p)
    p.set_defaults(devices=100)  # half load of the e2e figure
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    p.add_argument(
        "--warm-up", type=float, default=5.0, help="minutes before it, not judged (module doc)"
    )
    a = p.parse_args()
    warm_up_s = int(a.warm_up * 60) // 2 * 2
    seconds = warm_up_s + int(a.minutes * 60) // 2 * 2  # whole windows
    if seconds - warm_up_s <= 0 or warm_up_s < 0:
        p.error(f"--minutes must give at least 2 s: got {a.minutes}; --warm-up >= 0")

    def job(bootstrap: str) -> Outcome:
        return measure(bootstrap, a.devices, seconds, a.model, a.iotfuse)

    out = with_broker(a.bootstrap_servers, job)
    results = targets(out, warm_up_s)
    print(f"soak: {heading(a, seconds, out)}", *out.lines(), sep="\n")
    for met, line in results:
        print(f"  {'PASS' if met else 'FAIL'} {line}")
    return 0 if all(met for met, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
