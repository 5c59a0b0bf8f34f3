"""Prometheus metrics of one pipeline instance (its own registry: no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
            "Records behind the log end, per input topic-partition",
            ["topic", "partition"],
            registry=r,
        )

        self._children: dict[tuple[int, str], Any] = {}

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
                "| metric | type | labels | meaning |",
                "|---|---|---|---|",
                *rows,
            ]
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose `/metrics` over HTTP (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
