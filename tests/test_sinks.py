"""Sinks (pipeline/sinks/): the bounded retry queue, and the webhook against a local HTTP
server that fails, stalls and recovers. The MQTT sink: test_sinks_mqtt.py."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from pipeline.incidents.records import IncidentRecord
from pipeline.metrics import Metrics
from pipeline.settings import Settings, SinkSettings, load_settings, masked
from pipeline.sinks import build_sinks
from pipeline.sinks.queue import Limits, SinkError, SinkQueue
from pipeline.sinks.webhook import WebhookTarget
from pipeline.testing import FakeClock
from tests.kafka_util import wait_until


def rec(n: int, change: str = "update", device: str = "dev-1") -> IncidentRecord:
    body = json.dumps({"incident_id": f"{device}/fire/{n}", "seq": n, "change": change}).encode()
    return IncidentRecord(device, "fire", f"{device}/fire/0", n, change, body)


class FlakyTarget:
    """Fails the first `failures` deliveries, then delivers."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.delivered: list[IncidentRecord] = []
        self.closed = False

    def deliver(self, record: IncidentRecord) -> None:
        if self.failures:
            self.failures -= 1
            raise SinkError("target down")
        self.delivered.append(record)

    def close(self) -> None:
        self.closed = True


def dropped(metrics: Metrics, reason: str, sink: str = "t") -> float:
    return metrics.value("iotfuse_sink_dropped_total", {"sink": sink, "reason": reason})


# -- the queue --------------------------------------------------------------------------------


def test_failed_deliveries_are_retried_with_doubling_delays_in_order() -> None:
    clock, metrics, target = FakeClock(0), Metrics(), FlakyTarget(failures=4)
    q = SinkQueue(
        "t", target, Limits(retry_initial_ms=100, retry_max_ms=300), metrics, clock, start=False
    )
    for n in range(3):
        q.offer(rec(n))
    waits = []
    while (wait := q.step()) is not None:
        waits.append(wait)
        clock.now += round(wait * 1000)
    assert waits[:4] == [0.1, 0.2, 0.3, 0.3]  # doubled, capped at retry_max_ms
    assert [r.seq for r in target.delivered] == [0, 1, 2]
    assert metrics.value("iotfuse_sink_retries_total", {"sink": "t"}) == 4
    assert metrics.value("iotfuse_sink_sent_total", {"sink": "t"}) == 3
    assert metrics.value("iotfuse_sink_queued", {"sink": "t"}) == 0


def test_a_full_queue_drops_the_oldest_update_first_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    q = SinkQueue("t", FlakyTarget(), Limits(max_queued=3), metrics, FakeClock(0), start=False)
    with caplog.at_level(logging.WARNING):
        for record in [rec(0, "open"), rec(1), rec(2), rec(3, "close"), rec(4, "open")]:
            q.offer(record)
    assert q.queued == 3
    kept = [q.step() for _ in range(3)]
    assert kept == [0.0] * 3
    assert [r.seq for r in q.target.delivered] == [0, 3, 4]  # type: ignore[attr-defined]
    assert dropped(metrics, "queue_full") == 2
    [said] = [r.getMessage() for r in caplog.records if "queue_full" in r.getMessage()]
    assert "sinks.max_queued" in said  # once a minute: the second drop is held back


def test_a_record_not_delivered_within_max_age_is_dropped_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, metrics = FakeClock(0), Metrics()
    target = FlakyTarget(failures=10**6)
    q = SinkQueue(
        "t", target, Limits(max_age_ms=1000, retry_initial_ms=400), metrics, clock, start=False
    )
    q.offer(rec(0, "open"))
    with caplog.at_level(logging.WARNING):
        while (wait := q.step()) is not None:
            clock.now += round(wait * 1000) or 1
    assert dropped(metrics, "too_old") == 1 and q.queued == 0
    assert any("not delivered in 1000 ms" in r.getMessage() for r in caplog.records)


def test_what_is_queued_at_shutdown_is_dropped_counted_and_the_target_closed() -> None:
    metrics, target = Metrics(), FlakyTarget(failures=10**6)
    q = SinkQueue("t", target, Limits(retry_initial_ms=10_000), metrics)  # its thread
    q.offer(rec(0, "open"))
    q.offer(rec(1, "close"))
    q.close(timeout_s=0.2)
    assert dropped(metrics, "stopped") == 2 and target.closed


# -- the webhook, against a local server ------------------------------------------------------


