"""Topic administration against the real local broker."""

from __future__ import annotations

import os
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.kafka.admin import (
    LARGE_RECORD_BYTES,
    TopicLayoutError,
    TopicNames,
    check_copartitioned,
    ensure_topics,
)

pytestmark = pytest.mark.kafka


def fresh_names() -> TopicNames:
    return TopicNames.prefixed(f"admin-{uuid.uuid4().hex[:10]}")


def create(bootstrap: str, partitions_by_topic: dict[str, int]) -> None:
    specs = {
        t: {"num_partitions": n, "replication_factor": 1} for t, n in partitions_by_topic.items()
    }
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        admin.create_topics(specs, wait_for_metadata=True)


def partition_counts(bootstrap: str, topics: tuple[str, ...]) -> dict[str, int]:
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        described = admin.describe_topics(list(topics))
    return {t["name"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


def test_topic_names_follow_the_contract() -> None:
    names = TopicNames()
    assert names.inputs == ("iot.camera", "iot.audio", "iot.telemetry")
    assert names.copartitioned == (*names.inputs, "iot.labels")
    outputs = ("iot.events", "iot.deadletter", "iot.incidents", "iot.incident-state")
    assert names.all == (*names.copartitioned, *outputs)


def test_ensure_topics_is_idempotent_and_completes_a_partial_set(bootstrap: str) -> None:
    names = fresh_names()
    create(bootstrap, {names.camera: 4})  # one topic already there, with the requested count

    ensure_topics(bootstrap, names, partitions=4, replication_factor=1)
    first = partition_counts(bootstrap, names.all)
    ensure_topics(bootstrap, names, partitions=4, replication_factor=1)

    assert first == {t: 4 for t in names.all}
    assert partition_counts(bootstrap, names.all) == first


def test_inputs_and_labels_are_copartitioned(bootstrap: str, topics: TopicNames) -> None:
    assert check_copartitioned(bootstrap, topics) == {t: 3 for t in topics.copartitioned}

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        keys = [f"cell-{i:02d}".encode() for i in range(8)]
        acks = {
            (topic, key): producer.send(topic, key=key, value=b"{}").get(timeout=30).partition
            for topic in topics.copartitioned
            for key in keys
        }
    finally:
        producer.close()
    for key in keys:  # a device lands on one partition number in every topic
        assert len({acks[(topic, key)] for topic in topics.copartitioned}) == 1
    assert len({acks[(topics.camera, key)] for key in keys}) > 1  # and keys do spread


@pytest.mark.parametrize("role", ["audio", "labels"])
def test_a_mismatched_partition_count_is_refused(bootstrap: str, role: str) -> None:
    names = fresh_names()
    odd = getattr(names, role)
    create(bootstrap, {names.camera: 3, odd: 2})

    with pytest.raises(TopicLayoutError) as refused:
        ensure_topics(bootstrap, names, partitions=3, replication_factor=1)

    message = str(refused.value)
    assert f"{odd}: 2 partitions" in message and f"{names.camera}: 3 partitions" in message
    assert partition_counts(bootstrap, names.all) == {names.camera: 3, odd: 2}  # nothing created


def test_output_topics_need_not_be_copartitioned(bootstrap: str) -> None:
    names = fresh_names()
    create(bootstrap, {names.events: 1, names.deadletter: 6})
    ensure_topics(bootstrap, names, partitions=3, replication_factor=1)
    counts = partition_counts(bootstrap, names.all)
    made = {t: 3 for t in (*names.copartitioned, names.incidents, names.incident_state)}
    assert counts == {**made, names.events: 1, names.deadletter: 6}


def test_check_copartitioned_reports_counts_and_missing_topics(bootstrap: str) -> None:
    names = fresh_names()
    create(bootstrap, {names.camera: 3, names.audio: 3, names.telemetry: 5})
    with pytest.raises(TopicLayoutError, match=f"{names.telemetry}: 5 partitions"):
        check_copartitioned(bootstrap, names.inputs)
    with pytest.raises(TopicLayoutError, match=f"{names.labels} do not exist"):
        check_copartitioned(bootstrap, names)


def test_camera_and_deadletter_topics_take_8_mib_images(bootstrap: str, topics: TopicNames) -> None:
    image = os.urandom(8 << 20)  # the contract's largest image
    headers = [("content-type", b"image/jpeg"), ("iotfuse.error.message", b"x" * 1000)]
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=LARGE_RECORD_BYTES)
    try:
        acks = {
            t: producer.send(t, key=b"cell-01", value=image, headers=headers).get(timeout=60)
            for t in (topics.camera, topics.deadletter)
        }
        too_big = producer.send(topics.events, key=b"cell-01", value=image)
        with pytest.raises(Exception, match="MessageSizeTooLarge"):  # default 1 MiB limit
            too_big.get(timeout=60)
    finally:
        producer.close()

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        for topic, ack in acks.items():
            tp = TopicPartition(topic, ack.partition)
            consumer.assign([tp])
            consumer.seek(tp, ack.offset)
            records = consumer.poll(timeout_ms=30_000, max_records=1).get(tp, [])
            assert records and records[0].value == image
            assert [(k, v) for k, v in records[0].headers] == headers
    finally:
        consumer.close()
