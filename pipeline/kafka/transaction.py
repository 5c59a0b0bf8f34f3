"""The exactly-once worker's transactions, each step with a deadline.

kafka-python 3.0's `send_offsets_to_transaction` and `commit_transaction` wait for the
broker without one. When the broker that coordinates the group or the transaction is
killed, the client can lose track of the request and wait forever: a worker that lives on
without consuming. So each step is started on the client's transaction manager (as the
public calls do) and waited for with a deadline. A step not done within the transaction
timeout can no longer commit anyway (the broker aborts the transaction by then), so the
worker stops there with `DeliveryError`: nothing of that transaction was committed, and a
restart fences this producer and re-reads the input from the last committed offsets (the
supervisor's `restart: unless-stopped`).
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
        manager = self.producer._transaction_manager  # the public calls, less their wait
        try:
            if offsets:
                self._wait("offsets", manager.send_offsets_to_transaction(offsets, group_metadata))
            self._wait("commit", manager.begin_commit())
        except KafkaError as exc:
            raise DeliveryError(
                f"the transaction failed at the broker ({exc!r}); stopping without "
                "committing (a restart aborts it and re-reads the input)"
            ) from exc
        self.open = False

    def _wait(self, what: str, result: Any) -> None:
        """Wake the client's sender for `result` and wait at most the transaction timeout."""
        self.producer._sender.wakeup()
        if not result.wait(timeout_ms=self.timeout_ms):
            raise DeliveryError(
                f"the transaction's {what} step was not done within "
                f"{self.timeout_ms / 1000:g} s (its coordinator is away or was lost track of); "
                "stopping without committing (a restart aborts it and re-reads the input)"
            )
