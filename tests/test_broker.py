"""The local Kafka broker: real records round-trip, clean shutdown, survival of a node loss."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.local.broker import KafkaStartError, LocalKafka
from tests.kafka_util import wait_until

pytestmark = pytest.mark.kafka

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def read_all(
    bootstrap: str,
    topic: str,
    partitions: int,
    until: Callable[[list[Any]], bool],
    timeout_s: float = 30.0,
) -> list[Any]:
    """Every record of `topic` from the beginning, polling until `until(records)` holds."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=16 << 20
    )
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not until(records):
            assert time.monotonic() < deadline, f"read only {len(records)} records from {topic}"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def test_round_trip_keeps_keys_headers_and_timestamps(bootstrap: str, topics: TopicNames) -> None:
    sent: list[dict[str, Any]] = [
        dict(
            key=b"cell-07",
            value=b"\xff\xd8jpeg-bytes\x00",
            timestamp_ms=T0_MS,
            headers=[("content-type", b"image/jpeg"), ("trace", b"\x00\x01")],
        ),
        dict(
            key=b"cell-08",
            value=b"",
            timestamp_ms=T0_MS + 1,
            headers=[("dup", b"first"), ("dup", b"second"), ("empty", b"")],
        ),
        dict(key=b"cell-07", value=b"x" * 100_000, timestamp_ms=T0_MS + 2_000, headers=[]),
        dict(key=None, value=b"keyless", timestamp_ms=T0_MS - 86_400_000, headers=[]),
    ]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topics.camera, **record) for record in sent]
        acks = [f.get(timeout=30) for f in futures]
    finally:
        producer.close()
    assert [a.timestamp for a in acks] == [r["timestamp_ms"] for r in sent]
    assert acks[0].partition == acks[2].partition  # same key, same partition

    got = read_all(bootstrap, topics.camera, 3, lambda rs: len(rs) >= len(sent))
    by_position = {(r.partition, r.offset): r for r in got}
    assert len(got) == len(sent)
    for record, ack in zip(sent, acks, strict=True):
        received = by_position[(ack.partition, ack.offset)]
        assert received.key == record["key"]
        assert received.value == record["value"]
        assert received.timestamp == record["timestamp_ms"]
        assert received.timestamp_type == 0  # CreateTime: the producer's event time is kept
        assert [(k, v) for k, v in received.headers] == record["headers"]


def test_exit_stops_the_jvm_and_deletes_the_data(jvm_alive: Callable[[int], bool]) -> None:
    with LocalKafka(nodes=1) as broker:
        pids, data_dir = broker.pids, broker.data_dir
        assert len(pids) == 1 and all(jvm_alive(p) for p in pids)
        assert (data_dir / "node-0" / "data" / "meta.properties").is_file()
    assert not any(jvm_alive(p) for p in pids)
    assert not data_dir.exists()


