"""kafka-python errors a user can fix, as one line that names the cause and the fix.

Every command that talks to Kafka runs its Kafka work inside `user_errors(settings.kafka)`:
a failed SASL authentication, a missing ACL (topic, consumer group, transactional id,
cluster), a broker that never answered, invalid client settings or a topic layout problem
leave the command as a `UserError` (the CLI prints it in one line and exits 1) instead of a
traceback. Errors that are no user's to fix propagate unchanged. A message never holds the
SASL password (`kafka.sasl_password` is masked should a broker's text ever echo it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import kafka.errors as errors

from pipeline.errors import UserError
from pipeline.kafka.access import principal
from pipeline.kafka.admin import TopicLayoutError
from pipeline.kafka.config import security_config, transactional_id
from pipeline.settings import MASK, KafkaSettings

_ACLS = "docs/operations.md, Secured Kafka"
_PREFIX = re.compile(r"^(\[Error -?\d+\] )?[A-Z]\w*Error(: |:?$)")


@contextmanager
def user_errors(kafka: KafkaSettings) -> Iterator[None]:
    """Turn the Kafka errors `explain` knows into UserErrors; let everything else through."""
    try:
        yield
    except UserError as exc:
        masked = _mask(str(exc), kafka)
        if masked == str(exc):
            raise
        raise UserError(masked) from None
    except Exception as exc:
        line = explain(exc, kafka)
        if line is None:
            raise
        raise UserError(_mask(line, kafka)) from None


def explain(exc: BaseException, kafka: KafkaSettings) -> str | None:
    """One line naming the cause of `exc` (or of the Kafka error that caused it) and what
    to do; None for errors that are not a user's to fix."""
    if isinstance(exc, TopicLayoutError):
        return str(exc)
    cause = _kafka_cause(exc)
    if cause is None:
        return None
    who = principal(security_config(kafka))
    at = kafka.bootstrap_servers
    if isinstance(cause, errors.SaslAuthenticationFailedError):
        return (
            f"SASL authentication as '{kafka.sasl_username}' at {at} failed ({_text(cause)}): "
            "check kafka.sasl_username, kafka.sasl_password and kafka.sasl_mechanism"
        )
    if isinstance(cause, errors.TopicAuthorizationFailedError):
        topics = ", ".join(sorted(_names(cause))) or "a topic this command uses"
        return (
            f"{who} is not authorized for topic {topics} at {at}: ask a Kafka admin for the "
            f"ACLs this command needs ({_ACLS})"
        )
    if isinstance(cause, errors.GroupAuthorizationFailedError):
        return (
            f"{who} is not authorized to use consumer group '{kafka.group_id}' at {at}: ask a "
            f"Kafka admin to allow Read on group {kafka.group_id} ({_ACLS})"
        )
    if isinstance(cause, errors.TransactionalIdAuthorizationFailedError):
        tid = transactional_id(kafka)
        return (
            f"{who} is not authorized to use transactional id '{tid}' at {at} "
            f"(kafka.exactly_once): ask a Kafka admin to allow Write on transactional id "
            f"{tid}, or set kafka.transactional_id to one it may use ({_ACLS})"
        )
    if isinstance(cause, errors.ClusterAuthorizationFailedError):
        return (
            f"{who} lacks a cluster permission at {at} ({_text(cause)}): an idempotent "
            f"producer needs IdempotentWrite on the cluster or Write on a topic ({_ACLS})"
        )
    if isinstance(cause, errors.AuthorizationError):
        return f"{who} is not authorized at {at}: {_text(cause)} ({_ACLS})"
    if isinstance(cause, errors.KafkaConfigurationError):
        return f"invalid Kafka client settings: {_text(cause)}; check [kafka]"
    if isinstance(cause, errors.KafkaTimeoutError) and "bootstrap" in str(cause).lower():
        return (
            f"cannot reach Kafka at {at} ({_text(cause)}): check --bootstrap-servers, that "
            f"the broker is running, and that kafka.security_protocol "
            f"({kafka.security_protocol}) is the protocol of that listener"
        )
    return None


def _kafka_cause(exc: BaseException) -> errors.KafkaError | None:
    """`exc` if it is a KafkaError, else the nearest KafkaError it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, errors.KafkaError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def _names(exc: errors.KafkaError) -> set[str]:
    """The resource names kafka-python put in an authorization error's arguments."""
    names: set[str] = set()
    for arg in exc.args:
        if isinstance(arg, str):
            names.add(arg)
        elif isinstance(arg, (set, frozenset, list, tuple)):
            names.update(str(a) for a in arg)
    return names


def _text(exc: errors.KafkaError) -> str:
    """The error's message on one line, without kafka-python's '[Error N] NameError: '
    prefix (its class name when that is all there is)."""
    text = _PREFIX.sub("", " ".join(str(exc).split()))
    return text or type(exc).__name__


def _mask(line: str, kafka: KafkaSettings) -> str:
    secret = kafka.sasl_password
    return line.replace(secret, MASK) if secret else line
