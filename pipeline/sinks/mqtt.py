"""The MQTT sink: each incident record to PREFIX/DEVICE/CLASS, QoS 1, retained.

Retained, the last record of each device and class is the topic's current state: a
dashboard that subscribes late (`iotfuse/incidents/#`) gets at once what is open (and
what closed last). paho-mqtt's network thread connects, and reconnects with a growing
delay (1 s to 30 s) while the broker is away; `deliver` publishes one record and waits
for the broker's PUBACK. A record published while the connection drops is neither lost
nor published twice: paho sends it again on reconnect, and the next try waits for that
same message instead of publishing a copy.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.incidents.records import IncidentRecord
from pipeline.settings import SinkSettings
from pipeline.sinks.queue import SinkError

log = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 5.0  # one try waits this long for the broker's acknowledgement


def mqtt_topic(prefix: str, record: IncidentRecord) -> str:
    return f"{prefix.rstrip('/')}/{record.device_id}/{record.cls}"


class MqttTarget:
    def __init__(self, s: SinkSettings, puback_timeout_s: float = PUBACK_TIMEOUT_S) -> None:
        self.where = f"{s.mqtt_host}:{s.mqtt_port}"
        self.prefix = s.mqtt_topic_prefix
        self.timeout_s = puback_timeout_s
        client_id = s.mqtt_client_id or f"iotfuse-{socket.gethostname()}-{os.getpid()}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        if s.mqtt_username:
            self.client.username_pw_set(s.mqtt_username, s.mqtt_password or None)
        if s.mqtt_tls:  # certificate and host name verified (paho's default)
            self.client.tls_set(ca_certs=s.mqtt_ca_file or None)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self._pending: tuple[IncidentRecord, mqtt.MQTTMessageInfo] | None = None
        self.client.connect_async(s.mqtt_host, s.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt sink: %s refused the connection: %s", self.where, reason)
        else:
            log.info("mqtt sink: connected to %s", self.where)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        log.warning("mqtt sink: disconnected from %s (%s); reconnecting", self.where, reason)

    def deliver(self, record: IncidentRecord) -> None:
        if self._pending is None or self._pending[0] is not record:
            if not self.client.is_connected():
                raise SinkError(f"not connected to the MQTT broker at {self.where}")
            topic = mqtt_topic(self.prefix, record)
            info = self.client.publish(topic, record.body, qos=1, retain=True)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise SinkError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            if info.rc == mqtt.MQTT_ERR_NO_CONN:  # the connection dropped just now: paho
                info.rc = mqtt.MQTT_ERR_SUCCESS  # keeps it and sends it on reconnect
            self._pending = (record, info)  # paho holds it now: sent again on reconnect
        info = self._pending[1]
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as exc:
            self._pending = None
            raise SinkError(f"publish failed: {exc}") from exc
        if not info.is_published():
            raise SinkError(f"no acknowledgement from {self.where} within {self.timeout_s:g} s")
        self._pending = None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
