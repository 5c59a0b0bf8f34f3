"""Incidents sent on to where operators look: an MQTT broker, a webhook.

Both are off by default and switched on by `[sinks]` settings (`mqtt_host`, `webhook_url`).
Each sink has its own bounded retry queue and thread (queue.py): the pipeline hands it
every incident record (never the events) and goes on; a target that is slow or down
costs queue space, never pipeline time. Delivery is at least once, in order per sink: a
receiver deduplicates by `incident_id` and `seq`.
"""

from __future__ import annotations

import logging

from pipeline.incidents.records import IncidentRecord
from pipeline.metrics import Metrics
from pipeline.settings import SinkSettings
from pipeline.sinks.queue import Limits, SinkQueue

log = logging.getLogger(__name__)


class Sinks:
    """The configured sinks: `offer` hands a record to each."""

    def __init__(self, queues: list[SinkQueue]) -> None:
        self.queues = queues

    def offer(self, record: IncidentRecord) -> None:
        for q in self.queues:
            q.offer(record)

    def close(self) -> None:
        for q in self.queues:
            q.close()


def build_sinks(s: SinkSettings, metrics: Metrics) -> Sinks | None:
    """The sinks `[sinks]` switches on, started; None when none is."""
    limits = Limits(s.max_queued, s.max_age_ms, s.retry_initial_ms, s.retry_max_ms)
    queues = []
    if s.mqtt_host:
        from pipeline.sinks.mqtt import MqttTarget, mqtt_topic

        queues.append(SinkQueue("mqtt", MqttTarget(s), limits, metrics))
        example = mqtt_topic(s.mqtt_topic_prefix, IncidentRecord("DEVICE", "CLASS", "", 0, "", b""))
        log.info("incidents go to MQTT %s:%d as %s", s.mqtt_host, s.mqtt_port, example)
    if s.webhook_url:
        from pipeline.sinks.webhook import WebhookTarget

        target = WebhookTarget(s)
        queues.append(SinkQueue("webhook", target, limits, metrics))
        log.info(
            "incidents go to the webhook at %s (%s)",
            target.where,
            "signed" if s.webhook_secret else "unsigned: set sinks.webhook_secret",
        )
    return Sinks(queues) if queues else None
