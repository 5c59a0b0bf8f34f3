"""The kafka-python clients of `iotfuse run`: their settings, and records as we hold them.

- consumer: one member of the workers' group, range assignor (co-partitioning), manual
  commits, read_committed, fetch limits that admit the contract's largest images;
- offsets: a group-less client asking only for log end offsets, on its own connection;
- producer: idempotent, acks=all, transactional with `kafka.exactly_once`.
"""

from __future__ import annotations

import socket
from typing import Any

from kafka.coordinator.assignors.range import RangePartitionAssignor

from pipeline.records import Record
from pipeline.settings import Settings

MAX_REQUEST_BYTES = 10 * 1024 * 1024 + 512 * 1024  # an 8 MiB image + headers as a dead letter


def _client(settings: Settings, role: str) -> dict[str, Any]:
    """What every client of the worker shares: brokers, a client id, security settings."""
    k = settings.kafka
    return {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "client_id": f"{k.client_id}-{role}",
        **k.client_config(),
    }


def consumer_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    return {
        **_client(settings, "consumer"),
        "group_id": k.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # co-partitioning: partition i of every input topic goes to the same member
        "partition_assignment_strategy": (RangePartitionAssignor,),
        "fetch_max_bytes": k.fetch_max_bytes,
        "max_partition_fetch_bytes": MAX_REQUEST_BYTES,
        "max_poll_records": k.max_poll_records,
        "session_timeout_ms": k.session_timeout_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "isolation_level": "read_committed",
        # refresh topic metadata every 30 s (default 5 min): a member that joined the group
        # on incomplete metadata rejoins soon, and added partitions are picked up
        "metadata_max_age_ms": 30_000,
    }


def offsets_config(settings: Settings) -> dict[str, Any]:
    """A group-less client that only asks for end offsets, on its own connection: on the
    consumer's it would queue behind the fetch in flight (a broker answers one request per
    connection at a time), 60 ms a call while draining a backlog."""
    return {
        **_client(settings, "offsets"),
        "enable_auto_commit": False,
        "isolation_level": "read_committed",  # the consumer's: end offsets it can reach
        "metadata_max_age_ms": 30_000,  # added partitions, as the consumer
    }


def producer_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    cfg: dict[str, Any] = {
        **_client(settings, "producer"),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": MAX_REQUEST_BYTES,
    }
    if k.exactly_once:
        cfg["transactional_id"] = k.transactional_id or f"{k.group_id}-{socket.gethostname()}"
        cfg["transaction_timeout_ms"] = 30000
    return cfg


def to_record(msg: Any) -> Record:
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        timestamp_ms=int(msg.timestamp),
        key=msg.key,
        value=msg.value,
        headers=tuple((str(k), bytes(v) if v is not None else b"") for k, v in msg.headers or ()),
    )