@dataclass
class Hook:
    """A local webhook: answers each request by the next mode (200, 500, stall), then 200."""

    modes: list[str] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[bytes] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def hook() -> Iterator[tuple[Hook, str]]:
    state = Hook()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                state.received.append((dict(self.headers), body))
                mode = state.modes.pop(0) if state.modes else "ok"
            if mode == "stall":  # longer than the sink's timeout: it gives up first
                state.release.wait(10)
                status = 503
            else:
                status = 500 if mode == "fail" else 200
            if status == 200:
                state.accepted.append(body)
            try:
                self.send_response(status)
                self.end_headers()
            except OSError:
                pass  # the sink hung up (its timeout)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_port}/hooks/iotfuse?token=abc"
    state.release.set()
    server.shutdown()
    server.server_close()


def webhook_settings(url: str, **extra: object) -> SinkSettings:
    base = SinkSettings(
        webhook_url=url,
        webhook_secret="s3cret",
        webhook_timeout_ms=300,
        retry_initial_ms=10,
        retry_max_ms=40,
    )
    return replace(base, **extra)


def test_webhook_posts_signed_json_with_the_incident_id_and_seq(
    hook: tuple[Hook, str],
) -> None:
    state, url = hook
    target = WebhookTarget(webhook_settings(url))
    record = rec(3, "open")
    target.deliver(record)
    [(headers, body)] = state.received
    assert body == record.body
    assert headers["Content-Type"] == "application/json"
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Iotfuse-Signature"] == f"sha256={expected}"
    assert (headers["X-Iotfuse-Incident-Id"], headers["X-Iotfuse-Seq"]) == ("dev-1/fire/0", "3")


def test_a_webhook_that_fails_stalls_and_recovers_gets_every_record_once_in_order(
    hook: tuple[Hook, str],
) -> None:
    state, url = hook
    state.modes = ["fail", "fail", "stall", "fail"]
    metrics = Metrics()
    sinks = build_sinks(webhook_settings(url), metrics)
    assert sinks is not None
    records = [rec(n, "open" if n == 0 else "update") for n in range(6)]
    slowest = 0.0
    for record in records:  # the pipeline's side: never waits for the target
        t0 = time.perf_counter()
        sinks.offer(record)
        slowest = max(slowest, time.perf_counter() - t0)
    wait_until(lambda: len(state.accepted) == len(records), 30, "every record accepted")
    assert state.accepted == [r.body for r in records]  # in order, each accepted once
    assert slowest < 0.05, f"offer took {slowest:.3f} s"
    assert metrics.value("iotfuse_sink_retries_total", {"sink": "webhook"}) == 4
    wait_until(
        lambda: metrics.value("iotfuse_sink_sent_total", {"sink": "webhook"}) == 6, 10, "sent"
    )
    sinks.close()
    assert (
        metrics.value("iotfuse_sink_dropped_total", {"sink": "webhook", "reason": "stopped"}) == 0
    )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_webhook_tls_is_verified_unless_told_otherwise(
    hook: tuple[Hook, str], certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    state, _ = hook  # its records; the server here speaks TLS
    cert, key = certificate
    raw = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _tls_echo(state))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    raw.socket = context.wrap_socket(raw.socket, server_side=True)
    threading.Thread(target=raw.serve_forever, daemon=True).start()
    https = f"https://127.0.0.1:{raw.server_port}/hook"
    try:
        with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED"):
            WebhookTarget(webhook_settings(https)).deliver(rec(0, "open"))
        WebhookTarget(webhook_settings(https, webhook_ca_file=str(cert))).deliver(rec(1, "open"))
        with caplog.at_level(logging.WARNING):
            unverified = WebhookTarget(webhook_settings(https, webhook_verify_tls=False))
        unverified.deliver(rec(2, "open"))
    finally:
        raw.shutdown()
        raw.server_close()
    assert [json.loads(b)["seq"] for b in state.accepted] == [1, 2]
    assert any("TLS verification is off" in r.getMessage() for r in caplog.records)


def _tls_echo(state: Hook) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            state.accepted.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def test_sinks_are_off_by_default_and_iotfuse_config_shows_them_with_secrets_masked() -> None:
    assert build_sinks(Settings().sinks, Metrics()) is None
    s = load_settings(
        environ={
            "IOTFUSE_SINKS__WEBHOOK_URL": "https://ops.example/hook",
            "IOTFUSE_SINKS__WEBHOOK_SECRET": "s3cret",
            "IOTFUSE_SINKS__MQTT_HOST": "mqtt.lan",
            "IOTFUSE_SINKS__MQTT_PASSWORD": "pw",
        }
    )
    shown = masked(s)["sinks"]
    assert shown["webhook_url"] == "https://ops.example/hook" and shown["mqtt_host"] == "mqtt.lan"
    assert shown["webhook_secret"] == "***" and shown["mqtt_password"] == "***"
    assert shown["webhook_verify_tls"] is True and shown["mqtt_port"] == 1883
    assert masked(Settings())["sinks"]["webhook_secret"] == ""
