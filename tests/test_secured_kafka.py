"""Every command that talks to Kafka, against a secured broker (issue 15, part 3).

One secured local broker for the module (TLS from a generated CA, SCRAM-SHA-512 users, the
standard authorizer): each command runs as a user whose ACLs cover only its own topics,
group and transactional id, and works end to end; a wrong password, an untrusted
certificate, a plaintext client on the TLS port or one missing ACL ends it within seconds
with one line naming the cause; no password shows in any output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from pipeline.cli import main
from pipeline.kafka.access import worker_grants
from pipeline.kafka.admin import TopicNames, check_copartitioned, ensure_topics
from pipeline.kafka.fetch import FETCHERS
from pipeline.kafka.local.broker import LocalKafka
from pipeline.kafka.local.security import SecurityConfig, make_ca
from pipeline.recordings.file import RecordingWriter
from pipeline.records import Record
from pipeline.settings import MASK
from pipeline.stream.model_runner import ModelRunner
from tests.factory import T0, device_stream, make_model
from tests.kafka_util import settings_for, to_topics, worker_thread

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
USERS = (
    "topics-maker",
    "simulator",
    "recorder",
    "replayer",
    "worker",
    "worker-eos",
    "no-read-audio",
    "no-write-events",
    "no-write-deadletter",
    "no-write-incidents",
    "no-group",
    "group-describe-only",
    "no-transactional-id",
    "nobody",
)
PASSWORDS = {user: f"pw-{user}-{secrets.token_hex(8)}" for user in USERS}
FAST_S = 10.0  # a misconfiguration ends a command within this (kafka-python alone: 30 s)
DEVICE = "cell-7"
WINDOWS = {(DEVICE, T0), (DEVICE, T0 + 2000), (DEVICE, T0 + 4000)}


@pytest.fixture(scope="module")
def secured(_no_leftover_jvms: list[int]) -> Iterator[LocalKafka]:
    broker = LocalKafka(security=SecurityConfig(users=PASSWORDS))
    try:
        with broker:
            yield broker
    finally:
        _no_leftover_jvms.extend(broker.started_pids)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner.load(model_dir, "cpu")


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny recording file (replay reads it before it contacts Kafka)."""
    path = tmp_path_factory.mktemp("rec") / "one.iotrec"
    with RecordingWriter(path) as writer:
        writer.write(Record("iot.telemetry", 0, 0, T0, b"d", b'{"temperature_c": 1}', ()))
    return path


def topic_set(broker: LocalKafka, tag: str, create: bool = True) -> TopicNames:
    names = TopicNames.prefixed(f"sec-{tag}-{uuid.uuid4().hex[:6]}")
    if create:
        ensure_topics(broker.bootstrap_servers, names, 3, 1, client_config=broker.admin_security())
    return names


@dataclass
class Ran:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("iotfuse ")]


@pytest.fixture
def iotfuse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Ran]:
    """`iotfuse ARGS` in this process, its [kafka] and [topics] settings in the environment
    (where a deployment puts the password)."""

    def run(args: list[str], kafka: dict[str, str], names: TopicNames) -> Ran:
        env = environment(kafka, names)
        env["IOTFUSE_RUNTIME__METRICS_PORT"] = "0"
        env["IOTFUSE_RUNTIME__TORCH_THREADS"] = str(torch.get_num_threads())  # as it is
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        start = time.monotonic()
        rc = main(args)
        seconds = time.monotonic() - start
        out, err = capsys.readouterr()
        return Ran(rc, out, err, seconds)

    return run


def environment(kafka: dict[str, str], names: TopicNames) -> dict[str, str]:
    """[kafka] and [topics] settings as IOTFUSE_* variables."""
    env = {f"IOTFUSE_KAFKA__{k.upper()}": v for k, v in kafka.items()}
    for f in dataclasses.fields(names):
        env[f"IOTFUSE_TOPICS__{f.name.upper()}"] = getattr(names, f.name)
    return env


def assert_no_secret(text: str, *secrets_: str) -> None:
    for secret in (*PASSWORDS.values(), *secrets_):
        assert secret not in text


