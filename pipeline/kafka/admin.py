"""Topic administration: the contract's topics, created idempotently and co-partitioned.

The three input topics and the labels topic must have the same partition count (a device's
records of every modality land on the same partition number); `ensure_topics` refuses to
leave them otherwise. The camera and dead-letter topics accept records of up to 10 MiB
(8 MiB images plus headers; dead letters carry the original value).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kafka.errors as errors
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType

from pipeline.clock import Clock, wall_clock_ms
from pipeline.errors import UserError
from pipeline.kafka.access import check_worker_access
from pipeline.kafka.config import admin_config, security_config, transactional_id
from pipeline.kafka.probe import check_connection
from pipeline.settings import KafkaSettings, Settings, TopicSettings

log = logging.getLogger(__name__)

LARGE_RECORD_BYTES = 10_485_760  # max.message.bytes of the camera and dead-letter topics
# the incident state topic: compacted, in segments small enough to be compacted soon (the
# open segment never is), so a restart reads little more than one state per device
STATE_TOPIC_CONFIGS = {
    "cleanup.policy": "compact",
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.1",
}


class TopicLayoutError(RuntimeError):
    """Topics are missing or not co-partitioned."""


@dataclass(frozen=True, slots=True)
class TopicNames:
    camera: str = "iot.camera"
    audio: str = "iot.audio"
    telemetry: str = "iot.telemetry"
    labels: str = "iot.labels"
    events: str = "iot.events"
    deadletter: str = "iot.deadletter"
    incidents: str = "iot.incidents"
    incident_state: str = "iot.incident-state"  # compacted: each device's incident state

    @classmethod
    def prefixed(cls, prefix: str) -> TopicNames:
        """`<prefix>.camera`, `<prefix>.audio`, ... (e.g. one set of topics per test)."""
        return cls(
            *(
                f"{prefix}.{role}"
                for role in (
                    "camera",
                    "audio",
                    "telemetry",
                    "labels",
                    "events",
                    "deadletter",
                    "incidents",
                    "incident-state",
                )
            )
        )

    @classmethod
    def from_settings(cls, topics: TopicSettings) -> TopicNames:
        """The names configured in `[topics]` (pipeline/settings.py)."""
        return cls(
            topics.camera,
            topics.audio,
            topics.telemetry,
            topics.labels,
            topics.events,
            topics.deadletter,
            topics.incidents,
            topics.incident_state,
        )

    @property
    def inputs(self) -> tuple[str, str, str]:
        return (self.camera, self.audio, self.telemetry)

    @property
    def copartitioned(self) -> tuple[str, ...]:
        """The topics that must share one partition count: the inputs and the labels."""
        return (*self.inputs, self.labels)

    @property
    def all(self) -> tuple[str, ...]:
        return (
            *self.copartitioned,
            self.events,
            self.deadletter,
            self.incidents,
            self.incident_state,
        )


def ensure_topics(
    bootstrap_servers: str,
    names: TopicNames,
    partitions: int,
    replication_factor: int,
    *,
    min_insync_replicas: int | None = None,
    client_config: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create the missing topics of `names`; return once every partition has a leader.

    Existing topics are kept as they are (configs included). Raises TopicLayoutError if an
    existing input or labels topic has a partition count other than `partitions`.
    """
    if partitions < 1 or replication_factor < 1:
        raise ValueError(
            f"partitions and replication_factor must be >= 1, got "
            f"{partitions} and {replication_factor}"
        )
    with _admin(bootstrap_servers, client_config) as admin:
        existing = _partition_counts(admin, names.all)
        _require_layout(names, existing, partitions)
        missing = [t for t in names.all if t not in existing]
        if missing:
            specs = {
                t: _topic_spec(t, names, partitions, replication_factor, min_insync_replicas)
                for t in missing
            }
            _create(admin, specs)
        admin.wait_for_topics(list(names.all), timeout_ms=int(timeout_s * 1000))
        # someone may have created a topic between our describe and create, with other counts
        _require_layout(names, _partition_counts(admin, names.all), partitions)


