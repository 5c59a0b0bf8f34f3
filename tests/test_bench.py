"""The benchmarks stay runnable: mypy does not check bench/, and nothing else imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