def produce_as_admin(broker: LocalKafka, records: list[Record]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers,
        acks="all",
        max_request_size=11 * 1024 * 1024,
        **broker.admin_security(),
    )
    futures = [
        producer.send(r.topic, key=r.key, value=r.value, timestamp_ms=r.timestamp_ms)
        for r in records
    ]
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    producer.close()


def read_events(
    broker: LocalKafka, topic: str, want: set[tuple[str, int]], timeout_s: float = 90.0
) -> set[tuple[str, int]]:
    """(device, window start) of the committed events on `topic`, once `want` are all there."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
        isolation_level="read_committed",
        **broker.admin_security(),
    )
    got: set[tuple[str, int]] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while not want <= got:
            assert time.monotonic() < deadline, f"events after {timeout_s}s: {sorted(got)}"
            for messages in consumer.poll(timeout_ms=200).values():
                for m in messages:
                    event = json.loads(m.value)
                    got.add((event["device_id"], event["window"]["start_ms"]))
    finally:
        consumer.close()
    return got


# -- right credentials, ACLs limited to each command's topics: end to end -----------------


def test_topics_needs_only_create_on_the_contract_topics(
    secured: LocalKafka, iotfuse: Callable[..., Ran]
) -> None:
    names = topic_set(secured, "made", create=False)
    secured.allow(
        "topics-maker", [("topic", t, op) for t in names.all for op in ("create", "describe")]
    )
    ran = iotfuse(["topics"], secured.client_settings("topics-maker"), names)
    assert ran.rc == 0, ran.err
    assert "topics ready" in ran.out
    counts = check_copartitioned(
        secured.bootstrap_servers, names, client_config=secured.admin_security()
    )
    assert set(counts.values()) == {3}
    assert_no_secret(ran.out + ran.err)


def test_simulate_record_replay_each_with_only_its_acls(
    secured: LocalKafka, iotfuse: Callable[..., Ran], tmp_path: Path
) -> None:
    source, target = topic_set(secured, "sim"), topic_set(secured, "replay")
    produced = (source.camera, source.audio, source.telemetry, source.labels)
    secured.allow("simulator", [("topic", t, "write") for t in produced])
    secured.allow("recorder", [("topic", t, "read") for t in produced])
    secured.allow("replayer", [("topic", t, "write") for t in target.copartitioned])

    sim = iotfuse(
        ["simulate", "--seed", "3", "--devices", "1", "--duration", "2", "--max-speed",
         "--bootstrap-servers", secured.bootstrap_servers],
        secured.client_settings("simulator"),
        source,
    )  # fmt: skip
    assert sim.rc == 0, sim.err
    simulated = int(sim.out.split()[1])
    out = tmp_path / "sim.iotrec"
    rec = iotfuse(
        ["record", "--topics", *produced, "--until-end", "--out", str(out)],
        secured.client_settings("recorder"),
        source,
    )
    assert rec.rc == 0, rec.err
    assert f"recorded {simulated} records" in rec.out
    mapping = [f"{old}={new}" for old, new in zip(produced, target.copartitioned, strict=True)]
    rep = iotfuse(
        ["replay", str(out), "--max-speed", "--topic-map", *mapping],
        secured.client_settings("replayer"),
        target,
    )
    assert rep.rc == 0, rep.err
    assert f"replayed {simulated} records" in rep.out
    assert_no_secret(sim.out + sim.err + rec.out + rec.err + rep.out + rep.err)


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_run_works_with_only_the_worker_acls(
    secured: LocalKafka, runner: ModelRunner, fetcher: str
) -> None:
    names = topic_set(secured, f"run-{fetcher}")
    settings = settings_for(secured.bootstrap_servers, names, fetcher=fetcher)
    settings = dataclasses.replace(
        settings, kafka=dataclasses.replace(settings.kafka, **secured.client_settings("worker"))
    )
    secured.allow("worker", worker_grants(settings, tid=None))
    produce_as_admin(secured, to_topics(device_stream(DEVICE, T0, 6), names))
    worker = worker_thread(settings, runner)
    try:
        assert read_events(secured, names.events, WINDOWS) >= WINDOWS
        worker.check()
    finally:
        worker.close()


def test_run_exactly_once_command_with_only_its_acls(
    secured: LocalKafka, model_dir: Path, tmp_path: Path
) -> None:
    """The real `iotfuse run --exactly-once` (a process, stopped by SIGTERM), its password
    in the environment and its log at DEBUG: events committed, nothing leaked."""
    names = topic_set(secured, "eos")
    group, tid = f"g-{names.camera}", f"tx-{names.camera}"
    settings = settings_for(secured.bootstrap_servers, names)
    settings = dataclasses.replace(
        settings, kafka=dataclasses.replace(settings.kafka, group_id=group)
    )
    secured.allow("worker-eos", worker_grants(settings, tid=tid))
    produce_as_admin(secured, to_topics(device_stream(DEVICE, T0, 6), names))
    env = {**os.environ, **environment(secured.client_settings("worker-eos"), names)}
    log = tmp_path / "run.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--exactly-once", "--model",
             str(model_dir), "--group-id", group, "--transactional-id", tid,
             "--metrics-port", "0", "--idle-timeout-ms", "1500", "--log-level", "DEBUG",
             "--set", "runtime.commit_interval_ms=200"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            assert read_events(secured, names.events, WINDOWS) >= WINDOWS, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "(exactly-once)" in text and "stopped cleanly" in text
    assert_no_secret(text)


def test_demo_secure_runs_as_a_user_limited_to_its_topics(
    secured: LocalKafka, iotfuse: Callable[..., Ran], model_dir: Path, tmp_path: Path
) -> None:
    """`iotfuse demo --secure`: its own secured broker, its user allowed only the demo's
    topics and group; the [kafka] security settings of another cluster do not apply."""
    elsewhere = secured.client_settings("nobody")  # not the demo's broker, nor its user
    args = ["demo", "--secure", "--max-speed", "--devices", "1", "--duration", "4",
            "--model", str(model_dir), "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    ran = iotfuse(args, elsewhere, TopicNames())
    assert ran.rc == 0, ran.err
    assert "(TLS, SCRAM-SHA-512 user demo, ACLs for its topics and group only)" in ran.out
    shown = re.search(r"demo: (\d+) events for (\d+) expected windows", ran.out)
    assert shown and shown.group(1) == shown.group(2) != "0", ran.out
    assert_no_secret(ran.out + ran.err)


def test_broker_secure_writes_the_client_settings_and_prints_no_password(
    tmp_path: Path, jvm_alive: Callable[[int], bool]
) -> None:
    """`iotfuse broker --secure`: clients connect with the --config file it names; the
    password is in that file only."""
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "broker", "--secure"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("bootstrap.servers="):
            lines.append(child.stdout.readline())
        said = re.search(r"--config (\S+client\.toml)", "".join(lines))
        assert said, lines
        config = Path(said.group(1))
        assert config.stat().st_mode & 0o077 == 0  # the owner's only
        password = re.search(r'sasl_password = "([^"]+)"', config.read_text())
        assert password and password.group(1) not in "".join(lines)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "topics", "--config", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "topics ready" in done.stdout
        assert password.group(1) not in done.stdout + done.stderr
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
        assert password.group(1) not in child.stdout.read()
    finally:
        child.kill()
        child.wait()


def test_config_masks_the_password(secured: LocalKafka, iotfuse: Callable[..., Ran]) -> None:
    ran = iotfuse(["config"], secured.client_settings("worker"), TopicNames())
    assert ran.rc == 0
    assert json.loads(ran.out)["kafka"]["sasl_password"] == MASK
    assert_no_secret(ran.out + ran.err)


# -- misconfigured connections: within seconds, one line naming the cause ------------------

COMMANDS = ("topics", "run", "record", "replay", "simulate")


def command_args(
    command: str, model_dir: Path, recording: Path, tmp: Path, names: TopicNames, bootstrap: str
) -> list[str]:
    if command == "topics":
        return ["topics"]
    if command == "run":
        return ["run", "--model", str(model_dir)]
    if command == "record":
        return ["record", "--topics", names.camera, "--until-end", "--out", str(tmp / "r.iotrec")]
    if command == "replay":
        return ["replay", str(recording), "--topic-map", f"iot.telemetry={names.telemetry}"]
    assert command == "simulate"
    return ["simulate", "--seed", "1", "--devices", "1", "--duration", "1", "--max-speed",
            "--bootstrap-servers", bootstrap]  # fmt: skip


def kafka_logged(err: str) -> bool:
    """Whether kafka-python logged anything (a line of its own, besides ours)."""
    return re.search(r"^\S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) kafka\.", err, re.M) is not None


def misconfigured(broker: LocalKafka, case: str, tmp: Path) -> tuple[dict[str, str], str, str]:
    """[kafka] settings for `case`, a secret that must not show, and what the line says."""
    good = broker.client_settings("worker")
    if case == "wrong-password":
        wrong = f"wrong-{secrets.token_hex(8)}"
        return {**good, "sasl_password": wrong}, wrong, "SASL authentication as 'worker'"
    if case == "untrusted-certificate":
        _, other_ca = make_ca("someone else's CA")
        (tmp / "other-ca.pem").write_bytes(other_ca)
        return {**good, "ssl_cafile": str(tmp / "other-ca.pem")}, "", "is not trusted"
    assert case == "plaintext-client"
    return {**good, "security_protocol": "SASL_PLAINTEXT"}, "", "expects TLS"


@pytest.mark.parametrize("case", ["wrong-password", "untrusted-certificate", "plaintext-client"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_misconfigured_connection_ends_the_command_in_one_line(
    secured: LocalKafka,
    iotfuse: Callable[..., Ran],
    model_dir: Path,
    recording: Path,
    tmp_path: Path,
    command: str,
    case: str,
) -> None:
    names = topic_set(secured, "bad", create=False)
    kafka, secret, cause = misconfigured(secured, case, tmp_path)
    args = command_args(command, model_dir, recording, tmp_path, names, secured.bootstrap_servers)
    ran = iotfuse(args, kafka, names)
    assert ran.rc == 1, ran.err
    assert ran.seconds < FAST_S
    assert len(ran.lines) == 1 and cause in ran.lines[0], ran.err
    assert secured.bootstrap_servers in ran.lines[0]
    assert "Traceback" not in ran.err and not kafka_logged(ran.err)
    assert_no_secret(ran.out + ran.err, *([secret] if secret else []))


@pytest.mark.parametrize("command", ["topics", "record"])
def test_a_tls_client_on_a_plaintext_listener_ends_in_one_line(
    secured: LocalKafka,
    bootstrap: str,
    iotfuse: Callable[..., Ran],
    model_dir: Path,
    recording: Path,
    tmp_path: Path,
    command: str,
) -> None:
    """The session's plaintext broker, asked for TLS."""
    names = topic_set(secured, "plain", create=False)
    kafka = {**secured.client_settings("worker"), "bootstrap_servers": bootstrap}
    ran = iotfuse(
        command_args(command, model_dir, recording, tmp_path, names, bootstrap), kafka, names
    )
    assert ran.rc == 1, ran.err
    assert ran.seconds < FAST_S
    assert len(ran.lines) == 1 and "does not answer TLS" in ran.lines[0], ran.err
    assert "Traceback" not in ran.err and not kafka_logged(ran.err)
    assert_no_secret(ran.out + ran.err)


