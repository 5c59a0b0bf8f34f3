"""A real local Apache Kafka 4.x (KRaft, no Docker): one node or a 3-node cluster.

    with LocalKafka(nodes=3) as k:
        produce_to(k.bootstrap_servers)
        k.stop_node(1)  # fault tests
        k.start_node(1)

Every node is a combined broker+controller JVM on 127.0.0.1 with its own free ports, config,
data directory (all inside one temporary directory, removed on exit) and log file
(`log_tail()`). Readiness is polled with a deadline: the cluster is ready when every running
node accepts connections and the cluster metadata lists all of them as unfenced brokers.

The JVMs never outlive the Python process: `__exit__` stops them, so does a weakref
finalizer (which also runs at interpreter exit, through atexit), and on Linux the kernel
kills them when the process dies (see `runtime.spawn`).
"""

from __future__ import annotations

import base64
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient

from pipeline.kafka.admin import admin_client_or_none, unfenced_brokers
from pipeline.kafka.config import security_config
from pipeline.kafka.local import runtime, security
from pipeline.kafka.local.nodes import (
    HOST,
    SECURE_LISTENER,
    KafkaStartError,
    Node,
    format_storage,
    plan_nodes,
    write_configs,
)
from pipeline.kafka.local.runtime import KAFKA_VERSION, KafkaRuntime
from pipeline.kafka.local.security import (
    SecurityConfig,
    TlsFiles,
    broker_properties,
    write_tls_files,
)

__all__ = ["HOST", "KafkaStartError", "LocalKafka", "new_cluster_id"]
from pipeline.settings import KafkaSettings