def test_jvm_dies_with_its_parent_process(tmp_path: Path, jvm_alive: Callable[[int], bool]) -> None:
    script = (
        "import sys\n"
        "from pipeline.kafka.local.broker import LocalKafka\n"
        "k = LocalKafka(nodes=1); k.start()\n"
        "print(k.pids[0], k.data_dir, flush=True)\n"
        "sys.stdin.read()\n"  # block until the test kills us
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    line = ""
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line, "the child process did not start a broker"
        pid_text, data_dir = line.split(maxsplit=1)
        pid = int(pid_text)
        assert jvm_alive(pid)
        child.send_signal(signal.SIGKILL)  # no atexit, no finalizer: only PDEATHSIG remains
        child.wait(timeout=10)
        wait_until(lambda: not jvm_alive(pid), 10, f"JVM {pid} to die with its parent")
    finally:
        child.kill()
        child.wait()
        if line:
            shutil.rmtree(data_dir.strip(), ignore_errors=True)


def kafka_pids_using(directory: Path) -> list[int]:
    """Pids of the Kafka JVMs whose command line names `directory` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if b"kafka.Kafka" in text and str(directory).encode() in text:
            found.append(int(cmdline.parent.name))
    return found


def test_run_foreground_serves_until_sigterm(jvm_alive: Callable[[int], bool]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "from pipeline.commands.infra import run_foreground\n"
        f"raise SystemExit(run_foreground(1, {port}))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("bootstrap.servers="):
            lines.append(child.stdout.readline())
        assert lines[-1] == f"bootstrap.servers=127.0.0.1:{port}\n", lines
        logs = re.search(r"logs: (\S+?node-0\.log)", child.stdout.readline())
        assert logs, "the human-readable line names the log file"
        data_dir = Path(logs.group(1)).parent
        pids = kafka_pids_using(data_dir)
        assert len(pids) == 1 and jvm_alive(pids[0])
        with KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}") as admin:
            assert [b["port"] for b in admin.describe_cluster()["brokers"]] == [port]

        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
        assert "stopping" in child.stdout.read()
        assert not jvm_alive(pids[0]) and not data_dir.exists()
    finally:
        child.kill()
        child.wait()


def test_a_jvm_that_exits_early_raises_with_its_output(jvm_alive: Callable[[int], bool]) -> None:
    broker = LocalKafka(nodes=1, heap="1m")  # the JVM refuses to start with a 1 MiB heap
    with pytest.raises(KafkaStartError) as failure:
        broker.start()
    assert "exited with code" in str(failure.value)
    assert "heap" in str(failure.value).lower()  # the JVM's own message is in the error
    assert not any(jvm_alive(p) for p in broker.started_pids)
    assert not broker.data_dir.exists()


def test_a_port_in_use_is_reported() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KafkaStartError, match=f"port {port} .* not free"):
            LocalKafka(nodes=1, port=port).start()


def leader_of(bootstrap: str, topic: str, partition: int, timeout_s: float = 30.0) -> int:
    """The partition's leader, waiting (with a deadline) until metadata names one: right
    after creation a describe can list the topic without that partition yet."""
    deadline = time.monotonic() + timeout_s
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        while True:
            (described,) = admin.describe_topics([topic])
            leaders = [
                int(p["leader_id"])
                for p in described["partitions"]
                if p["partition_index"] == partition and int(p["leader_id"]) >= 0
            ]
            if leaders:
                return leaders[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}[{partition}] has no leader after {timeout_s} s")


def topic_config(bootstrap: str, topic: str, key: str) -> str:
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, [key])
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        described = admin.describe_configs([resource], config_filter="all")
    return str(described["topic"][topic][key]["value"])


@pytest.mark.slow
def test_three_node_cluster_loses_no_acknowledged_write(
    tmp_path: Path,
    jvm_alive: Callable[[int], bool],
    show_broker_logs: Callable[[LocalKafka], LocalKafka],
) -> None:
    with show_broker_logs(LocalKafka(nodes=3, log_dir=tmp_path)) as cluster:
        bootstrap = cluster.bootstrap_servers
        names = TopicNames.prefixed(f"fault-{uuid.uuid4().hex[:8]}")
        ensure_topics(bootstrap, names, partitions=3, replication_factor=3, min_insync_replicas=2)
        assert topic_config(bootstrap, names.telemetry, "min.insync.replicas") == "2"
        victim = leader_of(bootstrap, names.telemetry, 0) - 1  # node index of a leader

        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            request_timeout_ms=10_000,
            delivery_timeout_ms=60_000,
        )
        try:
            futures: list[Any] = []
            for i in range(600):
                if i == 300:
                    futures[99].get(timeout=30)  # the stream flows: some writes acknowledged,
                    cluster.stop_node(victim, kill=True)  # later ones in flight: crash a leader
                key = f"dev-{i % 12}".encode()
                futures.append(producer.send(names.telemetry, key=key, value=str(i).encode()))
            producer.flush(timeout=60)
            acks = [f.get(timeout=60) for f in futures]  # raises if any write was not acked
        finally:
            producer.close()
        assert len(cluster.pids) == 2  # all of that was acknowledged by the two survivors

        expected = {(a.partition, a.offset): str(i).encode() for i, a in enumerate(acks)}
        got = read_all(
            bootstrap,
            names.telemetry,
            3,
            lambda rs: {(r.partition, r.offset) for r in rs} >= expected.keys(),
        )
        read = {(r.partition, r.offset): r.value for r in got}
        assert {pos: read[pos] for pos in expected} == expected  # nothing lost or altered

        cluster.start_node(victim)  # it rejoins on its old data
        assert len(cluster.pids) == 3
        pids, data_dir = cluster.started_pids, cluster.data_dir
    assert len(pids) == 4 and not any(jvm_alive(p) for p in pids)
    assert not data_dir.exists()
    assert os.path.getsize(tmp_path / "node-0.log") > 0  # logs kept in log_dir
