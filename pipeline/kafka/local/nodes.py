"""The nodes of a local Kafka cluster before they run: ports, directories, each node's
server.properties (plaintext, or secured: pipeline/kafka/local/security.py) and the
formatted storage. `LocalKafka` (broker.py) starts and stops their JVMs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pipeline.kafka.local import runtime
from pipeline.kafka.local.runtime import KafkaRuntime
from pipeline.kafka.local.security import SecurityConfig, scram_format_args

HOST = "127.0.0.1"
SECURE_LISTENER = "SASL_SSL"  # a secured cluster's client listener, named after its protocol


class KafkaStartError(RuntimeError):
    """A local broker did not start (its log tail is part of the message)."""


@dataclass(slots=True)
class Node:
    index: int  # 0-based position in the cluster; node.id is index + 1
    port: int  # the client listener (PLAINTEXT, or SASL_SSL when secured)
    controller_port: int
    home: Path  # server.properties and the data directory
    log_file: Path  # log4j output
    out_file: Path  # the JVM's own stdout/stderr (crashes, bad flags)
    proc: subprocess.Popen[bytes] | None = None
    started_pids: list[int] = field(default_factory=list)
    archive_dump: Path | None = None  # class archive this JVM writes at exit

    @property
    def node_id(self) -> int:
        return self.index + 1

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def plan_nodes(count: int, port: int | None, root: Path, logs: Path) -> list[Node]:
    """Ports (picked before any config is written), directories and log files."""
    if port is not None:
        client_ports = [port + i for i in range(count)]
        for p in client_ports:
            if not runtime.port_is_free(HOST, p):
                raise KafkaStartError(
                    f"port {p} on {HOST} is not free: choose another --port or omit it to use "
                    "free ports"
                )
        controller_ports = runtime.free_ports(HOST, count, exclude=set(client_ports))
    else:
        ports = runtime.free_ports(HOST, 2 * count, exclude=set())
        client_ports, controller_ports = ports[:count], ports[count:]
    logs.mkdir(parents=True, exist_ok=True)
    homes = [root / f"node-{i}" for i in range(count)]
    files = [(logs / f"node-{i}.log", logs / f"node-{i}.out") for i in range(count)]
    return [
        Node(i, client_ports[i], controller_ports[i], homes[i], *files[i]) for i in range(count)
    ]


def write_configs(
    nodes: Sequence[Node], root: Path, overrides: Mapping[str, str], secured: bool
) -> None:
    template = resources.files(__package__).joinpath("log4j2.properties").read_text()
    (root / "log4j2.properties").write_text(template)
    for node in nodes:
        (node.home / "data").mkdir(parents=True)
        props = {**server_properties(node, nodes, secured), **overrides}
        path = node.home / "server.properties"
        path.touch(mode=0o600)  # a secured cluster's keys and admin password are in it
        path.write_text("".join(f"{k}={escape(v)}\n" for k, v in props.items()))


def escape(value: str) -> str:
    """A value as a Java properties file reads it back (PEM strings span lines)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def server_properties(node: Node, nodes: Sequence[Node], secured: bool) -> dict[str, str]:
    single = len(nodes) == 1
    replicas, min_isr = ("1", "1") if single else ("3", "2")
    voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in nodes)
    quorum = (
        {"controller.quorum.bootstrap.servers": f"{HOST}:{node.controller_port}"}  # --standalone
        if single
        else {"controller.quorum.voters": voters}  # a static quorum: every node is a voter
    )
    client = SECURE_LISTENER if secured else "PLAINTEXT"  # listener named after its protocol
    return {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "listeners": f"{client}://{node.address},CONTROLLER://{HOST}:{node.controller_port}",
        "advertised.listeners": f"{client}://{node.address}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": client,
        "listener.security.protocol.map": f"{client}:{client},CONTROLLER:PLAINTEXT",
        **quorum,
        "log.dirs": str(node.home / "data"),
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "offsets.topic.num.partitions": "10",  # 50 by default: a slow first group join
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "10",
        "group.initial.rebalance.delay.ms": "0",
        # a local broker replays and simulates streams stamped in the past: keep them all
        # (the default 7-day retention deletes such records within seconds of producing)
        "log.retention.ms": "-1",
        "broker.heartbeat.interval.ms": "500",  # notice a dead node in 3 s, not 9 s
        "broker.session.timeout.ms": "3000",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
    }


def format_storage(
    rt: KafkaRuntime,
    nodes: Sequence[Node],
    cluster_id: str,
    root: Path,
    security: SecurityConfig | None,
) -> None:
    """kafka.tools.StorageTool format for every node, in parallel (with the SCRAM users of
    a secured cluster: the brokers need the admin's before they can talk to each other)."""
    base = [
        *rt.java_command("256m", root / "log4j2.properties", root / "format.log"),
        "kafka.tools.StorageTool",
        "format",
        f"--cluster-id={cluster_id}",
        *(["--standalone"] if len(nodes) == 1 else []),
        *(scram_format_args(security) if security is not None else []),
    ]
    procs = [
        runtime.spawn([*base, "-c", str(n.home / "server.properties")], n.home, subprocess.PIPE)
        for n in nodes
    ]
    failures = []
    try:
        for node, proc in zip(nodes, procs, strict=True):
            output, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                text = output.decode(errors="replace")[-3000:]
                failures.append(f"node {node.index}: exit {proc.returncode}\n{text}")
    finally:
        runtime.stop([p for p in procs if p.poll() is None], timeout_s=0)  # on timeout/interrupt
    if failures:
        raise KafkaStartError("formatting the Kafka storage failed:\n" + "\n".join(failures))
