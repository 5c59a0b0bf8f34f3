"""`iotfuse federate simulate`: a whole federation on one machine, over the real protocol.

    summary = simulate(SimulateOptions(sites=4, data=(Path("train.iotrec"),),
                                       split="by-class-skew", out=Path("fed")), settings)

1. The recordings are dealt out to `sites` recordings (split.py) in out/sites/.
2. A real Flower server (server.py) listens on a free loopback port in this process; once
   it listens, each site starts as its own process, `iotfuse federate site` on its own
   recording (log in out/logs/site-<k>.log), exactly as a real site would run it.
3. The model goes to out/model/ (a model directory like train's); out/federation.json holds
   the rounds, the sites' class mix and where everything is.

A site process that exits before the federation ends stops it, naming the site and its log.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.errors import UserError
from pipeline.learn.federated.federation import ServerOptions
from pipeline.learn.federated.server import FederationSummary, run_server
from pipeline.learn.federated.split import SplitMode, split_recordings
from pipeline.settings import Settings


@dataclass(frozen=True, kw_only=True)
class SimulateOptions:
    server: ServerOptions  # its address is replaced by a free loopback port
    sites: int
    data: tuple[Path, ...]
    split: SplitMode = "by-device"
    alpha: float = 0.5  # by-class-skew: Dirichlet concentration (smaller: more skewed)
    seed: int = 0
    device: str = "cpu"
    site_threads: int = 1  # torch threads of each site process
    site_args: tuple[str, ...] = ()  # more `federate site` arguments (e.g. --dp-epsilon)

    @property
    def out(self) -> Path:
        return self.server.out.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SiteProcesses:
    """The site processes: started once the server listens, watched while it runs."""

    def __init__(self, commands: list[list[str]], logs: list[Path], port: int):
        self.commands, self.logs, self.port = commands, logs, port
        self.procs: list[subprocess.Popen[bytes]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._start, name="site-launcher", daemon=True)

    def _start(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.done.is_set():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        for command, log in zip(self.commands, self.logs, strict=True):
            if self.done.is_set():
                return
            with open(log, "wb") as f:
                self.procs.append(
                    subprocess.Popen(
                        command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
                )

    def failure(self) -> str | None:
        """A reason to stop: a site that exited with an error before the end."""
        for proc, log in zip(self.procs, self.logs, strict=False):
            code = proc.poll()
            if code not in (None, 0):
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                return f"site {log.stem} exited with code {code}: {tail[0]} (log {log})"
        return None

    def stop(self, timeout_s: float = 300.0) -> list[int | None]:
        """Wait for the sites to leave (the server ended the federation), killing those that
        do not (their code is then negative: the signal); returns their exit codes."""
        self.done.set()
        self.thread.join(timeout=5)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [p.returncode for p in self.procs]


def site_command(options: SimulateOptions, data: Path, name: str, port: int) -> list[str]:
    command = [sys.executable, "-m", "pipeline.cli", "federate", "site"]
    command += ["--server", f"127.0.0.1:{port}", "--data", str(data), "--name", name]
    command += [
        "--device",
        options.device,
        "--set",
        f"runtime.torch_threads={options.site_threads}",
    ]
    return command + list(options.site_args)


def simulate(
    options: SimulateOptions,
    settings: Settings,
    stream: TextIO | None = None,
    wrap: Callable[[Any], Any] | None = None,
) -> FederationSummary:
    out = options.out
    started = time.monotonic()
    if stream is not None:
        stream.write(
            f"federate simulate: dealing {len(options.data)} recording(s) to "
            f"{options.sites} sites ({options.split})\n"
        )
    paths = split_recordings(
        options.data,
        options.sites,
        options.split,
        out / "sites",
        settings,
        options.alpha,
        options.seed,
    )
    split_s = time.monotonic() - started
    port = free_port()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    names = [p.stem for p in paths]
    sites = SiteProcesses(
        [site_command(options, p, n, port) for p, n in zip(paths, names, strict=True)],
        [out / "logs" / f"{n}.log" for n in names],
        port,
    )
    server = dataclasses.replace(
        options.server, address=f"127.0.0.1:{port}", min_sites=options.sites
    )
    sites.thread.start()
    try:
        summary = run_server(server, settings, stream, wrap, abort=sites.failure)
    finally:
        codes = sites.stop()
    failed = [f"{n} (exit {c})" for n, c in zip(names, codes, strict=False) if c and c > 0]
    if failed:
        raise UserError(f"site process(es) {failed} failed; see {out / 'logs'}")
    slow = [n for n, c in zip(names, codes, strict=False) if c is not None and c < 0]
    if slow and stream is not None:  # the federation was over: the model is written
        stream.write(f"federate simulate: {slow} did not exit in time after the end; stopped\n")
    report = {
        "split": options.split,
        "alpha": options.alpha if options.split == "by-class-skew" else None,
        "site_recordings": {n: str(p) for n, p in zip(names, paths, strict=True)},
        "split_seconds": split_s,
        **_jsonable(summary),
    }
    (out / "federation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return summary


def _jsonable(summary: FederationSummary) -> dict[str, Any]:
    data = dataclasses.asdict(summary)
    data["out"] = str(summary.out)
    return data
