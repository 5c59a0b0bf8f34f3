"""Every kafka-python client's settings, built from `[kafka]` in one place.

A security option (TLS, SASL) or a limit changes here once and reaches every client:

- `consumer_config`: one member of the workers' group, range assignor (co-partitioning),
  manual commits, read_committed, fetch limits that admit the contract's largest records;
- `rdkafka_fetch_config`: librdkafka fetching for the worker (`kafka.fetcher`);
- `offsets_config`: a group-less client asking only for log end offsets, on its own
  connection;
- `producer_config`: the worker's producer, idempotent, acks=all, transactional with
  `kafka.exactly_once`;
- `recorder_config`, `replayer_config`: `iotfuse record` and `iotfuse replay`;
- `incident_state_config`: the worker's reader of saved incident states;
- `admin_config`, `events_reader_config`: topic administration and the demo's reader.

`printable` is the only form in which a configuration may reach a log: secrets masked.

Every consumer's settings are built here, so building them also installs what every
consumer of the process needs from kafka-python beyond settings (`consumer_fixes`):
bounded decompression (pipeline/kafka/decompress.py) and resuming paused partitions
(pipeline/kafka/resume.py).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from kafka.coordinator.assignors.range import RangePartitionAssignor

from pipeline.kafka import decompress, resume
from pipeline.settings import MASK, KafkaSettings, Settings

TRANSACTION_TIMEOUT_MS = 30_000  # an exactly-once transaction open longer is aborted

# The largest record any client sends or fetches: an 8 MiB image plus headers, as a record
# or as a dead letter. One limit for the worker, the recorder and the replayer.
MAX_RECORD_BYTES = 10 * 1024 * 1024 + 512 * 1024

_SECRET_KEYS = (
    "sasl_plain_password",
    "ssl_password",
    "sasl_oauth_token_provider",
    "sasl.password",  # librdkafka's names
    "ssl.key.password",
)
# librdkafka fetches at most this much of one partition a request, so that each fetch
# mixes the partitions (its default, 1 MiB, handed each partition's backlog out in runs and
# the aligner waited on the topics not yet handed out); a larger first record comes whole
RD_PARTITION_FETCH_BYTES = 128 * 1024
RD_QUEUED_KBYTES = 16 * 1024  # records librdkafka fetches ahead of the worker, at most
# security_config's kafka-python names as librdkafka's
_RD_SECURITY_NAMES = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
}


def security_config(k: KafkaSettings) -> dict[str, Any]:
    """Security settings as kafka-python keyword arguments (empty ones left out)."""
    cfg: dict[str, Any] = {"security_protocol": k.security_protocol}
    optional = {
        "sasl_mechanism": k.sasl_mechanism,
        "sasl_plain_username": k.sasl_username,
        "sasl_plain_password": k.sasl_password,
        "ssl_cafile": k.ssl_cafile,
        "ssl_certfile": k.ssl_certfile,
        "ssl_keyfile": k.ssl_keyfile,
    }
    cfg.update({key: v for key, v in optional.items() if v})
    return cfg


def client_config(k: KafkaSettings, role: str) -> dict[str, Any]:
    """What every client shares: brokers, a client id naming its role, security."""
    return {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "client_id": f"{k.client_id}-{role}",
        # kafka-python backs off up to 30 s between reconnects (Java clients: 1 s): a
        # broker back after an outage went unnoticed for up to as long (issue 15, part 4)
        "reconnect_backoff_max_ms": 1000,
        **security_config(k),
    }


def consumer_fixes() -> None:
    """What every consumer needs beyond settings; installed once for the process."""
    decompress.install()
    resume.install()


def consumer_config(settings: Settings) -> dict[str, Any]:
    consumer_fixes()
    k = settings.kafka
    return {
        **client_config(k, "consumer"),
        "group_id": k.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # co-partitioning: partition i of every input topic goes to the same member
        "partition_assignment_strategy": (RangePartitionAssignor,),
        "fetch_max_bytes": k.fetch_max_bytes,
        "max_partition_fetch_bytes": MAX_RECORD_BYTES,
        "max_poll_records": k.max_poll_records,
        "session_timeout_ms": k.session_timeout_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "isolation_level": "read_committed",
        # refresh topic metadata every 30 s (default 5 min): a member that joined the group
        # on incomplete metadata rejoins soon, and added partitions are picked up
        "metadata_max_age_ms": 30_000,
    }


def rdkafka_fetch_config(settings: Settings, logger: Any = None) -> dict[str, Any]:
    """librdkafka's fetching consumer (`kafka.fetcher=librdkafka`, confluent-kafka): assign
    mode, never committing (the group id names no group it joins), read_committed, the
    contract's largest records, security as every other client's."""
    k = settings.kafka
    cfg: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "client.id": f"{k.client_id}-fetch",
        "group.id": k.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "max.partition.fetch.bytes": RD_PARTITION_FETCH_BYTES,
        "fetch.max.bytes": k.fetch_max_bytes,
        # a response: the fetch's limit, past which only a larger first record goes
        "receive.message.max.bytes": k.fetch_max_bytes + MAX_RECORD_BYTES + 1024 * 1024,
        "queued.max.messages.kbytes": RD_QUEUED_KBYTES,
        # that full, fetching waits this long before it tries again (librdkafka's default,
        # 1 s, left a worker draining a backlog idle a third of the time)
        "fetch.queue.backoff.ms": 10,
        "reconnect.backoff.max.ms": 1000,  # as every kafka-python client's
        "log.connection.close": False,
        **{_RD_SECURITY_NAMES[key]: v for key, v in security_config(k).items()},
    }
    if logger is not None:
        cfg["logger"] = logger
    return cfg


def offsets_config(settings: Settings) -> dict[str, Any]:
    """A group-less client that only asks for end offsets, on its own connection: on the
    consumer's it would queue behind the fetch in flight (a broker answers one request per
    connection at a time)."""
    consumer_fixes()
    return {
        **client_config(settings.kafka, "offsets"),
        "enable_auto_commit": False,
        "isolation_level": "read_committed",  # the consumer's: end offsets it can reach
        "metadata_max_age_ms": 30_000,  # added partitions, as the consumer
    }


def producer_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    cfg: dict[str, Any] = {
        **client_config(k, "producer"),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": MAX_RECORD_BYTES,
    }
    if k.exactly_once:
        cfg["transactional_id"] = transactional_id(k)
        cfg["transaction_timeout_ms"] = TRANSACTION_TIMEOUT_MS
    return cfg


def transactional_id(k: KafkaSettings) -> str:
    """The exactly-once producer's transactional id: set, or the group id and host name."""
    return k.transactional_id or f"{k.group_id}-{socket.gethostname()}"


