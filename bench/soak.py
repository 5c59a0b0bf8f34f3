"""Soak (issue 15, part 6): a real `iotfuse run` at half load for minutes; does it stay the same?

    .venv/bin/python bench/soak.py --devices 100 --minutes 10 [--model DIR] [--iotfuse PATH]

bench/outside.py for `--minutes` (the worker in its own process, latency from when a window
can close to its event reaching a consumer, RSS sampled every 10 s), with the soak's targets:
RSS slope <= 1 MB/min after the warm-up and its first half minute, no late records, and the
last minute's p99 no worse than the first minute's (within 25 % or 50 ms). Each line says
PASS or FAIL; the exit status is 1 if any fails, or if an event is lost or the worker does not
exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from outside import Outcome, arguments, heading, measure, with_broker

MAX_SLOPE = 1.0  # MB/min
P99_SLACK, P99_SLACK_MS = 1.25, 50.0  # last minute's p99 within 25 % or 50 ms of the first's


def targets(out: Outcome) -> list[tuple[bool, str]]:
    """(met, line) for each of the soak's targets."""
    first, last = (float(np.percentile(p, 99)) if p.size else np.nan for p in (out.first, out.last))
    allowed = max(first * P99_SLACK, first + P99_SLACK_MS)
    return [
        (
            out.slope <= MAX_SLOPE,
            f"RSS slope {out.slope:+.2f} MB/min (target <= {MAX_SLOPE:.0f})",
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
    a = p.parse_args()
    seconds = int(a.minutes * 60) // 2 * 2  # whole windows
    if seconds <= 0:
        p.error(f"--minutes must give at least 2 s: got {a.minutes}")

    def job(bootstrap: str) -> Outcome:
        return measure(bootstrap, a.devices, seconds, a.model, a.iotfuse)

    out = with_broker(a.bootstrap_servers, job)
    results = targets(out)
    print(f"soak: {heading(a, seconds)}", *out.lines(), sep="\n")
    for met, line in results:
        print(f"  {'PASS' if met else 'FAIL'} {line}")
    return 0 if all(met for met, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