# -- one ACL missing: within seconds, one line naming it --------------------------------


def worker_without(
    broker: LocalKafka,
    user: str,
    names: TopicNames,
    missing: tuple[str, str, str] | None,
    tid: str | None = None,
) -> dict[str, str]:
    settings = settings_for(broker.bootstrap_servers, names)
    grants = [g for g in worker_grants(settings, tid) if g != missing]
    broker.allow(user, grants)
    return {**broker.client_settings(user), "group_id": settings.kafka.group_id}


RUN_MISSING = {
    "no-read-audio": (lambda n: ("topic", n.audio, "read"), "READ on topic {n.audio}"),
    "no-write-events": (lambda n: ("topic", n.events, "write"), "WRITE on topic {n.events}"),
    "no-write-deadletter": (
        lambda n: ("topic", n.deadletter, "write"),
        "WRITE on topic {n.deadletter}",
    ),
    "no-write-incidents": (
        lambda n: ("topic", n.incidents, "write"),
        "WRITE on topic {n.incidents}",
    ),
    "no-group": (
        lambda n: ("group", f"g-{n.camera}", "read"),
        "Read on consumer group g-{n.camera}",
    ),
}


@pytest.mark.parametrize("user", sorted(RUN_MISSING))
def test_run_without_one_of_its_acls_says_which(
    secured: LocalKafka, iotfuse: Callable[..., Ran], model_dir: Path, user: str
) -> None:
    names = topic_set(secured, user)
    missing, says = RUN_MISSING[user]
    kafka = worker_without(secured, user, names, missing(names))
    ran = iotfuse(["run", "--model", str(model_dir)], kafka, names)
    assert ran.rc == 1, ran.err
    assert ran.seconds < FAST_S
    assert len(ran.lines) == 1 and says.format(n=names) in ran.lines[0], ran.err
    assert f"User:{user}" in ran.lines[0]
    assert "Traceback" not in ran.err and not kafka_logged(ran.err)
    assert_no_secret(ran.out + ran.err)


