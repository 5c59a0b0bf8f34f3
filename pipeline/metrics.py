"""Prometheus metrics of one pipeline instance (its own registry: no global state), and the
HTTP endpoint that serves them (`/metrics`) with the worker's health (`/healthz`)."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from pipeline.errors import UserError

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

GROUP_STATES = ("unjoined", "rebalancing", "stable")  # a consumer group member's states


class Watched(Protocol):
    """What the worker's liveness rule shows (pipeline/kafka/liveness.py), read at scrape
    time: the time-based values stay right while the worker's loop is blocked."""

    def group_state(self) -> str: ...
    def seconds_since_fetch(self) -> float: ...
    def seconds_out_of_group(self) -> float: ...
    def health(self) -> tuple[bool, str]: ...


def _starting() -> tuple[bool, str]:
    return False, "starting: no worker yet"


def _is_state(watched: Watched, state: str) -> Callable[[], float]:
    return lambda: float(watched.group_state() == state)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records_in = Counter(
            "iotfuse_records_in",
            "Input records consumed (camera, audio, telemetry)",
            ["modality"],
            registry=r,
        )
        self.dead_letters = Counter(
            "iotfuse_dead_letters",
            "Records sent to the dead-letter topic, by reason code (docs/contract.md)",
            ["reason"],
            registry=r,
        )
        self.late_records = Counter(
            "iotfuse_late_records",
            "Records for already closed windows (dropped)",
            ["modality"],
            registry=r,
        )
        self.future_records = Counter(
            "iotfuse_future_records",
            "Records stamped over a minute past the wall clock "
            "(their device's later records turn late)",
            registry=r,
        )
        self.reread_skipped = Counter(
            "iotfuse_reread_skipped",
            "Re-read records of windows emitted before a restart or rebalance (skipped)",
            registry=r,
        )
        self.unknown_metrics = Counter(
            "iotfuse_unknown_metrics", "Telemetry metrics the model does not use", registry=r
        )
        self.copartition_violations = Counter(
            "iotfuse_copartition_violations",
            "Devices seen on different partition numbers across input topics",
            registry=r,
        )
        self.windows_emitted = Counter(
            "iotfuse_windows_emitted", "Window events published", registry=r
        )
        self.early_windows = Counter(
            "iotfuse_early_windows",
            "Windows classified before they closed (classified), and at close whether that "
            "result was used or redone because a record joined the window since",
            ["result"],
            registry=r,
        )
        self.batch_size = Histogram(
            "iotfuse_batch_windows",
            "Windows per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "iotfuse_stage_seconds",
            "Time per batch in a stage: features (frame decode, model inputs), model",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_latency = Histogram(
            "iotfuse_event_latency_seconds",
            "Window close to event acknowledged",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.open_windows = Gauge("iotfuse_open_windows", "Windows open now", registry=r)
        self.buffered_bytes = Gauge(
            "iotfuse_buffered_bytes", "Bytes held in open windows", registry=r
        )
        self.aligning_bytes = Gauge(
            "iotfuse_aligning_bytes",
            "Bytes of input records held back to merge the topics "
            "in event time (windows.max_aligning_bytes)",
            registry=r,
        )
        self.paused = Gauge(
            "iotfuse_consumer_paused", "1 while back-pressure pauses consumption", registry=r
        )
        self.pauses = Counter(
            "iotfuse_backpressure_pauses", "Times back-pressure paused consumption", registry=r
        )
        self.broker_errors = Counter(
            "iotfuse_broker_errors",
            "Broker calls that failed and are retried later (commit, "
            "flush, log_end, lag): is the broker reachable?",
            ["call"],
            registry=r,
        )
        self.over_capacity = Counter(
            "iotfuse_over_capacity",
            "Times reading went on over the window limits: the open "
            "windows could close only with more input",
            registry=r,
        )
        self.incidents = Counter(
            "iotfuse_incidents",
            "Incident records published, by change: open, update, close",
            ["change"],
            registry=r,
        )
        self.incidents_open = Gauge(
            "iotfuse_incidents_open", "Incidents open now on this worker", registry=r
        )
        self.sink_queued = Gauge(
            "iotfuse_sink_queued",
            "Incident records waiting for a sink (mqtt, webhook): its target is slow or down",
            ["sink"],
            registry=r,
        )
        self.sink_sent = Counter(
            "iotfuse_sink_sent", "Incident records a sink delivered", ["sink"], registry=r
        )
        self.sink_retries = Counter(
            "iotfuse_sink_retries", "Failed deliveries a sink will try again", ["sink"], registry=r
        )
        self.sink_dropped = Counter(
            "iotfuse_sink_dropped",
            "Incident records a sink gave up on, by reason: queue_full (sinks.max_queued), "
            "too_old (sinks.max_age_ms), stopped (still queued at shutdown)",
            ["sink", "reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "iotfuse_consumer_lag",
            "Records behind the log end (the broker's end offset, asked every commit "
            "interval), per input topic-partition this worker owns",
            ["topic", "partition"],
            registry=r,
        )
        self.group_state = Gauge(
            "iotfuse_consumer_group_state",
            "1 for the state this worker's consumer group membership is in (unjoined, "
            "rebalancing, stable), 0 for the others",
            ["state"],
            registry=r,
        )
        self.seconds_since_fetch = Gauge(
            "iotfuse_consumer_seconds_since_fetch",
            "Seconds since a poll last returned records (grows on a worker with nothing to "
            "read too: /healthz tells a stalled one apart)",
            registry=r,
        )
        self.seconds_out_of_group = Gauge(
            "iotfuse_consumer_seconds_out_of_group",
            "Seconds this worker has been out of its consumer group (unjoined or "
            "rebalancing); 0 while stable",
            registry=r,
        )
        self.forced_rejoins = Counter(
            "iotfuse_consumer_forced_rejoins",
            "Group rejoins the worker asked for: join_unobserved (a rebalance completed "
            "while no poll waited for it), out_of_group and starved (past "
            "kafka.stall_timeout_ms)",
            ["reason"],
            registry=r,
        )
        self.commits_skipped = Counter(
            "iotfuse_commits_skipped",
            "Offset commits skipped because the group was rebalancing (tried again the "
            "next interval)",
            registry=r,
        )

        self._children: dict[tuple[int, str], Any] = {}
        self.health: Callable[[], tuple[bool, str]] = _starting
        self._server: WSGIServer | None = None

    def watch(self, watched: Watched) -> None:
        """Serve a worker's liveness: group state, time since a fetch and out of the group
        (computed at scrape time), and `/healthz`."""
        for state in GROUP_STATES:
            self.group_state.labels(state).set_function(_is_state(watched, state))
        self.seconds_since_fetch.set_function(watched.seconds_since_fetch)
        self.seconds_out_of_group.set_function(watched.seconds_out_of_group)
        self.health = watched.health

    def labelled(self, metric: Counter | Gauge | Histogram, value: str) -> Any:
        """`metric.labels(value)`, cached: prometheus_client's labels() costs ~20 us a call,
        paid per input record on the hot path."""
        key = (id(metric), value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(value)
        return child

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (for tests and the demo's summary)."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got

    def markdown(self) -> str:
        """The reference of every metric (docs/metrics.md): name as exposed, type, labels."""
        rows = []
        for metric in vars(self).values():
            if isinstance(metric, Counter | Gauge | Histogram):
                [family] = metric.describe()
                name = f"`{family.name}{'_total' if family.type == 'counter' else ''}`"
                if family.type == "histogram":
                    name += " (`_bucket`, `_sum`, `_count`)"
                labels = ", ".join(f"`{n}`" for n in metric._labelnames) or "-"
                rows.append(f"| {name} | {family.type} | {labels} | {family.documentation} |")
        return "\n".join(
            [
                "# Metrics",
                "",
                "Every `iotfuse run` worker serves these in the Prometheus text format at",
                "`http://<host>:9108/metrics` (`runtime.metrics_port`, `runtime.metrics_host`; 0",
                "turns it off). Generated by `iotfuse config --metrics`.",
                "",
                "The same endpoint answers `GET /healthz` with 200 and `ok: ...` while the worker",
                "consumes or has nothing to read, and 503 with the reason once it has been out",
                "of its consumer group, fetched nothing while its partitions have records, not",
                "polled, or not reached the broker, for longer than `kafka.stall_timeout_ms`;",
                "503 `starting` before its first poll ([operations](operations.md)).",
                "",
                "| metric | type | labels | meaning |",
                "|---|---|---|---|",
                *rows,
            ]
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve `/metrics` and `/healthz` over HTTP (daemon threads); returns the bound
        port. A port already taken (another worker on this host) is a UserError naming
        the setting."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            ok, text = self.health()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode() + b"\n"]

        server_class = _Server6 if ":" in host else _Server
        try:
            server = make_server(host, port, app, server_class, handler_class=_Quiet)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(
                    f"metrics port {port} is already in use on {host} (another iotfuse run "
                    "on this host?): give each worker its own runtime.metrics_port "
                    "(--metrics-port, IOTFUSE_RUNTIME__METRICS_PORT), or 0 to turn the "
                    "endpoint off"
                ) from None
            raise UserError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): check "
                "runtime.metrics_host and runtime.metrics_port (--metrics-port; 0 = off)"
            ) from None
        self._server = server
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving (frees the port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process at exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass
