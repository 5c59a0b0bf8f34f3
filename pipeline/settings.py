"""One typed settings object for every iotfuse command.

Precedence, lowest to highest: the defaults below < a TOML file (`--config FILE`) <
environment variables (`IOTFUSE_<SECTION>__<FIELD>`, e.g. `IOTFUSE_KAFKA__BOOTSTRAP_SERVERS`) <
command-line flags. Every field carries its documentation in `metadata["help"]`;
`docs/configuration.md` is generated from it (`iotfuse config --markdown`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "IOTFUSE_"


class SettingsError(ValueError):
    """A setting is unknown or has a value of the wrong type."""


def _f(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


MASK = "***"


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = _f("127.0.0.1:9092", "Kafka bootstrap servers, comma-separated.")
    group_id: str = _f("iotfuse", "Consumer group of the `run` workers.")
    client_id: str = _f("iotfuse", "Client id prefix for consumers and producers.")
    exactly_once: bool = _f(
        False, "Publish events and commit offsets in Kafka transactions (read_committed)."
    )
    transactional_id: str = _f(
        "", "Transactional id for exactly-once; empty = derived from group id and host."
    )
    security_protocol: str = _f("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: str = _f("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used.")
    sasl_username: str = _f("", "SASL username.")
    sasl_password: str = _f(
        "", "SASL password (prefer the environment variable); printed masked.", secret=True
    )
    ssl_cafile: str = _f("", "CA certificate file for TLS.")
    ssl_certfile: str = _f("", "Client certificate file for TLS.")
    ssl_keyfile: str = _f("", "Client key file for TLS.")
    max_in_flight_bytes: int = _f(
        64 * 1024 * 1024, "Producer bytes sent but not yet acknowledged before sending blocks."
    )
    fetch_max_bytes: int = _f(
        8 * 1024 * 1024,
        "Consumer fetch size (soft: the broker still returns a larger first record, so 8 MiB "
        "images pass). Larger fetches cost kafka-python more CPU (32 MiB: 20% slower drain).",
    )
    max_poll_records: int = _f(
        500,
        "Records returned by one consumer poll at most (kafka-python; librdkafka, parsing in "
        "C, hands out up to 2000: 500 drained 13% slower).",
    )
    fetcher: str = _f(
        "kafka-python",
        "What fetches `run`'s input records: kafka-python (parses in Python, under the "
        "worker's lock) or librdkafka (confluent-kafka: parses in C, 7x less CPU a record; "
        "the group and commits stay kafka-python's). docs/operations.md says what differs.",
    )
    session_timeout_ms: int = _f(30000, "Consumer group session timeout.")
    max_poll_interval_ms: int = _f(300000, "Longest gap between polls before a rebalance.")
    topic_wait_ms: int = _f(
        60000,
        "How long `run` waits at start for the input topics, and the events and "
        "dead-letter topics unless the broker creates topics on first use, to exist before "
        "failing.",
    )
    stall_timeout_ms: int = _f(
        60000,
        "How long a `run` worker may be out of its consumer group, or fetch nothing while "
        "its partitions have records, before it rejoins the group; still so as long again "
        "after, it exits 1 for its supervisor to restart it. Past it `/healthz` answers "
        "503. Keep it above how long a rebalance of your group takes; 0 = off.",
    )


@dataclass(frozen=True)
class TopicSettings:
    camera: str = _f("iot.camera", "Camera frames in (JPEG or PNG).")
    audio: str = _f("iot.audio", "Audio chunks in (WAV or raw PCM).")
    telemetry: str = _f("iot.telemetry", "Telemetry JSON objects in.")
    labels: str = _f("iot.labels", "Ground-truth labels (training and evaluation).")
    events: str = _f("iot.events", "Classified windows out.")
    deadletter: str = _f("iot.deadletter", "Rejected records out, with error headers.")
    incidents: str = _f(
        "iot.incidents", "Incidents out (`iotfuse.incident/v1`: opened, updated, closed)."
    )
    incident_state: str = _f(
        "iot.incident-state",
        "Each device's incident state (compacted), read back after a restart or rebalance.",
    )
    partitions: int = _f(3, "Partitions per topic when iotfuse creates topics.")
    replication_factor: int = _f(1, "Replication factor when iotfuse creates topics.")


@dataclass(frozen=True)
class WindowSettings:
    window_ms: int = _f(0, "Window length; 0 = the model's window length (default 2000).")
    allowed_lateness_ms: int = _f(
        500,
        "A modality's watermark = largest event time seen on it minus this; a device's is the "
        "smallest over its active modalities.",
    )
    idle_timeout_ms: int = _f(
        5000,
        "Wall-clock silence after which a device's windows close (timed to what `run` has "
        "read of the log: a broker away or a lagging partition is not silence).",
    )
    modality_silence_ms: int = _f(
        5000,
        "Wall-clock silence (while its device is heard from) after which a modality stops "
        "holding the device's windows back: a device without a microphone, or with a dead "
        "one, is not held back by audio.",
    )
    forget_after_ms: int = _f(
        3_600_000,
        "Wall-clock silence past the idle timeout after which a device is "
        "forgotten, watermark included (memory stays bounded as devices come and go); a "
        "later record of it starts afresh.",
    )
    max_open_windows: int = _f(10000, "Open windows over all devices before back-pressure.")
    max_buffered_bytes: int = _f(
        512 * 1024 * 1024, "Bytes buffered in open windows before back-pressure."
    )
    max_aligning_bytes: int = _f(
        128 * 1024 * 1024,
        "Bytes of input records held back to merge the topics in event time (a backlog); "
        "past it the worker stops reading the topic-partitions that run ahead (offline "
        "replay: the oldest go on without waiting and may arrive late).",
    )


@dataclass(frozen=True)
class LimitSettings:
    image_max_width: int = _f(4096, "Widest image accepted, pixels.")
    image_max_height: int = _f(4096, "Tallest image accepted, pixels.")
    image_max_bytes: int = _f(8 * 1024 * 1024, "Largest image accepted, bytes.")
    audio_max_seconds: float = _f(10.0, "Longest audio chunk accepted, seconds.")
    telemetry_max_bytes: int = _f(64 * 1024, "Largest telemetry value accepted, bytes.")


@dataclass(frozen=True)
class RuntimeSettings:
    model: str = _f("", "Model directory; empty = the default model shipped with iotfuse.")
    device: str = _f("auto", "Torch device: auto (CUDA when present), cpu, cuda, cuda:N.")
    max_batch: int = _f(64, "Windows encoded and fused together at most.")
    batch_timeout_ms: int = _f(20, "Longest a closed window waits for others to batch with.")
    feature_threads: int = _f(
        0, "Threads decoding a batch's frames; 0 = one per CPU core, at most 4."
    )
    torch_threads: int = _f(
        0,
        "Threads torch may use on the CPU; 0 = half the cores for run, replay and demo "
        "(the rest decode and run the Kafka client), all of them for training.",
    )
    early_inference: bool = _f(
        True,
        "Classify a window in spare time once its device passed its end, before it "
        "closes; at close that result is published unless a late record changed the window.",
    )
    model_thread: str = _f(
        "auto",
        "Classify each batch on a thread of its own while the worker reads on: on, off, or "
        "auto (on for an exported model, which runs without Python's lock; off for torch, "
        "whose operators take the lock back one by one from a worker busy reading).",
    )
    model_timeout_s: float = _f(
        120.0,
        "Longest a batch may stay with the model thread; past it the worker stops and exits "
        "non-zero (its supervisor restarts it) rather than living on without publishing. "
        "0 = no limit.",
    )
    explain_telemetry_top: int = _f(
        0,
        "Add to each event the N telemetry metrics whose absence lowers its label's "
        "probability most (`explanation.telemetry`, docs/contract.md); 0 = off. A torch model "
        "only; costs the telemetry encoder and fusion once more per metric.",
    )
    allocator: str = _f(
        "auto",
        "malloc of `iotfuse run`: auto (jemalloc when the machine has it, else glibc's, said "
        "in a warning), jemalloc (refuse to start without it) or system (as started). On "
        "glibc's malloc a worker's memory creeps under sustained load.",
    )
    commit_interval_ms: int = _f(1000, "How often acknowledged progress is committed.")
    metrics_port: int = _f(9108, "Prometheus metrics HTTP port; 0 = off.")
    metrics_host: str = _f("0.0.0.0", "Address the metrics endpoint binds to.")
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_format: str = _f("text", "text or json (one JSON object per line).")


@dataclass(frozen=True)
class IncidentSettings:
    enabled: bool = _f(
        True, "Turn each device's events into incidents, published to topics.incidents."
    )
    open_threshold: float = _f(
        0.5, "A class's score at or above this in a window is a hit (counts towards opening)."
    )
    close_threshold: float = _f(
        0.25, "A window below this score counts towards closing (<= open_threshold: hysteresis)."
    )
    open_k: int = _f(2, "An incident opens once k of its device's last n windows are hits ...")
    open_n: int = _f(3, "... (n, counted in event time: a missing window is no hit).")
    close_m: int = _f(
        3, "An open incident closes after m windows in a row below close_threshold (or missing)."
    )
    per_class: str = _f(
        "",
        "Per-class overrides of the five above, e.g. "
        "`fire: open=0.4 close=0.25 k=1 n=1; intrusion: m=3`.",
    )
    ignore_classes: str = _f("normal", "Classes that never open an incident (comma-separated).")
    idle_close_ms: int = _f(
        10000,
        "Wall-clock time without an event of its device after which an open incident closes "
        "(the device went idle).",
    )
    update_every: int = _f(
        5, "While open, an update record every this many windows; 0 = open and close only."
    )


@dataclass(frozen=True)
class SinkSettings:
    mqtt_host: str = _f("", "MQTT broker for incidents; empty = the MQTT sink is off.")
    mqtt_port: int = _f(1883, "MQTT broker port (8883 is usual with TLS).")
    mqtt_topic_prefix: str = _f(
        "iotfuse/incidents",
        "Incidents go to PREFIX/DEVICE/CLASS, QoS 1, retained (the current state).",
    )
    mqtt_client_id: str = _f("", "MQTT client id; empty = iotfuse-<host>-<pid>.")
    mqtt_username: str = _f("", "MQTT username; empty = none.")
    mqtt_password: str = _f("", "MQTT password; printed masked.", secret=True)
    mqtt_tls: bool = _f(False, "Connect to the MQTT broker over TLS (certificate verified).")
    mqtt_ca_file: str = _f("", "CA certificates for MQTT TLS; empty = the system's.")
    webhook_url: str = _f("", "HTTP(S) URL incidents are POSTed to as JSON; empty = off.")
    webhook_secret: str = _f(
        "",
        "Shared secret: header X-Iotfuse-Signature is sha256=HMAC-SHA256(secret, body) in hex; "
        "printed masked.",
        secret=True,
    )
    webhook_timeout_ms: int = _f(5000, "Connect and read timeout of one webhook POST.")
    webhook_verify_tls: bool = _f(
        True, "Verify the webhook's TLS certificate and host name (leave on)."
    )
    webhook_ca_file: str = _f("", "CA certificates for the webhook; empty = the system's.")
    max_queued: int = _f(
        10000,
        "Incident records a sink holds while its target is down; past it the oldest update "
        "(else the oldest record) is dropped, counted and logged.",
    )
    max_age_ms: int = _f(
        3_600_000,
        "A record not delivered within this long (retrying) is dropped, counted and logged.",
    )
    retry_initial_ms: int = _f(500, "First retry delay of a failed delivery (then doubled).")
    retry_max_ms: int = _f(30000, "Longest delay between retries.")


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    incidents: IncidentSettings = field(default_factory=IncidentSettings)
    sinks: SinkSettings = field(default_factory=SinkSettings)


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def _coerce(value: Any, target: Any, where: str) -> Any:
    """Convert a TOML/env/CLI value to the field's declared type, or explain why not."""
    if isinstance(target, types.UnionType):
        target = next(t for t in typing.get_args(target) if t is not type(None))
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if target is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if target is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
    except ValueError:
        name = getattr(target, "__name__", str(target))
        raise SettingsError(f"{where}: expected {name}, got {value!r}") from None
    raise SettingsError(f"{where}: unsupported setting type {target!r}")


