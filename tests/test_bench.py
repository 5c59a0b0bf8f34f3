"""The benchmarks stay runnable: mypy does not check bench/, and nothing else imports it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("pipeline_bench", "--bootstrap-servers"),
        ("explain_bench", "--live"),
        ("record_replay_bench", "--bootstrap-servers"),
        ("scale_bench", "--devices"),
        ("soak", "--minutes"),
        ("soak", "--iotfuse"),
        ("soak", "--warm-up"),
        ("outside", "--iotfuse"),
        ("client_bench", "--repeat"),
    ],
)
def test_a_benchmark_imports_and_parses_its_arguments(name: str, option: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert option in done.stdout


def test_the_scale_benchmark_runs_a_small_fleet() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "scale_bench.py"), "--devices", "300", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [row] = [line.split() for line in done.stdout.splitlines()[1:]]
    assert row[0] == "300" and row[-1] == "B"


@pytest.mark.kafka
@pytest.mark.slow
def test_the_outside_harness_sees_every_window_of_a_small_live_fleet(
    bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`iotfuse run` in its own process, 3 devices live for 10 s (warm-up included)."""
    monkeypatch.syspath_prepend(str(BENCH))
    outside = importlib.import_module("outside")
    out = outside.measure(bootstrap, devices=3, seconds=4, progress=lambda line: None)
    assert out.lost == [] and out.expected == 3 * 5 and out.duplicates == 0
    assert out.exit_code == 0 and out.late == 0
    assert out.latency_ms.size == out.expected and np.isfinite(out.latency_ms).all()
    # the fleet sends in real time: no window can close before its end + allowed lateness
    assert out.latency_ms.min() >= 0, out.latency_ms
    # measured from when each window could close (contract v1.1), as the fleet sent it
    assert (out.from_ready_ms >= 0).all() and (out.from_ready_ms <= out.latency_ms).all()
