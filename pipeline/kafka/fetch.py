"""Where the worker's input records come from (`kafka.fetcher`).

The worker's group membership, commits and transactions always belong to its kafka-python
consumer. Fetching the records is a separate job with two implementations:

- `KafkaPythonFetch` (`kafka-python`): the group's consumer fetches too.
- `RdKafkaFetch` (`librdkafka`): the group's consumer keeps every partition it owns paused
  and only takes part in the group; a librdkafka consumer in assign mode (no group, no
  commits: confluent-kafka) fetches the same partitions from the positions the worker
  seeks. librdkafka fetches and parses in C, off Python's lock: 0.3 ms of CPU a window of
  records against kafka-python's 2.0-2.2 (docs/performance.md). Its fetches are capped at
  `RD_PARTITION_FETCH_BYTES` a partition so that each one mixes the partitions, as the
  aligner needs; a larger first record still comes whole.

Both answer the aligner's and the liveness watch's questions (position, highwater) for the
records they hand out, and raise kafka-python's CorruptRecordError for a record they cannot
read, after handing out every record before it; the worker then finds and dead-letters it
(pipeline/kafka/unreadable.py) and seeks past it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from kafka import TopicPartition
from kafka.errors import CorruptRecordError, IllegalStateError, for_code

from pipeline.clock import Seconds
from pipeline.errors import UserError
from pipeline.kafka.config import rdkafka_fetch_config
from pipeline.kafka.messages import to_record
from pipeline.records import Record
from pipeline.settings import Settings

if TYPE_CHECKING:
    from confluent_kafka import Consumer

log = logging.getLogger(__name__)

FETCHERS = ("kafka-python", "librdkafka")
RD_BATCH = 2000  # messages a librdkafka consume() hands out at most
# librdkafka's log end of a partition is trusted this long after it handed out a record of
# it (and since its last seek or resume): proof that librdkafka is fetching it
FRESH_S = 1.0


class Fetch(Protocol):
    """What the worker reads its input through."""

    def poll(self, timeout_ms: int, joining: bool = False) -> list[Record]: ...
    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None: ...
    def highwater(self, tp: TopicPartition) -> int | None: ...
    def fetched_end(self, tp: TopicPartition) -> int | None: ...
    def end_offsets(
        self, partitions: list[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, int]: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def seek_to_beginning(self, tp: TopicPartition) -> None: ...
    def pause(self, *tps: TopicPartition) -> None: ...
    def resume(self, *tps: TopicPartition) -> None: ...
    def follow(self, owned: set[TopicPartition]) -> None: ...
    def close(self) -> None: ...


def open_fetch(settings: Settings, consumer: Any) -> Fetch:
    """The fetcher `kafka.fetcher` names, over the group's kafka-python `consumer`."""
    name = settings.kafka.fetcher
    if name == "kafka-python":
        return KafkaPythonFetch(consumer)
    if name != "librdkafka":
        raise UserError(f"kafka.fetcher={name!r}: use {' or '.join(FETCHERS)}")
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        raise UserError(
            "kafka.fetcher=librdkafka needs confluent-kafka: pip install confluent-kafka, "
            "or set kafka.fetcher=kafka-python"
        ) from None
    return RdKafkaFetch(settings, consumer)


class UnreadableRecord(CorruptRecordError):  # type: ignore[misc]
    """A record librdkafka could not read, at `offset` of `tp`."""

    def __init__(self, tp: TopicPartition, offset: int, error: object) -> None:
        super().__init__(f"{tp.topic}[{tp.partition}]@{offset}: {error}")
        self.tp, self.offset = tp, offset