def recorder_config(k: KafkaSettings) -> dict[str, Any]:
    """A group-less, never-committing consumer that admits the largest records."""
    consumer_fixes()
    return {
        **client_config(k, "recorder"),
        "group_id": None,
        "enable_auto_commit": False,
        # records deleted under us (retention): go on from the oldest left, not the end
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",  # aborted transactions are not part of a stream
        "fetch_max_bytes": max(k.fetch_max_bytes, MAX_RECORD_BYTES),
        "max_partition_fetch_bytes": MAX_RECORD_BYTES,
        "max_poll_records": k.max_poll_records,
    }


def replayer_config(k: KafkaSettings) -> dict[str, Any]:
    return {
        **client_config(k, "replayer"),
        "acks": "all",
        "enable_idempotence": True,  # retries keep per-partition order, no duplicates
        "linger_ms": 10,
        "batch_size": 1024 * 1024,  # images are tens of KB: batch many per request
        "max_request_size": MAX_RECORD_BYTES,
    }


def incident_state_config(k: KafkaSettings) -> dict[str, Any]:
    """The worker's reader of saved incident states (a compacted topic, read to its end
    after a restart or rebalance): the recorder's settings under their own name."""
    return {**recorder_config(k), "client_id": f"{k.client_id}-incident-state"}


def simulator_config(k: KafkaSettings) -> dict[str, Any]:
    """Simulated devices producing live: the replayer's settings under their own name."""
    return {**replayer_config(k), "client_id": f"{k.client_id}-simulator"}


def admin_config(
    bootstrap_servers: str, security: Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """An admin client's settings; `security` from `security_config` (None: plaintext)."""
    return {**(security or {}), **extra, "bootstrap_servers": bootstrap_servers}


def events_reader_config(k: KafkaSettings) -> dict[str, Any]:
    """A group-less reader of the events topic from its start (the demo follows it)."""
    consumer_fixes()
    return {
        **client_config(k, "events-reader"),
        "group_id": None,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
    }


def printable(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with every secret that is set masked: the only form fit for a log."""
    return {k: (MASK if k in _SECRET_KEYS and v else v) for k, v in config.items()}
