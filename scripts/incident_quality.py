"""Incidents against the simulator's ground truth (issue 16): incidents opened per true
incident, and the median time to open, for the [incidents] defaults (or any rules) and,
with --sweep, a grid of rules around them.

    .venv/bin/python scripts/incident_quality.py                      # seed 1001, training setups
    .venv/bin/python scripts/incident_quality.py --seed 1002 --profile unseen
    .venv/bin/python scripts/incident_quality.py --sweep
    .venv/bin/python scripts/incident_quality.py --set incidents.open_k=1 --set incidents.open_n=1

The simulated devices go through the offline pipeline with the shipped model once; their
events are kept in build/incident-quality/ (delete it to recompute), so rules are compared
on the very same events. The figures are in docs/performance.md ("Incidents").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.incidents.quality import Quality, incident_quality  # noqa: E402
from pipeline.incidents.rules import ClassRule, IncidentRules  # noqa: E402
from pipeline.settings import Settings, load_settings, parse_assignments  # noqa: E402
from pipeline.simulate import ScenarioConfig, schedules, simulate  # noqa: E402

WINDOW_MS = 2000


def events_of(cfg: ScenarioConfig, cache: Path) -> list[dict[str, Any]]:
    """The events the shipped model gives the scenario (offline pipeline), cached."""
    if cache.exists():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    import torch

    from pipeline.stream.assembly import build_engine, run_offline
    from pipeline.stream.model_runner import ModelRunner

    torch.set_num_threads(1)
    s = Settings()
    s = replace(s, incidents=replace(s.incidents, enabled=False))
    runner = ModelRunner.load(None, "cpu")
    t0 = time.monotonic()
    events = [
        json.loads(o.value)
        for o in run_offline(build_engine(s, runner), simulate(cfg))
        if o.topic == s.topics.events and o.value is not None
    ]
    print(f"# {len(events)} events in {time.monotonic() - t0:.0f} s (offline, cached in {cache})")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps(e) + "\n" for e in events))
    return events


def line(name: str, q: Quality) -> str:
    return (
        f"{name:<34} {q.opened_per_true:>6.2f} {q.median_windows_to_open:>6.1f} "
        f"{q.median_seconds_to_open:>6.1f} {q.detected:>4}/{q.true_incidents:<4} "
        f"{q.false_opened:>5} {q.split:>5}"
    )


HEADER = (
    f"{'rules':<34} {'opened':>6} {'win':>6} {'sec':>6} {'detected':>9} {'false':>5} "
    f"{'split':>5}\n{'':<34} {'/true':>6} {'to open (median)':>13}"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=1001)
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--duration", type=float, default=300.0, help="seconds per device")
    p.add_argument("--profile", choices=("train", "unseen"), default="train")
    p.add_argument("--set", action="append", default=[], metavar="incidents.FIELD=VALUE")
    p.add_argument("--sweep", action="store_true", help="also a grid of rules")
    args = p.parse_args()
    cfg = ScenarioConfig(
        seed=args.seed, devices=args.devices, duration_s=args.duration, profile=args.profile
    )
    name = f"events-{args.profile}-{args.seed}-{args.devices}x{args.duration:g}.jsonl"
    events = events_of(cfg, ROOT / "build" / "incident-quality" / name)
    truth = schedules(cfg)
    settings = load_settings(None, environ={}, cli=parse_assignments(args.set))
    rules = IncidentRules.from_settings(settings.incidents, WINDOW_MS)
    q = incident_quality(events, truth, rules)
    windows = len(events)
    print(
        f"# {args.devices} devices x {args.duration:g} s, seed {args.seed}, {args.profile} "
        f"setups: {windows} windows, {q.true_incidents} true incidents"
    )
    print(
        f"# single-window label flicker: {q.blips} blips inside normal stretches, "
        f"{q.dips} dips inside true incidents"
    )
    print(HEADER)
    d = rules.default
    print(line(f"open {d.open} close {d.close} k{d.k}/n{d.n} m{d.m}", q))
    if args.sweep:
        rows = []
        grid = itertools.product(
            (0.4, 0.5, 0.6), (0.25, 0.35), ((1, 1), (2, 2), (2, 3), (3, 4)), (1, 2, 3)
        )
        for open_, close, (k, n), m in grid:
            r = replace(rules, default=ClassRule(open_, min(close, open_), k, n, m))
            rows.append(
                (f"open {open_} close {close} k{k}/n{n} m{m}", incident_quality(events, truth, r))
            )
        for label, rq in sorted(
            rows, key=lambda x: (x[1].opened_per_true, x[1].median_windows_to_open)
        ):
            print(line(label, rq))
    return 0


if __name__ == "__main__":
    sys.exit(main())