def test_run_refused_after_its_start_checks_says_why_in_one_line(
    secured: LocalKafka, model_dir: Path
) -> None:
    """Describe on the group passes the start checks, but joining needs Read: the running
    consumer is refused, and `iotfuse run` (a process: it takes over fd 2 once started)
    still ends in one line naming the group."""
    names = topic_set(secured, "describe-group")
    settings = settings_for(secured.bootstrap_servers, names)
    group = settings.kafka.group_id
    grants = worker_grants(settings, tid=None)
    secured.allow("group-describe-only", [g for g in grants if g[0] != "group"])
    secured.allow("group-describe-only", [("group", group, "describe")])
    env = {**os.environ, **environment(secured.client_settings("group-describe-only"), names)}
    args = ["run", "--model", str(model_dir), "--group-id", group, "--metrics-port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("iotfuse run:")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(lines) == 1 and f"consumer group '{group}'" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert_no_secret(done.stdout + done.stderr)


def test_run_exactly_once_without_its_transactional_id_says_so(
    secured: LocalKafka, iotfuse: Callable[..., Ran], model_dir: Path
) -> None:
    names = topic_set(secured, "notid")
    kafka = worker_without(secured, "no-transactional-id", names, None, tid=None)
    args = ["run", "--model", str(model_dir), "--exactly-once", "--transactional-id", "tx-x"]
    ran = iotfuse(args, kafka, names)
    assert ran.rc == 1, ran.err
    assert ran.seconds < FAST_S
    assert len(ran.lines) == 1 and "Write on transactional id tx-x" in ran.lines[0], ran.err
    assert_no_secret(ran.out + ran.err)


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("topics", "User:nobody is not authorized for topic"),
        ("record", "READ on topic {n.camera}"),
        ("replay", "WRITE on topic {n.telemetry}"),
        ("simulate", "WRITE on topic {n.camera}"),
    ],
)
def test_other_commands_without_their_acls_say_which(
    secured: LocalKafka,
    iotfuse: Callable[..., Ran],
    model_dir: Path,
    recording: Path,
    tmp_path: Path,
    command: str,
    says: str,
) -> None:
    names = topic_set(secured, "nobody")
    args = command_args(command, model_dir, recording, tmp_path, names, secured.bootstrap_servers)
    ran = iotfuse(args, secured.client_settings("nobody"), names)
    assert ran.rc == 1, ran.err
    assert ran.seconds < FAST_S
    assert len(ran.lines) == 1 and says.format(n=names) in ran.lines[0], ran.err
    assert "Traceback" not in ran.err and not kafka_logged(ran.err)
    assert_no_secret(ran.out + ran.err)
