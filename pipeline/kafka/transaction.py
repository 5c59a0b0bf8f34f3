"""The exactly-once worker's transactions, each step with a deadline.

kafka-python 3.0's `send_offsets_to_transaction` and `commit_transaction` wait for the
broker without one. When the broker that coordinates the group or the transaction is
killed, the client can lose track of the request and wait forever: a worker that lived on
without consuming (tests/test_broker_failures_kafka.py hung 2 runs in 4 in a 3-node cluster
whose input leader was killed). A step not done within the transaction timeout can no
longer commit anyway (the broker aborts the transaction by then), so the worker stops
there with `DeliveryError`: nothing of that transaction was committed, and a restart fences
this producer and re-reads the input from the last committed offsets (the supervisor's
`restart: unless-stopped`).
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.kafka.config import TRANSACTION_TIMEOUT_MS


class DeliveryError(RuntimeError):
    """The broker refused or never took an output or a transaction step: stop; a restart
    re-reads the input from the last commit."""


class Transactions:
    """begin / add offsets / commit of one transactional producer; `open` says whether a
    transaction is under way."""

    def __init__(self, producer: KafkaProducer, timeout_ms: int = TRANSACTION_TIMEOUT_MS):
        self.producer = producer
        self.timeout_ms = timeout_ms
        self.open = False

    def begin(self) -> None:
        if not self.open:
            self.producer.begin_transaction()
            self.open = True

    def commit(self, offsets: dict[Any, Any], group_metadata: Any) -> None:
        """Add `offsets` (may be empty) to the transaction and commit it."""
        if not self.open and not offsets:
            return
        self.begin()
        try:
            if offsets:
                self._step("offsets", "send_offsets_to_transaction", offsets, group_metadata)
            self._step("commit", "commit_transaction")
        except KafkaError as exc:
            raise DeliveryError(
                f"the transaction failed at the broker ({exc!r}); stopping without "
                "committing (a restart aborts it and re-reads the input)"
            ) from exc
        self.open = False

    def _step(self, what: str, call: str, *args: Any) -> None:
        """The producer's `call`, started on kafka-python's transaction manager and waited
        for at most the transaction timeout (the public call, without a deadline, where the
        manager is not there)."""
        manager = getattr(self.producer, "_transaction_manager", None)
        sender = getattr(self.producer, "_sender", None)
        if manager is None or sender is None:
            getattr(self.producer, call)(*args)
            return
        start = {"send_offsets_to_transaction": manager.send_offsets_to_transaction}
        result = start.get(call, manager.begin_commit)(*args)
        sender.wakeup()
        if not result.wait(timeout_ms=self.timeout_ms):
            raise DeliveryError(
                f"the transaction's {what} step was not done within "
                f"{self.timeout_ms / 1000:g} s (its coordinator is away or was lost track of); "
                "stopping without committing (a restart aborts it and re-reads the input)"
            )