def apply_overrides(
    settings: Settings, overrides: Mapping[str, Mapping[str, Any]], source: str
) -> Settings:
    """Return `settings` with `overrides[section][field]` applied, converting types."""
    sections = _section_types()
    replaced: dict[str, Any] = {}
    for section, values in overrides.items():
        if section not in sections:
            raise SettingsError(
                f"{source}: unknown section [{section}]; known: {', '.join(sections)}"
            )
        cls = sections[section]
        hints = typing.get_type_hints(cls)
        current = replaced.get(section, getattr(settings, section))
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key not in hints:
                raise SettingsError(
                    f"{source}: unknown setting {section}.{key}; known: {', '.join(hints)}"
                )
            changes[key] = _coerce(value, hints[key], f"{source}: {section}.{key}")
        replaced[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(settings, **replaced)


def from_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: top-level key {section!r} must be a [section] table")
    return data


def from_env(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """`IOTFUSE_KAFKA__BOOTSTRAP_SERVERS=x` -> {"kafka": {"bootstrap_servers": "x"}}."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        out.setdefault(section, {})[key] = value
    return out


def parse_assignments(items: list[str]) -> dict[str, dict[str, str]]:
    """`["kafka.group_id=x"]` (the CLI's `--set`) -> {"kafka": {"group_id": "x"}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise SettingsError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        out.setdefault(section, {})[key] = value
    return out


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Defaults < file < environment < CLI flags."""
    settings = Settings()
    if config_file is not None:
        settings = apply_overrides(settings, from_toml(config_file), str(config_file))
    env = os.environ if environ is None else environ
    settings = apply_overrides(settings, from_env(env), "environment")
    if cli:
        settings = apply_overrides(settings, cli, "command line")
    return settings


def masked(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every setting as plain data, each secret that is set replaced by `MASK`: what
    `iotfuse config` prints, and the only form in which settings reach a log."""
    out: dict[str, dict[str, Any]] = {}
    for section in _section_types():
        values = getattr(settings, section)
        out[section] = {}
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            out[section][f.name] = MASK if f.metadata.get("secret") and value else value
    return out


def settings_markdown() -> str:
    """The reference table of every setting: the one place settings are documented."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `iotfuse config --markdown`; do not edit by hand.",
        "",
        "Precedence: defaults < TOML file (`--config FILE`) < environment"
        " (`IOTFUSE_<SECTION>__<FIELD>`) < command-line flags (`--set SECTION.FIELD=VALUE`"
        " and the named flags of each command).",
        "",
    ]
    for section, cls in _section_types().items():
        lines += [f"## [{section}]", "", "| setting | env | default | meaning |"]
        lines += ["|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            env = f"{ENV_PREFIX}{section.upper()}__{f.name.upper()}"
            lines.append(f"| `{f.name}` | `{env}` | `{f.default!r}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)