def check_copartitioned(
    bootstrap_servers: str,
    topics: Sequence[str] | TopicNames,
    *,
    client_config: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Partition count of each topic (TopicNames: inputs and labels); raise unless all equal."""
    wanted = list(topics.copartitioned if isinstance(topics, TopicNames) else topics)
    with _admin(bootstrap_servers, client_config) as admin:
        counts = _partition_counts(admin, wanted)
    absent = [t for t in wanted if t not in counts]
    if absent:
        raise TopicLayoutError(
            f"topics {', '.join(absent)} do not exist: create them (e.g. `ensure_topics`) "
            "before starting producers or the pipeline"
        )
    if len(set(counts.values())) > 1:
        raise TopicLayoutError(
            f"topics are not co-partitioned ({_describe(counts)}): the input and labels topics "
            "need one partition count so that a device's records share a partition number"
        )
    return counts


def _require_layout(names: TopicNames, existing: Mapping[str, int], partitions: int) -> None:
    copart = {t: existing[t] for t in names.copartitioned if t in existing}
    if any(count != partitions for count in copart.values()):
        raise TopicLayoutError(
            f"existing topics do not match the requested {partitions} partitions "
            f"({_describe(copart)}); the input and labels topics must be co-partitioned. Pass "
            f"the partition count they already have, or delete and recreate them (adding "
            f"partitions later moves keys to other partitions)"
        )


def _describe(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{t}: {n} partitions" for t, n in counts.items())


def _topic_spec(
    topic: str,
    names: TopicNames,
    partitions: int,
    replication_factor: int,
    min_insync_replicas: int | None,
) -> dict[str, Any]:
    configs: dict[str, str] = {}
    if topic in (names.camera, names.deadletter):
        configs["max.message.bytes"] = str(LARGE_RECORD_BYTES)
    if topic == names.incident_state:  # the latest state per device is what counts
        configs.update(STATE_TOPIC_CONFIGS)
    if min_insync_replicas is not None:
        configs["min.insync.replicas"] = str(min_insync_replicas)
    return {
        "num_partitions": partitions,
        "replication_factor": replication_factor,
        "configs": configs,
    }


def _create(admin: KafkaAdminClient, specs: dict[str, dict[str, Any]]) -> None:
    """Create topics; one that appeared meanwhile (TopicAlreadyExists) is fine."""
    result = admin.create_topics(specs, raise_errors=False)
    failed = []
    for topic in result["topics"]:
        error = errors.for_code(int(topic["error_code"]))
        if error not in (errors.NoError, errors.TopicAlreadyExistsError):
            failed.append(f"{topic['name']}: {error.__name__}: {topic.get('error_message')}")
    if failed:
        raise TopicLayoutError("could not create topics: " + "; ".join(failed))


def _partition_counts(admin: KafkaAdminClient, topics: Sequence[str]) -> dict[str, int]:
    """Partition count of each existing topic among `topics` (absent ones are left out)."""
    counts: dict[str, int] = {}
    for topic in admin.describe_topics(list(topics)):
        error = errors.for_code(int(topic["error_code"]))
        if error is errors.UnknownTopicOrPartitionError:
            continue
        if error is errors.TopicAuthorizationFailedError:
            raise error(str(topic["name"]))  # named as such by pipeline/kafka/errors.py
        if error is not errors.NoError:
            raise TopicLayoutError(f"cannot describe topic {topic['name']}: {error.__name__}")
        counts[str(topic["name"])] = len(topic["partitions"])
    return counts


def _admin(bootstrap_servers: str, security: Mapping[str, Any] | None) -> KafkaAdminClient:
    """An admin client, once a first connection showed that TLS and SASL work (a wrong
    password or certificate is a UserError within seconds, not a 30 s bootstrap timeout)."""
    check_connection(bootstrap_servers, security or {})
    return KafkaAdminClient(**admin_config(bootstrap_servers, security))


def open_admin(kafka: KafkaSettings) -> KafkaAdminClient:
    """An admin client with the `[kafka]` connection settings (see `_admin`)."""
    return _admin(kafka.bootstrap_servers, security_config(kafka))


def admin_client_or_none(
    bootstrap_servers: str, security: Mapping[str, Any] | None = None
) -> KafkaAdminClient | None:
    """An admin client, or None while no broker answers (for polling a starting cluster)."""
    try:
        return KafkaAdminClient(
            **admin_config(
                bootstrap_servers, security, bootstrap_timeout_ms=3000, request_timeout_ms=5000
            )
        )
    except Exception:  # not serving yet: callers poll again
        return None


def unfenced_brokers(admin: KafkaAdminClient) -> set[int]:
    """Ids of the brokers the cluster metadata lists as registered and unfenced (none when
    the cluster does not answer)."""
    try:
        cluster = admin.describe_cluster()
    except Exception:  # not answering (yet): callers poll
        return set()
    return {int(b["broker_id"]) for b in cluster["brokers"] if not b.get("is_fenced", False)}


def max_message_bytes(admin: KafkaAdminClient, topic: str) -> int:
    """The largest record batch `topic` accepts (its `max.message.bytes`, or the broker's
    default when the topic sets none). Raises KafkaError when it cannot be read (no
    DescribeConfigs permission, no such topic, no broker)."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, ["max.message.bytes"])
    described = admin.describe_configs([resource], config_filter="all")
    try:
        return int(described["topic"][topic]["max.message.bytes"]["value"])
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.KafkaError(f"no max.message.bytes in {described!r}") from exc


def prepare_outputs(settings: Settings, clock: Clock = wall_clock_ms) -> int | None:
    """Before `run` starts its clients: check the connection (`_admin`) and the worker's
    ACLs (`check_worker_access`: a missing one is a UserError at start, not a consumer
    waiting for topics "to exist" or a producer failing at its first dead letter); wait
    (up to `kafka.topic_wait_ms`) for the events and dead-letter topics to exist unless
    the broker creates topics on first use; then return the dead-letter topic's
    `max_message_bytes` (None, with a warning, when unknown).

    Without this, a missing output topic on a broker with `auto.create.topics.enable=false`
    (the docker stack's) held the first send for the producer's 60 s `max_block_ms`, and
    then stopped the worker with "Failed to update metadata", naming no topic.
    """
    k, t = settings.kafka, settings.topics
    with open_admin(k) as admin:
        tid = transactional_id(k) if k.exactly_once else None
        check_worker_access(admin, settings, security_config(k), tid)
        outputs = [t.events, t.deadletter]
        outputs += [t.incidents, t.incident_state] if settings.incidents.enabled else []
        _await_outputs(admin, outputs, k.topic_wait_ms, clock)
        try:
            return max_message_bytes(admin, t.deadletter)
        except errors.KafkaError as exc:
            log.warning(
                "cannot read max.message.bytes of %s (%r): dead letters are cut to what "
                "the producer sends, and one the topic refuses below that would stop "
                "the worker. Allow DescribeConfigs on it, or create it with "
                "`iotfuse topics`",
                t.deadletter,
                exc,
            )
            return None


def _await_outputs(admin: KafkaAdminClient, topics: list[str], wait_ms: int, clock: Clock) -> None:
    deadline = clock() + wait_ms
    missing = _missing(admin, topics)
    if not missing:
        return
    creates = auto_creates_topics(admin)  # a static broker config: read once
    if creates is not False:
        log.info(
            "output topics %s do not exist yet: %s",
            ", ".join(missing),
            "the broker creates them on first use, with its default partition count"
            if creates
            else "the broker's auto.create.topics.enable is unknown",
        )
        return
    while missing:
        if clock() >= deadline:
            raise UserError(
                f"output topics {', '.join(missing)} do not exist on "
                f"{admin.config['bootstrap_servers']} and the broker does not create topics "
                f"(auto.create.topics.enable=false; waited {wait_ms} ms): create them with "
                "`iotfuse topics` or check [topics]"
            )
        log.info("waiting for output topics to exist: %s", ", ".join(missing))
        time.sleep(0.5)  # retry backoff while the topics are created
        missing = _missing(admin, topics)


def _missing(admin: KafkaAdminClient, topics: list[str]) -> list[str]:
    """The topics the cluster does not have; none when it cannot be asked (the worker then
    starts as it would without the check, and the producer reports what fails)."""
    try:
        counts = _partition_counts(admin, topics)
    except (TopicLayoutError, errors.KafkaError) as exc:
        log.warning("cannot check that the output topics %s exist: %r", ", ".join(topics), exc)
        return []
    return [name for name in topics if name not in counts]


def auto_creates_topics(admin: KafkaAdminClient) -> bool | None:
    """The cluster's `auto.create.topics.enable` (read from one broker); None when it cannot
    be read (no DescribeConfigs permission on the cluster)."""
    try:
        broker = str(admin.describe_cluster()["brokers"][0]["broker_id"])
        resource = ConfigResource(ConfigResourceType.BROKER, broker, ["auto.create.topics.enable"])
        described = admin.describe_configs([resource], config_filter="all")
        return str(described["broker"][broker]["auto.create.topics.enable"]["value"]) == "true"
    except (errors.KafkaError, KeyError, IndexError, TypeError) as exc:
        log.debug("cannot read auto.create.topics.enable: %r", exc)
        return None


def await_input_topics(
    consumer: KafkaConsumer, topics: list[str], wait_ms: int, clock: Clock = wall_clock_ms
) -> None:
    """Wait until the broker knows every input topic, co-partitioned, before joining the group.

    Joining first would let the group's range assignor see a topic without partitions and
    leave it unassigned until the next metadata refresh; a missing topic would only show
    as a worker that never consumes anything.
    """
    deadline = clock() + wait_ms
    while True:
        counts = {t: len(consumer.partitions_for_topic(t)) for t in topics}
        missing = [t for t, n in counts.items() if n == 0]
        if not missing:
            break
        if clock() >= deadline:
            raise UserError(
                f"input topics {', '.join(missing)} do not exist on "
                f"{consumer.config['bootstrap_servers']} (waited {wait_ms} ms): create them "
                "with `iotfuse topics` or check [topics] and --bootstrap-servers"
            )
        log.info("waiting for input topics to exist: %s", ", ".join(missing))
        time.sleep(0.5)  # retry backoff while the topics are created
    if len(set(counts.values())) > 1:
        raise UserError(
            "input topics are not co-partitioned ("
            + ", ".join(f"{t}: {n}" for t, n in counts.items())
            + "): a device's records must share a partition number; recreate them with one "
            "partition count (`iotfuse topics --partitions N`)"
        )
