"""The MQTT sink against a real broker (Mosquitto, started by the tests): one retained QoS 1
topic per device and class, and a broker that is down loses nothing and blocks nothing."""

from __future__ import annotations

import json
import time

from pipeline.incidents.records import IncidentRecord
from pipeline.metrics import Metrics
from pipeline.settings import SinkSettings
from pipeline.sinks import build_sinks
from tests.kafka_util import wait_until
from tests.mqtt_util import Mosquitto, retained


def record(device: str, cls: str, seq: int, change: str) -> IncidentRecord:
    state = "closed" if change == "close" else "open"
    body = {"incident_id": f"{device}/{cls}/0", "seq": seq, "change": change, "state": state}
    return IncidentRecord(device, cls, f"{device}/{cls}/0", seq, change, json.dumps(body).encode())


def settings(port: int, prefix: str) -> SinkSettings:
    return SinkSettings(
        mqtt_host="127.0.0.1",
        mqtt_port=port,
        mqtt_topic_prefix=prefix,
        retry_initial_ms=50,
        retry_max_ms=200,
    )


def sent(metrics: Metrics) -> float:
    return metrics.value("iotfuse_sink_sent_total", {"sink": "mqtt"})


def test_a_late_dashboard_sees_the_current_state_of_each_device_and_class(
    mosquitto: Mosquitto,
) -> None:
    metrics = Metrics()
    sinks = build_sinks(settings(mosquitto.port, "t1/incidents"), metrics)
    assert sinks is not None
    for r in [
        record("cell-01", "fire", 0, "open"),
        record("cell-01", "intrusion", 0, "open"),
        record("cell-02", "fire", 0, "open"),
        record("cell-01", "fire", 1, "update"),
        record("cell-02", "fire", 1, "close"),
    ]:
        sinks.offer(r)
    wait_until(lambda: sent(metrics) == 5, 30, "5 records acknowledged by the broker")
    sinks.close()
    got = retained(mosquitto.port, "t1/incidents/#", 3)  # subscribed after it all happened
    state = {
        t: (json.loads(m.payload)["state"], json.loads(m.payload)["seq"]) for t, m in got.items()
    }
    assert state == {
        "t1/incidents/cell-01/fire": ("open", 1),
        "t1/incidents/cell-01/intrusion": ("open", 0),
        "t1/incidents/cell-02/fire": ("closed", 1),
    }
    assert {m.qos for m in got.values()} == {1}  # published at QoS 1


def test_a_broker_that_is_down_loses_nothing_and_blocks_nothing() -> None:
    with Mosquitto() as broker:  # its own: this test stops it
        broker.stop()
        metrics = Metrics()
        sinks = build_sinks(settings(broker.port, "t2/incidents"), metrics)
        assert sinks is not None
        slowest = 0.0
        for n in range(20):
            t0 = time.perf_counter()
            sinks.offer(record(f"cell-{n:02d}", "fire", 0, "open"))
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.05, f"offer took {slowest:.3f} s with the broker down"
        retries = "iotfuse_sink_retries_total"
        wait_until(lambda: metrics.value(retries, {"sink": "mqtt"}) >= 2, 30, "retries")
        assert sent(metrics) == 0
        assert metrics.value("iotfuse_sink_queued", {"sink": "mqtt"}) == 20
        broker.start()  # back: everything queued goes out, nothing dropped
        wait_until(lambda: sent(metrics) == 20, 60, "all 20 acknowledged after the restart")
        got = retained(broker.port, "t2/incidents/#", 20)
        assert len(got) == 20
        sinks.close()
        drops = metrics.registry.get_sample_value
        assert all(
            (drops("iotfuse_sink_dropped_total", {"sink": "mqtt", "reason": r}) or 0) == 0
            for r in ("queue_full", "too_old", "stopped")
        )
