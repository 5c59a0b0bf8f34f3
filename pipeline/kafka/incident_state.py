"""Saved incident states read back from Kafka, and the engine `iotfuse run` builds with them.

The incident stage (pipeline/incidents/stage.py) saves each device's state to
`topics.incident_state` (compacted, keyed by device) in the same producer stream, and under
`--exactly-once` the same transaction, as the events. When the worker gains a partition,
`KafkaStateStore.load` reads the states of that partition's devices to the topic's end
(read_committed: an aborted transaction's states are not seen). `iotfuse topics` creates the
state topic with the input topics' partition count, so a device's state sits on its input
partition number (both murmur2 of the device id); with another count every partition is
read and the devices are picked by that hash.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2

from pipeline.clock import Seconds
from pipeline.kafka.config import incident_state_config
from pipeline.metrics import Metrics
from pipeline.settings import Settings
from pipeline.stream.assembly import build_engine
from pipeline.stream.engine import Engine
from pipeline.stream.model_runner import ModelRunner

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 60.0  # reading one partition's states to its end takes this long at most


def partition_of(device: bytes, partitions: int) -> int:
    """The partition the default (murmur2) partitioner gives a key: Java's and kafka-python's."""
    return int(murmur2(device) & 0x7FFFFFFF) % partitions


class KafkaStateStore:
    """Reads saved device states of one input partition at a time (`StateStore`)."""

    def __init__(
        self,
        settings: Settings,
        timeout_s: float = LOAD_TIMEOUT_S,
        clock: Seconds = time.monotonic,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.incident_state
        self.timeout_s = timeout_s
        self.clock = clock
        self._consumer: KafkaConsumer | None = None

    def _client(self) -> KafkaConsumer:
        if self._consumer is None:  # at the first assignment: a worker that never gets one
            self._consumer = KafkaConsumer(**incident_state_config(self.settings.kafka))
        return self._consumer

    def load(self, partition: int) -> list[bytes]:
        """Every saved state value of the devices on input partition `partition`, oldest
        first (a topic not compacted yet holds several per device: the last one counts)."""
        started = self.clock()
        try:
            values = self._read(partition)
        except KafkaError as exc:
            log.warning(
                "incidents: cannot read the saved states of partition %d from %s (%r); its "
                "devices' incidents start afresh (an incident open before may open again)",
                partition,
                self.topic,
                exc,
            )
            return []
        log.debug(
            "incidents: %d saved states of partition %d read in %.2f s",
            len(values),
            partition,
            self.clock() - started,
        )
        return values

    def _read(self, partition: int) -> list[bytes]:
        consumer = self._client()
        own = consumer.partitions_for_topic(self.topic)
        if not own:
            log.warning(
                "incidents: the state topic %s does not exist: incidents open before a "
                "restart cannot be continued; create it with `iotfuse topics`",
                self.topic,
            )
            return []
        inputs = len(consumer.partitions_for_topic(self.settings.topics.camera) or ())
        same = inputs == len(own)
        tps = [TopicPartition(self.topic, p) for p in ([partition] if same else sorted(own))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        values: list[bytes] = []
        deadline = self.clock() + self.timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if self.clock() > deadline:
                raise KafkaError(f"not read to its end within {self.timeout_s:g} s")
            for batch in consumer.poll(timeout_ms=200).values():
                for m in batch:
                    if m.value is None or m.key is None:
                        continue
                    if same or partition_of(m.key, inputs) == partition:
                        values.append(m.value)
        return values

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def build_live_engine(
    settings: Settings, runner: ModelRunner, metrics: Metrics | None = None
) -> Engine:
    """The engine of `iotfuse run`: incidents continue from their saved states after a
    restart or rebalance, and go on to the sinks of `[sinks]`."""
    store = KafkaStateStore(settings) if settings.incidents.enabled else None
    return build_engine(settings, runner, metrics, incident_store=store, sinks=True)
