"""What this client may do on the cluster, checked once at start against the broker's ACLs.

A missing ACL otherwise shows late and in disguise: a consumer not allowed to read a topic
sees no partitions and waits for it "to exist", a producer not allowed to write fails at
its first record (for the dead-letter topic: the first bad record, maybe hours later).
`check_topic_access` asks the broker which operations this principal holds on each topic
(the metadata's authorized operations, KIP-430) and names what is missing, at once;
`check_worker_access` adds the worker's consumer group and transactional id (a principal
allowed nothing on them is refused when it looks up their coordinator).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

import kafka.errors as errors
from kafka import KafkaAdminClient

from pipeline.errors import UserError
from pipeline.settings import Settings, TopicSettings

log = logging.getLogger(__name__)

Operation = Literal["READ", "WRITE"]
# an ACL to allow: resource type (topic, group, transactional_id, cluster), name, operation
# (read, write, create, describe, describe_configs, idempotent_write, ...)
Grant = tuple[str, str, str]


def principal(security: Mapping[str, Any]) -> str:
    """Who the broker sees, as ACLs name it (for messages)."""
    protocol = str(security.get("security_protocol", "PLAINTEXT")).upper()
    if protocol.startswith("SASL_"):
        return f"User:{security.get('sasl_plain_username') or '?'}"
    if protocol == "SSL" and security.get("ssl_certfile"):
        return "the principal of the certificate in kafka.ssl_certfile"
    return "User:ANONYMOUS"


def check_topic_access(
    admin: KafkaAdminClient,
    needs: Mapping[str, Operation | tuple[Operation, ...]],
    security: Mapping[str, Any],
) -> None:
    """Raise UserError naming every topic of `needs` (topic -> operation or operations)
    that this client may not use so. A topic that does not exist is left to the caller (it
    reports missing topics better); a broker that reports no authorized operations passes."""
    denied: dict[Operation, list[str]] = {}
    for desc in admin.describe_topics(list(needs)):
        name = str(desc["name"])
        wanted = needs[name]
        ops = wanted if isinstance(wanted, tuple) else (wanted,)
        error = errors.for_code(int(desc["error_code"]))
        granted = desc.get("authorized_operations")
        if error is errors.TopicAuthorizationFailedError:  # not even Describe
            lacking = list(ops)
        elif error is errors.NoError and granted is not None:
            lacking = [op for op in ops if op not in granted]
        else:  # no such topic, or no answer about operations
            continue
        for op in lacking:
            denied.setdefault(op, []).append(name)
    if denied:
        who = principal(security)
        name = who if who.startswith("User:") else "PRINCIPAL"
        missing = "; ".join(f"{op} on topic {', '.join(names)}" for op, names in denied.items())
        raise UserError(
            f"{who} lacks ACLs at {servers(admin.config['bootstrap_servers'])}: {missing}. "
            f"Ask a Kafka admin to allow them (kafka-acls --add --allow-principal {name} "
            "--operation OP --topic TOPIC; what each command needs: docs/operations.md, "
            "Secured Kafka)"
        )


def worker_grants(settings: Settings, tid: str | None) -> list[Grant]:
    """The ACLs `iotfuse run` needs (`tid`: its transactional id, exactly-once): what
    docs/operations.md (Secured Kafka) lists and `check_worker_access` checks."""
    t, k = settings.topics, settings.kafka
    grants = [("topic", name, "read") for name in (t.camera, t.audio, t.telemetry)]
    grants += [("topic", t.events, "write"), ("topic", t.deadletter, "write")]
    grants.append(("topic", t.deadletter, "describe_configs"))  # its max.message.bytes
    if settings.incidents.enabled:  # incidents out; device states saved and read back
        grants += [("topic", t.incidents, "write"), ("topic", t.incident_state, "write")]
        grants.append(("topic", t.incident_state, "read"))
    grants.append(("group", k.group_id, "read"))
    if tid is not None:
        grants.append(("transactional_id", tid, "write"))
    return grants


def every_command_grants(settings: Settings, tid: str | None) -> list[Grant]:
    """The ACLs to run every iotfuse command on the configured topics: the worker's
    (`worker_grants`), Create and Describe on every contract topic (`iotfuse topics`),
    Write on the inputs and labels (`simulate`, `replay`), Read on all (`record`)."""
    t = settings.topics
    fields = dataclasses.fields(TopicSettings)
    names = [getattr(t, f.name) for f in fields if isinstance(getattr(t, f.name), str)]
    grants = worker_grants(settings, tid)
    grants += [("topic", name, op) for name in names for op in ("create", "describe", "read")]
    grants += [("topic", name, "write") for name in (t.camera, t.audio, t.telemetry, t.labels)]
    return list(dict.fromkeys(grants))


def check_worker_access(
    admin: KafkaAdminClient, settings: Settings, security: Mapping[str, Any], tid: str | None
) -> None:
    """What `iotfuse run` needs: Read on the input topics, Write on the events and
    dead-letter topics (and the incident topics, incidents enabled), its consumer group and
    (exactly-once: `tid`) its transactional id."""
    t, k = settings.topics, settings.kafka
    needs: dict[str, Operation | tuple[Operation, ...]]
    needs = dict.fromkeys((t.camera, t.audio, t.telemetry), "READ")
    needs.update({t.events: "WRITE", t.deadletter: "WRITE"})
    if settings.incidents.enabled:  # device states are saved and read back
        needs.update({t.incidents: "WRITE", t.incident_state: ("WRITE", "READ")})
    check_topic_access(admin, needs, security)
    who, at = principal(security), servers(admin.config["bootstrap_servers"])
    try:
        admin.describe_groups([k.group_id])
    except errors.GroupAuthorizationFailedError:
        raise UserError(
            f"{who} lacks ACLs at {at}: Read on consumer group {k.group_id}. Ask a Kafka admin "
            "to allow it (docs/operations.md, Secured Kafka), or set kafka.group_id to a "
            "group it may use"
        ) from None
    except errors.KafkaError as exc:  # e.g. no coordinator yet: the consumer finds out
        log.debug("cannot check access to group %s: %r", k.group_id, exc)
    if tid is None:
        return
    try:
        admin.describe_transactions([tid])
    except errors.TransactionalIdAuthorizationFailedError:
        raise UserError(
            f"{who} lacks ACLs at {at}: Write on transactional id {tid} (kafka.exactly_once). "
            "Ask a Kafka admin to allow it (docs/operations.md, Secured Kafka), or set "
            "kafka.transactional_id to one it may use"
        ) from None
    except errors.KafkaError as exc:
        log.debug("cannot check access to transactional id %s: %r", tid, exc)


def servers(bootstrap: str | list[str]) -> str:
    """Bootstrap servers as one string (kafka-python takes a list or a string)."""
    return bootstrap if isinstance(bootstrap, str) else ",".join(bootstrap)
