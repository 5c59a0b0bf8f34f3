"""Settings precedence, type conversion, and the generated reference staying current."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.kafka.config import security_config
from pipeline.metrics import Metrics
from pipeline.settings import (
    KafkaSettings,
    Settings,
    SettingsError,
    load_settings,
    settings_markdown,
)


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "iotfuse.toml"
    cfg.write_text(
        '[kafka]\ngroup_id = "from-file"\nbootstrap_servers = "file:9092"\n'
        "[runtime]\nmax_batch = 8\n"
    )
    env = {"IOTFUSE_KAFKA__GROUP_ID": "from-env", "IOTFUSE_RUNTIME__MAX_BATCH": "16"}
    s = load_settings(cfg, environ=env, cli={"runtime": {"max_batch": 32}})
    assert s.kafka.bootstrap_servers == "file:9092"  # file over default
    assert s.kafka.group_id == "from-env"  # env over file
    assert s.runtime.max_batch == 32  # cli over env
    assert s.windows.allowed_lateness_ms == 500  # default


def test_env_values_are_converted_to_the_field_type() -> None:
    s = load_settings(
        environ={"IOTFUSE_KAFKA__EXACTLY_ONCE": "true", "IOTFUSE_LIMITS__AUDIO_MAX_SECONDS": "2.5"}
    )
    assert s.kafka.exactly_once is True
    assert s.limits.audio_max_seconds == 2.5


@pytest.mark.parametrize(
    "env,match",
    [
        ({"IOTFUSE_KAFKA__NOPE": "1"}, "unknown setting kafka.nope"),
        ({"IOTFUSE_NOPE__X": "1"}, r"unknown section \[nope\]"),
        ({"IOTFUSE_RUNTIME__MAX_BATCH": "lots"}, "runtime.max_batch: expected int"),
        ({"IOTFUSE_KAFKA__EXACTLY_ONCE": "maybe"}, "expected bool"),
    ],
)
def test_bad_settings_say_what_is_wrong(env: dict[str, str], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        load_settings(environ=env)


def test_security_settings_pass_through_to_clients() -> None:
    s = load_settings(
        environ={
            "IOTFUSE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "IOTFUSE_KAFKA__SASL_MECHANISM": "PLAIN",
            "IOTFUSE_KAFKA__SASL_USERNAME": "u",
        }
    )
    assert security_config(s.kafka) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
    }


def test_configuration_reference_is_up_to_date() -> None:
    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == settings_markdown() + "\n", (
        "docs/configuration.md is stale: run `iotfuse config --markdown > docs/configuration.md`"
    )


def test_metrics_reference_is_up_to_date() -> None:
    doc = Path(__file__).parent.parent / "docs" / "metrics.md"
    assert doc.read_text() == Metrics().markdown() + "\n", (
        "docs/metrics.md is stale: run `iotfuse config --metrics > docs/metrics.md`"
    )


SECURED = KafkaSettings(
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="worker",
    sasl_password="s3cret",
    ssl_cafile="/ca.pem",
)


def test_every_kafka_client_gets_the_security_settings_and_logs_them_masked() -> None:
    from pipeline.kafka import config

    s = Settings(kafka=SECURED)
    k = s.kafka
    built = {
        "consumer": config.consumer_config(s),
        "offsets": config.offsets_config(s),
        "producer": config.producer_config(s),
        "recorder": config.recorder_config(k),
        "replayer": config.replayer_config(k),
        "simulator": config.simulator_config(k),
        "events reader": config.events_reader_config(k),
        "admin": config.admin_config(k.bootstrap_servers, config.security_config(k)),
    }
    for role, cfg in built.items():
        assert cfg["security_protocol"] == "SASL_SSL", role
        assert cfg["sasl_plain_password"] == "s3cret", role
        assert cfg["ssl_cafile"] == "/ca.pem", role
        assert "s3cret" not in repr(config.printable(cfg)), role
    sizes = {built["producer"]["max_request_size"], built["recorder"]["max_partition_fetch_bytes"]}
    assert sizes == {config.MAX_RECORD_BYTES}


def test_librdkafkas_fetching_consumer_gets_the_same_security_masked() -> None:
    """kafka.fetcher=librdkafka: the same TLS and SASL settings under librdkafka's names."""
    from pipeline.kafka import config

    s = Settings(kafka=replace(SECURED, ssl_certfile="/cert.pem", ssl_keyfile="/key.pem"))
    cfg = config.rdkafka_fetch_config(s)
    assert {k: v for k, v in cfg.items() if k.startswith(("security", "sasl", "ssl"))} == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/ca.pem",
        "ssl.certificate.location": "/cert.pem",
        "ssl.key.location": "/key.pem",
    }
    assert "s3cret" not in repr(config.printable(cfg))
    assert cfg["isolation.level"] == "read_committed" and cfg["enable.auto.commit"] is False
    # a response holds the largest record the contract admits, past the fetch's limit
    assert cfg["receive.message.max.bytes"] > s.kafka.fetch_max_bytes + config.MAX_RECORD_BYTES


def test_an_unknown_fetcher_is_refused_in_one_line() -> None:
    from pipeline.errors import UserError
    from pipeline.kafka.fetch import open_fetch

    s = Settings(kafka=KafkaSettings(fetcher="rdkafka"))
    with pytest.raises(UserError, match="kafka.fetcher='rdkafka': use kafka-python or librdkafka"):
        open_fetch(s, consumer=None)