class LocalKafka:
    """A local Kafka cluster of `nodes` (1 or 3) combined broker+controller JVMs.

    port: the first node's client port (the others get port+1, port+2); None picks free
    ports. heap: -Xmx per node (default 512m for one node, 384m each for three). log_dir:
    where node-<i>.log files go (kept after exit); None keeps them in the data directory.
    properties: server.properties entries that replace or add to ours on every node (e.g.
    ``{"auto.create.topics.enable": "false"}``, as in the docker stack). security: a
    secured cluster (pipeline/kafka/local/security.py): clients connect with TLS and
    SCRAM-SHA-512 (`client_settings(user)`), and only ACLs let a user other than the
    admin do anything.
    """

    def __init__(
        self,
        nodes: int = 1,
        port: int | None = None,
        heap: str | None = None,
        log_dir: str | Path | None = None,
        *,
        startup_timeout_s: float = 120.0,
        shutdown_timeout_s: float = 20.0,
        properties: Mapping[str, str] | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        if nodes not in (1, 3):
            raise ValueError(f"nodes must be 1 or 3, got {nodes}")
        self.nodes = nodes
        self.port = port
        self.heap = heap or ("512m" if nodes == 1 else "384m")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.properties = dict(properties or {})  # server.properties overrides, every node
        self.security = security
        self._tls: TlsFiles | None = None
        self.cluster_id = new_cluster_id()
        self._nodes: list[Node] = []
        self._root: Path | None = None
        self._runtime: KafkaRuntime | None = None
        self._finalizer: weakref.finalize[..., LocalKafka] | None = None

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Format and start all nodes; return once the cluster serves clients."""
        if self._finalizer is not None:
            raise RuntimeError("this LocalKafka was already started: create a new one")
        self._runtime = runtime.load_runtime()
        self._root = root = Path(tempfile.mkdtemp(prefix="iotfuse-kafka-"))
        self._finalizer = weakref.finalize(
            self, _shutdown, self._nodes, root, self.shutdown_timeout_s
        )
        try:
            self._nodes.extend(plan_nodes(self.nodes, self.port, root, self.log_dir or root))
            overrides = self.properties
            if self.security is not None:
                self._tls = write_tls_files(root / "tls")
                secured = broker_properties(self.security, self._tls, SECURE_LISTENER)
                overrides = {**secured, **self.properties}
            write_configs(self._nodes, root, overrides, self.security is not None)
            format_storage(self._runtime, self._nodes, self.cluster_id, root, self.security)
            for node in self._nodes:
                self._spawn(node)
            self._wait_ready(time.monotonic() + self.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every JVM (SIGTERM, then SIGKILL after the deadline) and delete the data."""
        if self._finalizer is not None:
            self._finalizer()

    def stop_node(self, index: int, *, kill: bool = False) -> None:
        """Stop node `index` (0-based): SIGTERM (controlled shutdown) or, with kill, SIGKILL."""
        node = self._nodes[index]
        if node.proc is not None and kill:
            runtime.send_signal(node.proc, signal.SIGKILL)
            node.proc.wait()
            _forget_process(node, exited_on_its_own=False)
        elif node.proc is not None:
            _stop_all([node], self.shutdown_timeout_s)

    def start_node(self, index: int) -> None:
        """Restart a stopped node on its old ports and data; wait until the cluster sees it."""
        node = self._nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            raise RuntimeError(f"node {index} is already running")
        if node.proc is not None:  # it died on its own
            _forget_process(node, exited_on_its_own=False)
        self._spawn(node)
        self._wait_ready(time.monotonic() + self.startup_timeout_s)

    @property
    def bootstrap_servers(self) -> str:
        if not self._nodes:
            raise RuntimeError("LocalKafka is not started: use it as a context manager")
        return ",".join(n.address for n in self._nodes)

    @property
    def ca_file(self) -> Path:
        """The PEM certificate of the CA that signed a secured cluster's certificates."""
        if self._tls is None:
            raise RuntimeError("only a started LocalKafka with security= has a CA")
        return self._tls.ca_cert

    def client_settings(self, user: str | None = None) -> dict[str, Any]:
        """`[kafka]` settings (KafkaSettings field -> value) that connect to this cluster:
        its bootstrap servers and, when secured, TLS trusting its CA and SCRAM-SHA-512 as
        `user` (default: the admin)."""
        ca = self._tls.ca_cert if self._tls is not None else None
        return security.client_settings(self.security, ca, self.bootstrap_servers, user)

    def admin_security(self) -> dict[str, Any]:
        """The admin's kafka-python security options (`security_config`)."""
        return security_config(KafkaSettings(**self.client_settings()))

    def allow(self, user: str, grants: Iterable[tuple[str, str, str]]) -> None:
        """Create ACLs allowing `user` each (resource type, name, operation) of `grants`,
        e.g. ("topic", "iot.camera", "read"), ("group", "iotfuse", "read")."""
        security.create_acls(self.bootstrap_servers, self.admin_security(), user, grants)

    @property
    def data_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("LocalKafka is not started: use it as a context manager")
        return self._root

    @property
    def pids(self) -> tuple[int, ...]:
        """Process ids of the JVMs running now."""
        return tuple(
            n.proc.pid for n in self._nodes if n.proc is not None and n.proc.poll() is None
        )

    @property
    def started_pids(self) -> tuple[int, ...]:
        """Process ids of every broker JVM this instance ever started (restarts included)."""
        return tuple(pid for n in self._nodes for pid in n.started_pids)

    @property
    def log_files(self) -> tuple[Path, ...]:
        return tuple(n.log_file for n in self._nodes)

    def log_tail(self, lines: int = 50) -> str:
        """The last `lines` lines of every node's log (and of the JVM's own output)."""
        parts: list[str] = []
        for node in self._nodes:
            for path in (node.log_file, node.out_file):
                text = runtime.tail(path, lines)
                if text or path == node.log_file:
                    parts.append(f"===== node {node.index} (id {node.node_id}): {path} =====")
                    parts.append(text or "(empty or removed)")
        return "\n".join(parts)

    def _spawn(self, node: Node) -> None:
        assert self._runtime is not None and self._root is not None
        first = node.index == 0 and not node.started_pids  # one JVM writes the class archive
        dump = self._runtime.archive_dump_target() if first else None
        cmd = [
            *self._runtime.java_command(self.heap, self._root / "log4j2.properties", node.log_file),
            *([f"-XX:ArchiveClassesAtExit={dump}"] if dump else []),
            f"-XX:ErrorFile={node.home}/hs_err_pid%p.log",
            "-XX:+ExitOnOutOfMemoryError",
            "kafka.Kafka",
            str(node.home / "server.properties"),
        ]
        with open(node.out_file, "ab") as out:
            node.proc = runtime.spawn(cmd, cwd=node.home, stdout=out.fileno())
        node.started_pids.append(node.proc.pid)
        node.archive_dump = dump

    def _wait_ready(self, deadline: float) -> None:
        admin: KafkaAdminClient | None = None
        try:
            while True:
                running = self._running_or_raise()
                if all(runtime.accepts_connections(HOST, n.port) for n in running):
                    admin = admin or admin_client_or_none(
                        self.bootstrap_servers, self.admin_security()
                    )
                    wanted = {n.node_id for n in running}
                    if admin is not None and unfenced_brokers(admin) >= wanted:
                        return
                if time.monotonic() > deadline:
                    raise KafkaStartError(
                        f"local Kafka ({self.nodes} node(s)) not ready after "
                        f"{self.startup_timeout_s:.0f}s; raise startup_timeout_s on a slow "
                        f"machine. Log tail:\n{self.log_tail()}"
                    )
                try:  # the poll interval, cut short if the JVM dies
                    running[0].proc.wait(timeout=0.2)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if admin is not None:
                admin.close()

    def _running_or_raise(self) -> list[Node]:
        """The nodes that should run; raise with the log tail if one exited."""
        started = [n for n in self._nodes if n.proc is not None]
        for node in started:
            code = node.proc.poll() if node.proc is not None else None
            if code is not None:
                _forget_process(node, exited_on_its_own=False)
                raise KafkaStartError(
                    f"Kafka node {node.index} exited with code {code} while starting (Kafka "
                    f"{KAFKA_VERSION}, {self._runtime.java if self._runtime else 'java'}). "
                    f"Log tail:\n{self.log_tail()}"
                )
        return started


def new_cluster_id() -> str:
    """22-char URL-safe base64 of a random UUID, never starting with '-' (like Kafka's Uuid)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # would read as an option on a command line
            return text


# -- module helpers (none refers to LocalKafka: the finalizer must not keep it alive) ----------


def _shutdown(nodes: list[Node], root: Path, timeout_s: float) -> None:
    _stop_all(nodes, timeout_s)
    shutil.rmtree(root, ignore_errors=True)


def _stop_all(nodes: Sequence[Node], timeout_s: float) -> None:
    running = [n for n in nodes if n.proc is not None]
    procs = [n.proc for n in running if n.proc is not None]
    for node, on_its_own in zip(running, runtime.stop(procs, timeout_s), strict=True):
        _forget_process(node, on_its_own)


def _forget_process(node: Node, exited_on_its_own: bool) -> None:
    node.proc = None
    if node.archive_dump is not None:
        runtime.publish_archive(node.archive_dump, complete=exited_on_its_own)
        node.archive_dump = None
