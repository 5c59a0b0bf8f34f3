"""Reading the incidents topic from its start, group-less (`iotfuse incidents`, the demo).

read_committed, so a reader of an `--exactly-once` worker's incidents never sees those of
an aborted transaction; `caught_up` tells when what was there at the start has been read.
"""

from __future__ import annotations

from kafka import KafkaConsumer, TopicPartition

from pipeline.errors import UserError
from pipeline.kafka.config import recorder_config
from pipeline.kafka.follow import TopicFollower
from pipeline.settings import KafkaSettings


class IncidentLog(TopicFollower):
    """A follower that assigns every partition itself, so it knows when it has caught up."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._consumer = KafkaConsumer(**recorder_config(kafka))  # no group, no commits
        try:
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                raise UserError(
                    f"topic {topic} does not exist on {kafka.bootstrap_servers}: create the "
                    "contract's topics with `iotfuse topics`, or check topics.incidents"
                )
            self._tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            self._consumer.assign(self._tps)
            self._consumer.seek_to_beginning(*self._tps)
            self._end = self._consumer.end_offsets(self._tps)
        except BaseException:
            self._consumer.close()
            raise

    def caught_up(self) -> bool:
        """Whether everything the topic held when this reader started has been read."""
        return all(self._consumer.position(tp) >= self._end[tp] for tp in self._tps)
