"""The benchmarks stay runnable: mypy does not check bench/, and nothing else imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("name", ["pipeline_bench", "record_replay_bench"])
def test_a_benchmark_imports_and_parses_its_arguments(name: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--bootstrap-servers" in done.stdout
