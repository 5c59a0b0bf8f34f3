"""`runtime.allocator`: `iotfuse run` allocates with jemalloc where the machine has it.

On glibc's malloc a worker's RSS crept under sustained load; on jemalloc it held flat
(docs/performance.md, "Soak"). The docker images preload it; a pip install now gets it from
the command itself, which starts again on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.commands.allocator import choose, find_jemalloc, loaded, plan
from pipeline.errors import UserError

JEMALLOC = find_jemalloc()
IOTFUSE = Path(sys.executable).with_name("iotfuse")
NEEDS_JEMALLOC = pytest.mark.skipif(
    JEMALLOC is None, reason="libjemalloc2 is not installed (.ci/run installs it)"
)


def test_auto_starts_the_command_again_on_jemalloc_once() -> None:
    assert plan("auto", False, "/lib/j.so", True, False).preload == "/lib/j.so"
    again = plan("auto", False, "/lib/j.so", True, True)  # started again, still not on it
    assert again.preload is None and again.error is None
    assert again.warning is not None and "/lib/j.so did not load" in again.warning
    assert plan("auto", True, "/lib/j.so", True, False) == plan("system", False, None, True, False)


def test_without_jemalloc_auto_warns_and_jemalloc_refuses() -> None:
    warned = plan("auto", False, None, True, False)
    assert warned.preload is None and warned.error is None
    assert warned.warning is not None and "apt-get install libjemalloc2" in warned.warning
    refused = plan("jemalloc", False, None, True, False).error
    assert refused is not None and "apt-get install libjemalloc2" in refused
    assert "'mimalloc'" in str(plan("mimalloc", True, "/lib/j.so", True, False).error)


def test_a_program_calling_main_keeps_its_own_allocator() -> None:
    assert plan("auto", False, "/lib/j.so", False, False).preload is None
    assert plan("auto", False, "/lib/j.so", False, False).warning is None
    refused = plan("jemalloc", False, "/lib/j.so", False, False).error
    assert refused is not None and "LD_PRELOAD=/lib/j.so" in refused


def test_finds_the_library_and_reads_the_memory_map(tmp_path: Path) -> None:
    lib = tmp_path / "x86_64-linux-gnu" / "libjemalloc.so.2"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    assert find_jemalloc((str(tmp_path / "none.so"), str(tmp_path / "*/libjemalloc.so.2"))) == (
        str(lib)
    )
    assert find_jemalloc((str(tmp_path / "none.so"),)) is None
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 fd:01 42 /usr/lib/libjemalloc.so.2\n")
    assert loaded(maps)
    maps.write_text("7f00-7f01 r-xp 00000000 fd:01 42 /usr/lib/libc.so.6\n")
    assert not loaded(maps)
    assert not loaded(tmp_path / "absent")


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`iotfuse run` on a model directory that does not exist: it gets as far as loading
    the model (after choosing its allocator), then exits 1 in one line."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("IOTFUSE_")}
    base.pop("LD_PRELOAD", None)
    return subprocess.run(
        [str(IOTFUSE), "run", "--model", "/nonexistent/model", "--metrics-port", "0"],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@NEEDS_JEMALLOC
def test_the_iotfuse_command_runs_on_jemalloc() -> None:
    got = _run({})
    assert got.returncode == 1
    assert "allocating with jemalloc" in got.stderr
    assert got.stderr.count("loading the model") == 1  # started again once, before the work
    assert got.stderr.strip().splitlines()[-1].startswith("iotfuse run: no iotfuse model at")


@NEEDS_JEMALLOC
def test_system_keeps_glibc_malloc() -> None:
    got = _run({"IOTFUSE_RUNTIME__ALLOCATOR": "system"})
    assert got.returncode == 1
    assert "jemalloc" not in got.stderr


def test_a_bad_setting_is_one_line() -> None:
    got = _run({"IOTFUSE_RUNTIME__ALLOCATOR": "mimalloc"})
    assert got.returncode == 1
    assert got.stderr.strip() == (
        "iotfuse run: runtime.allocator='mimalloc': use auto, jemalloc or system"
    )


def test_main_called_in_a_process_does_not_start_it_again() -> None:
    assert main(["run", "--model", "/nonexistent/model", "--metrics-port", "0"]) == 1
    assert main(["run", "--set", "runtime.allocator=bogus", "--metrics-port", "0"]) == 1


def test_elsewhere_than_linux_auto_keeps_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr("pipeline.commands.allocator.loaded", lambda: False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("started again off Linux"))
    choose("auto", may_restart=True)  # returns: no restart, nothing to refuse
    with pytest.raises(UserError, match="runtime.allocator=jemalloc"):
        choose("jemalloc", may_restart=True)
