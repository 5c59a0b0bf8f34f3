"""The Kafka edge of `iotfuse run`: consumer in, `Engine` in the middle, producer out.

Delivery (see docs/contract.md):
- at-least-once (default): an input position is released once the outputs holding it
  are acknowledged by the broker; commits never pass a held position.
- exactly-once (`kafka.exactly_once`): outputs and the committable offsets go into one
  Kafka transaction, committed every `commit_interval_ms`.
In-flight producer data is bounded by `kafka.max_in_flight_bytes`; open windows and
buffered bytes by back-pressure (the rule: pipeline/stream/backpressure.py).
A broker that cannot be reached for a while is waited out: commits (and the flush before
them), log-end and lag queries that fail with a retriable error are counted, logged and
tried again later (the producer retries sends for `delivery.timeout.ms`, then the worker
stops: DeliveryError). A worker out of its group or not fetching rejoins, then stops
(GroupStalledError): the liveness rule, pipeline/kafka/liveness.py.
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    CorruptRecordError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
)
from kafka.structs import OffsetAndMetadata

from pipeline.clock import Clock, wall_clock_ms
from pipeline.kafka.admin import await_input_topics, prepare_outputs
from pipeline.kafka.broker_errors import BrokerErrors
from pipeline.kafka.config import (
    MAX_RECORD_BYTES,
    consumer_config,
    offsets_config,
    producer_config,
)
from pipeline.kafka.fetch import UnreadableRecord, open_fetch
from pipeline.kafka.liveness import GroupWatch
from pipeline.kafka.log_end import LogEnd, ReadThrough
from pipeline.kafka.producer import BoundedProducer
from pipeline.kafka.transaction import DeliveryError, Transactions
from pipeline.kafka.unreadable import Unreadable, find_unreadable
from pipeline.logs import Throttle
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.align import Aligner
from pipeline.stream.backpressure import Flow
from pipeline.stream.engine import Engine
from pipeline.stream.heap import HeapTrim
from pipeline.stream.offsets import OffsetTracker
from pipeline.stream.outputs import Output, fit_dead_letter, wire_bytes
from pipeline.stream.window_progress import ProgressMetadata, decode_progress
from pipeline.stream.windows import Position
from pipeline.stream.worker_loop import backpressure_step, classify_due, process_ready

log = logging.getLogger(__name__)

# a commit waits this long for outputs in flight (a broker away held the loop, not polling,
# for the producer's 120 s delivery timeout), and for the offsets commit itself
COMMIT_FLUSH_TIMEOUT_S = 5.0
COMMIT_TIMEOUT_MS = 5000
IN_FLIGHT_POLL_MS = 5  # longest a poll waits for records while the model thread works


class KafkaWorker:
    def __init__(self, settings: Settings, engine: Engine, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.metrics = engine.metrics
        self.tracker = OffsetTracker()
        self.exactly_once = settings.kafka.exactly_once
        self._last_commit_ms = clock()
        self._flow = Flow.READING  # back-pressure's last decision
        self._broker_error = BrokerErrors(self.metrics, clock, settings.kafka.bootstrap_servers)
        self._progress_metadata = ProgressMetadata()
        self._owned: set[TopicPartition] = set()
        self._last_status_ms = clock()
        self._trim_heap = HeapTrim(clock)  # RSS that settles, not one that creeps for minutes
        self._consumed = 0
        self._held_back: set[TopicPartition] = set()
        self.aligner = Aligner(
            (settings.topics.camera, settings.topics.audio, settings.topics.telemetry),
            max_bytes=settings.windows.max_aligning_bytes,
            pausable=True,  # past its limits: stop reading what runs ahead (issue 19.3)
        )
        # before the other clients: with the admin client closed while they ran, an
        # exactly-once worker fetched nothing at all in 4 of 8 runs
        limit = prepare_outputs(settings, clock)  # and never more than this producer sends:
        self._deadletter_max = min(limit or MAX_RECORD_BYTES, MAX_RECORD_BYTES)
        self._oversized = Throttle(log)  # a flood of them says so once a minute
        self._skipped = Throttle(log, 10.0)  # commits skipped during a rebalance
        self._unreadable = Throttle(log)  # and of records the client cannot parse
        with ExitStack() as undo:  # a failed start closes the clients it opened (their
            # network threads ran on: a caller that retries or goes on leaked them)
            self.consumer = KafkaConsumer(**consumer_config(settings))
            undo.callback(self.consumer.close, autocommit=False)
            self.fetch = open_fetch(settings, self.consumer)  # what reads the records
            undo.callback(self.fetch.close)
            self.offsets = KafkaConsumer(**offsets_config(settings))
            undo.callback(self.offsets.close)
            self.producer = KafkaProducer(**producer_config(settings))
            undo.callback(self.producer.close, timeout=10)
            self.txn = Transactions(self.producer)
            self._start_clients(settings, clock)
            undo.pop_all()  # started: close() closes them from now on

    def _start_clients(self, settings: Settings, clock: Clock) -> None:
        self.log_end = LogEnd(self.fetch, self.offsets, self.aligner, self._broker_error)
        self.read_through = ReadThrough(self.log_end, clock)  # idle timeouts' clock
        self.out: BoundedProducer[Output] = BoundedProducer(
            self.producer, settings.kafka.max_in_flight_bytes, clock
        )
        if self.exactly_once:
            self.producer.init_transactions()
        inputs = [settings.topics.camera, settings.topics.audio, settings.topics.telemetry]
        await_input_topics(self.consumer, inputs, settings.kafka.topic_wait_ms, clock)
        for topic in inputs:  # the offsets client's metadata, before it is first asked
            self.offsets.partitions_for_topic(topic)
        self.consumer.subscribe(inputs, listener=_Rebalance(self))
        # fresh metadata now: a first assignment made before the coordinator saw any asked
        # for a second rebalance a second later, the one kafka-python could lose track of
        self.consumer.topics()
        self.watch = GroupWatch(
            self.consumer,
            self.log_end,
            self.metrics,
            settings.kafka.stall_timeout_ms,
            clock,
            probe=TopicPartition(inputs[0], 0),
            positions=self.fetch,
        )

    # -- main loop ----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.step()
            self.drain()
        finally:
            self.close()

    def step(self, poll_timeout_ms: int = 100) -> int:
        """One poll -> process -> batch -> publish -> commit round; returns records polled."""
        timeout = min(poll_timeout_ms, self.settings.runtime.batch_timeout_ms)
        if self.engine.in_flight():  # the model thread's batch is published once it is back
            timeout = min(timeout, IN_FLIGHT_POLL_MS)
        elif not self.engine.queued():
            timeout = self.watch.poll_timeout(poll_timeout_ms)
        polled = self._poll(timeout)
        self.watch.polled(fetched=bool(polled))
        if not polled:  # frames decoded ahead, not while a fleet's windows close
            self.engine.idle()
        self._follow_assignment()
        self.log_end.new_poll(self._owned)
        count = 0
        for record in polled:
            if (record.topic, record.partition) not in self._owned:
                continue  # its partition was lost in this poll's rebalance
            if not self.tracker.track(Position(record.topic, record.partition, record.offset)):
                continue  # re-delivered after a rebalance: already in a window or done
            self.aligner.push(record)
            count += 1
        released = process_ready(self.aligner, self.log_end.caught_up, self.engine, self._publish)
        read_through = self.read_through(self._owned)  # None: not known (yet)
        # a device is not silent while its records wait here, nor while they wait unread
        if read_through is not None and not self.aligner.buffered:
            self.engine.tick(read_through)
        classify_due(self.engine, self._publish)
        self.tracker.release(self.engine.take_released())
        self._drain_acks()
        if self.clock() - self._last_commit_ms >= self.settings.runtime.commit_interval_ms:
            self.commit()
            self.watch.check(self._owned, self._held_back)  # GroupStalledError: stop
        self._backpressure(released)
        self._consumed += count
        self._status()
        self._trim_heap()
        return count

    def _poll(self, timeout_ms: int) -> list[Record]:
        """The fetcher's poll; a record the client cannot parse is dead-lettered and skipped."""
        try:
            return self.fetch.poll(timeout_ms, joining=self.watch.rule.state != "stable")
        except CorruptRecordError as exc:
            readable = self._owned - self._held_back
            positions = {tp: p for tp in readable if (p := self.fetch.position(tp)) is not None}
            found = find_unreadable(self.offsets, positions)
            if not found and isinstance(exc, UnreadableRecord):  # kafka-python reads it
                found = [Unreadable(exc.tp, exc.offset, exc.offset, exc)]
            if not found:
                raise  # not a record this worker can point at
            for bad in found:  # a record, or a batch that cannot be decompressed
                self._unreadable.log(
                    logging.WARNING,
                    str(bad.reason),
                    "records %s[%d]@%d-%d cannot be parsed (%s): dead-lettered, skipped",
                    bad.tp.topic,
                    bad.tp.partition,
                    bad.first,
                    bad.last,
                    bad.error,
                )
                for position in bad.positions:
                    self.tracker.track(position)
                self.metrics.labelled(self.metrics.dead_letters, str(bad.reason)).inc()
                self._publish([bad.dead_letter(self.settings.topics.deadletter, self.clock())])
                self.fetch.seek(bad.tp, bad.last + 1)
            return []

    def _status(self, every_ms: int = 10_000) -> None:
        """A concise progress line every 10 s."""
        now = self.clock()
        if now - self._last_status_ms < every_ms:
            return
        self._last_status_ms = now
        w = self.engine.windower
        log.info(
            "status: group=%s consumed=%d aligning=%d (%d bytes) open_windows=%d "
            "buffered_bytes=%d queued=%d emitted=%d held_offsets=%d paused=%d",
            self.watch.rule.state,
            self._consumed,
            self.aligner.buffered,
            self.aligner.buffered_bytes,
            w.open_windows,
            w.buffered_bytes,
            self.engine.queued(),
            int(self.metrics.value("iotfuse_windows_emitted_total")),
            self.tracker.held(),
            len(self._held_back),
        )

    def drain(self) -> None:
        """Shutdown: publish events of windows already closed, commit exactly what is done."""
        while self.engine.queued() or self.engine.in_flight():
            self._publish(self.engine.run_batch())
        self.commit()

    def close(self) -> None:
        try:
            self.fetch.close()
            self.consumer.close(autocommit=False)
            self.offsets.close()
        finally:
            self.producer.close(timeout=10)
            self.engine.close()

    # -- output -------------------------------------------------------------------------
    def _publish(self, outputs: list[Output]) -> None:
        for out in outputs:
            if self.exactly_once:
                self.txn.begin()
            sent = self._fitted(out)
            self.out.send(out, sent.topic, sent.key, sent.value, sent.headers, sent.timestamp_ms)
        self._drain_acks()

    def _fitted(self, out: Output) -> Output:
        """A dead letter the dead-letter topic can take (`fit_dead_letter`)."""
        if out.topic != self.settings.topics.deadletter:
            return out
        fitted = fit_dead_letter(out, self._deadletter_max)
        if fitted is not out:
            self._oversized.log(
                logging.WARNING,
                "oversized",
                "a dead letter of %d bytes (key, value and headers) is over the %d bytes %s "
                "takes (its max.message.bytes, and at most what this worker's producer "
                "sends): sent without %s (header iotfuse.error.omitted)",
                wire_bytes(out.key, out.value, out.headers),
                self._deadletter_max,
                out.topic,
                (dict(fitted.headers).get("iotfuse.error.omitted") or b"").decode(),
            )
        return fitted

    def _drain_acks(self) -> None:
        for out, error, acked_ms in self.out.completed_at():
            if error is not None:
                raise DeliveryError(
                    f"publishing to {out.topic} failed after retries: {error!r}; "
                    "stopping without committing (the input will be re-read on restart)"
                )
            self.tracker.release(out.holds)
            if out.closed_at_ms is not None:  # close -> the broker's acknowledgement
                self.metrics.event_latency.observe((acked_ms - out.closed_at_ms) / 1000.0)

    # -- offsets ------------------------------------------------------------------------
    def commit(self) -> None:
        """Commit what is done: what was published is acknowledged first (flush), and the
        progress stored with the offsets (pipeline/stream/window_progress.py) names only
        published windows (Engine.progress), so a commit does not wait for the windows still
        queued or with the model: their positions are not released, nor their progress."""
        self._last_commit_ms = self.clock()
        self.tracker.release(self.engine.take_released())
        try:
            self.producer.flush(timeout=COMMIT_FLUSH_TIMEOUT_S)
        except KafkaTimeoutError as exc:  # the broker is away: the next interval tries again
            self._broker_error("flush", exc)
            return
        self._drain_acks()  # raises if anything failed: nothing gets committed then
        offsets = self._assigned_offsets()  # all of them: the progress changes too
        if self.exactly_once:
            self.txn.commit(self._with_progress(offsets), self.consumer.group_metadata())
        elif offsets:
            try:
                self.consumer.commit(self._with_progress(offsets), COMMIT_TIMEOUT_MS)
            except (CommitFailedError, RebalanceInProgressError) as exc:
                self.metrics.commits_skipped.inc()  # the liveness rule acts if it lasts
                self._skipped.log(
                    logging.INFO,
                    "rebalance",
                    "commit skipped during a rebalance (%s); retried next interval",
                    exc,
                )
            except KafkaError as exc:  # e.g. the broker is down: the next interval retries
                self._broker_error("commit", exc)

    def _with_progress(self, offsets: dict[TopicPartition, int]) -> dict[Any, Any]:
        parts = {tp.partition for tp in offsets}
        meta = {p: self._progress_metadata(p, self.engine.progress(p)) for p in parts}
        return {tp: OffsetAndMetadata(o, meta[tp.partition], -1) for tp, o in offsets.items()}

    def _follow_assignment(self) -> None:
        """After a rebalance: forget lost partitions, resume progress on gained ones.

        Runs on the main thread right after poll and before its records are processed
        (kafka-python runs rebalance listeners on its I/O thread, where nothing may block).
        Lost partitions' open windows are dropped; their records were never committed, so
        the new owner rebuilds those windows from the log.
        """
        current = set(self.consumer.assignment())
        if current == self._owned:
            return
        self.fetch.follow(current)
        lost, gained = self._owned - current, current - self._owned
        if lost:
            keys = [(tp.topic, tp.partition) for tp in lost]
            dropped = self.engine.revoke(keys)
            self.tracker.forget(keys)
            self.aligner.drop(keys)
            self._held_back -= lost
            log.info(
                "partitions lost: %s; %d open windows left to the new owner", sorted(keys), dropped
            )
        for tp in gained:
            # read a gained partition from its commit point, whatever the client buffered
            # or skipped while the group was rebalancing (offsets already seen are ignored)
            committed = self.consumer.committed(tp, metadata=True)
            if committed is not None:
                self.engine.resume(tp.partition, decode_progress(committed.metadata))
                self.fetch.seek(tp, committed.offset)
            else:
                self.fetch.seek_to_beginning(tp)
        if gained:
            log.info("partitions gained: %s", sorted((tp.topic, tp.partition) for tp in gained))
        self._owned = current

    def _assigned_offsets(self) -> dict[TopicPartition, int]:
        assigned = self.consumer.assignment()
        out: dict[TopicPartition, int] = {}
        for (topic, partition), offset in self.tracker.committable().items():
            tp = TopicPartition(topic, partition)
            if tp in assigned:
                out[tp] = offset
        return out

    def _backpressure(self, released: int) -> None:
        """Apply back-pressure's decision (pipeline/stream/worker_loop.py) to this step's
        load: pause or resume every owned partition."""
        decision = backpressure_step(self._flow, self.engine, released)
        self._flow = decision.flow
        pause = set(self._owned) if decision.pause else set()
        pause |= {TopicPartition(t, p) for t, p in self.aligner.pause} & self._owned
        if pause - self._held_back:
            self.fetch.pause(*(pause - self._held_back))
        if self._held_back - pause:
            self.fetch.resume(*(self._held_back - pause))
        self._held_back = pause


class _Rebalance(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Only logs: the worker follows assignment changes on its own thread after poll."""

    def __init__(self, worker: KafkaWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        log.debug("rebalance: %d partitions revoked", len(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.debug("rebalance: %d partitions assigned", len(assigned))
        if self.worker.settings.kafka.fetcher == "librdkafka" and assigned:
            self.worker.consumer.pause(*assigned)  # before kafka-python fetches any
