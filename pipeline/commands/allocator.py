"""Which malloc `iotfuse run` works on (`runtime.allocator`).

On glibc's malloc a worker's RSS held for minutes, then stepped up 70-150 MiB and stayed
there (a 10-minute soak: +2.2 MB/min); on jemalloc the same soak held flat (+0.00 MB/min),
at no latency cost (docs/performance.md, "Soak"). The docker images preload jemalloc. A pip
install gets it the same way, when the machine has it (Debian/Ubuntu: `libjemalloc2`):

    auto      jemalloc when the machine has it (the process starts again on it, same PID),
              else glibc's malloc, said in one warning line
    jemalloc  jemalloc or nothing: a machine without it is refused in one line
    system    whatever the process started with (LD_PRELOAD as the operator set it)

Only the `iotfuse` command itself starts again (cli.main called without arguments): a
program that calls `main([...])` in its own process keeps its allocator.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from glob import glob
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger("iotfuse.allocator")

CHOICES = ("auto", "jemalloc", "system")
# where Debian/Ubuntu (per architecture), the images and source builds put it
SEARCH = (
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/*-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)
RESTARTED = "_IOTFUSE_ALLOCATOR_RESTARTED"  # set on the restart: never a second one
INSTALL = "apt-get install libjemalloc2 (or your system's jemalloc package)"


@dataclass(frozen=True)
class Plan:
    preload: str | None = None  # start again with this library preloaded
    warning: str | None = None  # keep going on glibc's malloc, and say so
    error: str | None = None  # refuse to start


def find_jemalloc(patterns: tuple[str, ...] = SEARCH) -> str | None:
    for pattern in patterns:
        found = sorted(glob(pattern))
        if found:
            return found[0]
    return None


def loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """jemalloc is mapped into this process (preloaded, or linked)."""
    try:
        return "libjemalloc" in maps.read_text()
    except OSError:  # not Linux: nothing to tell
        return False


def plan(
    setting: str, on_jemalloc: bool, found: str | None, may_restart: bool, restarted: bool
) -> Plan:
    """What to do for `runtime.allocator=setting`, given whether jemalloc is in use now,
    where the machine has it, whether this process may start again (the iotfuse command)
    and whether it already did so for it."""
    if setting not in CHOICES:
        return Plan(error=f"runtime.allocator={setting!r}: use auto, jemalloc or system")
    if setting == "system" or on_jemalloc or (setting == "auto" and not may_restart):
        return Plan()  # auto in a program's own process: its allocator is its own choice
    if found is not None and may_restart and not restarted:
        return Plan(preload=found)
    if found is None:
        why, fix = "jemalloc is not installed", INSTALL
    elif restarted:
        why, fix = f"{found} did not load", f"check LD_PRELOAD={found} by hand"
    else:  # a program calling cli.main([...]) in its own process
        why, fix = "this process was not started on it", f"start it with LD_PRELOAD={found}"
    if setting == "jemalloc":
        return Plan(
            error=f"runtime.allocator=jemalloc but {why}; {fix}, or set "
            "runtime.allocator=auto to run on glibc's malloc"
        )
    return Plan(
        warning=f"allocating with glibc's malloc ({why}): under sustained load the worker's "
        f"memory creeps (docs/operations.md); {fix}"
    )


def choose(setting: str, may_restart: bool) -> None:
    """Apply `runtime.allocator` to this process: with `may_restart`, start it again on
    jemalloc (it does not return then); raise UserError, or log what it allocates with."""
    restarted = os.environ.pop(RESTARTED, None) is not None
    linux = sys.platform.startswith("linux")  # LD_PRELOAD and /proc: elsewhere, as started
    found = find_jemalloc() if linux else None
    got = plan(setting, loaded(), found, may_restart and linux, restarted)
    if got.error:
        raise UserError(got.error)
    if got.preload:
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(filter(None, [got.preload, env.get("LD_PRELOAD", "")]))
        env[RESTARTED] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    if got.warning:
        log.warning("%s", got.warning)
    elif loaded():
        log.info("allocating with jemalloc")