class KafkaPythonFetch:
    """The group's kafka-python consumer fetches its own partitions."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    def poll(self, timeout_ms: int, joining: bool = False) -> list[Record]:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        return [to_record(msg) for messages in polled.values() for msg in messages]

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.consumer.position(tp, timeout_ms=timeout_ms)  # type: ignore[no-any-return]

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.consumer.highwater(tp)  # type: ignore[no-any-return]

    def fetched_end(self, tp: TopicPartition) -> int | None:
        """None: kafka-python hands out records of older completed fetches, whose highwater
        is as old as they are, so only the broker can say where the log ends now."""
        return None

    def end_offsets(
        self, partitions: list[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, int]:
        return dict(self.consumer.end_offsets(partitions, timeout_ms))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.consumer.seek(tp, offset)

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.consumer.seek_to_beginning(tp)

    def pause(self, *tps: TopicPartition) -> None:
        self.consumer.pause(*tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.consumer.resume(*tps)

    def follow(self, owned: set[TopicPartition]) -> None:
        """Nothing to do: the group's consumer fetches what it owns."""

    def close(self) -> None:
        """The group's consumer is closed by its owner."""


class RdKafkaFetch:
    """librdkafka fetches the partitions the group's kafka-python consumer owns (paused)."""

    def __init__(
        self,
        settings: Settings,
        consumer: Any,
        rd: Consumer | None = None,
        clock: Seconds = time.monotonic,
    ) -> None:
        """`rd`: the librdkafka consumer (default: one of `rdkafka_fetch_config`)."""
        if rd is None:
            from confluent_kafka import Consumer

            rd = Consumer(rdkafka_fetch_config(settings, logger=log))
        self.group, self.clock = consumer, clock
        self.rd: Consumer = rd
        self._positions: dict[TopicPartition, int] = {}  # next offset handed out
        self._handed_at: dict[TopicPartition, float] = {}  # a record last handed out, since
        # the partition's last seek or resume (FRESH_S)
        self._paused: set[TopicPartition] = set()
        self._unreadable: UnreadableRecord | None = None  # raised at the next poll

    def poll(self, timeout_ms: int, joining: bool = False) -> list[Record]:
        """Records librdkafka fetched, waiting up to `timeout_ms`; while the group is
        `joining` (or nothing is assigned) the wait is the group's, for its answers."""
        if self._unreadable is not None:
            unreadable, self._unreadable = self._unreadable, None
            raise unreadable
        group_wait = timeout_ms if joining or not self._positions else 0
        self.group.poll(timeout_ms=group_wait)  # heartbeats, rebalances, metadata
        self._pause_group()
        if not self._positions:
            return []
        records: list[Record] = []
        failed: set[TopicPartition] = set()
        fetched = self._consume((timeout_ms - group_wait) / 1000)
        now = self.clock()  # once a poll, not per record
        for msg in fetched:
            tp = TopicPartition(msg.topic(), msg.partition())
            if tp not in self._positions or tp in failed:
                continue  # given up meanwhile (rebalance), or read again after the seek
            error = msg.error()
            if error is not None and self._failed(tp, msg.offset() or 0, error):
                failed.add(tp)
                continue
            if error is None:
                try:
                    records.append(_record(msg))
                except UnicodeDecodeError as exc:  # a header key that is not UTF-8
                    self._unreadable_at(tp, msg.offset() or 0, exc)
                    failed.add(tp)
                    continue
                self._positions[tp] = (msg.offset() or 0) + 1
                self._handed_at[tp] = now
        return records

    def _consume(self, wait_s: float) -> list[Any]:
        """What librdkafka has fetched, up to RD_BATCH messages; when it has nothing, the
        first to arrive within `wait_s` and what came with it (consume(n, wait) itself waits
        for all n messages or the whole wait)."""
        got = self.rd.consume(RD_BATCH, 0)
        if got or wait_s <= 0:
            return got
        got = self.rd.consume(1, wait_s)
        return got + self.rd.consume(RD_BATCH - 1, 0) if got else got

    def _unreadable_at(self, tp: TopicPartition, offset: int, error: object) -> None:
        """The record at `offset` cannot be read: read again from it, and raise at the next
        poll (after this one's records are handed out)."""
        self._unreadable = UnreadableRecord(tp, offset, error)
        self.seek(tp, offset)

    def _failed(self, tp: TopicPartition, offset: int, error: Any) -> bool:
        """An error in place of a message. A record librdkafka cannot read: True, the
        partition is read again from it and the next poll raises CorruptRecordError (the
        worker dead-letters it). A broker's refusal (e.g. no read permission) is raised as
        kafka-python raises it; anything else is librdkafka's to retry (logged)."""
        if _is_bad_record(error):
            self._unreadable_at(tp, self._positions[tp], error)
            return True
        if error.fatal() or (error.code() > 0 and not error.retriable()):
            raise for_code(error.code())(error.str())
        log.debug("librdkafka: %s", error)
        return False

    def _pause_group(self) -> None:
        """The group's consumer fetches nothing: pause whatever it owns now."""
        owned = self.group.assignment()
        unpaused = set(owned) - set(self.group.paused())
        if unpaused:
            self.group.pause(*unpaused)

    def follow(self, owned: set[TopicPartition]) -> None:
        """The group's assignment changed: stop fetching what it lost (gained partitions
        are assigned when the worker seeks them)."""
        lost = [tp for tp in self._positions if tp not in owned]
        if lost:
            self.rd.incremental_unassign([_rd(tp) for tp in lost])
            for tp in lost:
                del self._positions[tp]
                self._handed_at.pop(tp, None)
                self._paused.discard(tp)

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        position = self._positions.get(tp)
        if position is None:
            raise IllegalStateError(f"{tp} is not assigned")
        [rd] = self.rd.position([_rd(tp)])  # past transaction markers too
        return max(position, rd.offset)

    def highwater(self, tp: TopicPartition) -> int | None:
        """The high watermark of the last fetch answer holding `tp` (not the last stable
        offset: an open transaction on an input topic holds its partition back until it
        ends)."""
        from confluent_kafka import KafkaException

        try:
            _, high = self.rd.get_watermark_offsets(_rd(tp), cached=True)
        except KafkaException:  # not fetched yet
            return None
        return int(high) if high is not None and high >= 0 else None

    def fetched_end(self, tp: TopicPartition) -> int | None:
        """Where the log of `tp` ends, as new as asking the broker while librdkafka is
        fetching it: it keeps a fetch waiting at the broker, which answers as soon as
        anything is appended, and takes the end offset from each answer before handing out
        its records. Proof that it is fetching: it handed out a record of `tp` within
        FRESH_S, since the partition's last seek or resume. Otherwise (paused, just sought
        or resumed, its leader away, or quiet) None: ask the broker."""
        handed = self._handed_at.get(tp)
        if tp in self._paused or handed is None or self.clock() - handed > FRESH_S:
            return None
        return self.highwater(tp)

    def end_offsets(
        self, partitions: list[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, int]:
        return dict(self.group.end_offsets(partitions, timeout_ms))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._handed_at.pop(tp, None)
        if tp in self._positions:
            self.rd.seek(_rd(tp, offset))
        else:
            self.rd.incremental_assign([_rd(tp, offset)])
            if tp in self._paused:
                self.rd.pause([_rd(tp)])
        self._positions[tp] = offset

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        """From the oldest offset the broker keeps (a real offset: an empty partition's
        position is then its end, read through)."""
        self.seek(tp, int(self.group.beginning_offsets([tp]).get(tp, 0)))

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)
        assigned = [_rd(tp) for tp in tps if tp in self._positions]
        if assigned:
            self.rd.pause(assigned)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)
        for tp in tps:
            self._handed_at.pop(tp, None)
        assigned = [_rd(tp) for tp in tps if tp in self._positions]
        if assigned:
            self.rd.resume(assigned)

    def close(self) -> None:
        self.rd.close()


def _rd(tp: TopicPartition, offset: int | None = None) -> Any:
    from confluent_kafka import TopicPartition as RdTopicPartition

    if offset is None:
        return RdTopicPartition(tp.topic, tp.partition)
    return RdTopicPartition(tp.topic, tp.partition, offset)


def _is_bad_record(error: Any) -> bool:
    from confluent_kafka import KafkaError

    return error.code() in (KafkaError._BAD_MSG, KafkaError._BAD_COMPRESSION)


def _record(msg: Any) -> Record:
    """A confluent-kafka Message as a Record (as `to_record` makes one from kafka-python's)."""
    kind, timestamp = msg.timestamp()
    return Record(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        timestamp_ms=int(timestamp) if kind else -1,
        key=msg.key(),
        value=msg.value(),
        headers=tuple((str(k), v) for k, v in msg.headers() or ()),
    )
