"""The docker stack, checked without a Docker engine.

Static: docker/compose.yaml (and the GPU override) run real `iotfuse` subcommands with
valid flags and settings, Kafka's listeners agree with the published ports and with what
the services connect to, the topics follow the contract; docker/Dockerfile and
.dockerignore build a non-root image with the default model, a health check and `iotfuse`
as the entry point.

Live (`kafka`): the compose file's own commands, in its order, as local processes against
the local broker -- topics, then the simulator and two workers in one group -- until
events arrive; the image's health check passes on a worker; SIGTERM stops workers with 0.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import SETTING_FLAGS, build_parser
from pipeline.kafka.admin import TopicNames
from pipeline.settings import Settings, load_settings, parse_assignments

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ROLES = (
    "camera",
    "audio",
    "telemetry",
    "labels",
    "events",
    "deadletter",
    "incidents",
    "incident_state",
)

# --- reading the files -------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}` and `$$`, over a loaded YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VAR.sub(
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or (m.group(2) or ""),
            value,
        )
    return value


def compose(*files: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose files merged like `docker compose -f A -f B` (maps merge, else replace)."""
    merged: dict[str, Any] = {}
    for name in files:
        merged = _merge(merged, yaml.safe_load((DOCKER / name).read_text()))
    out: dict[str, Any] = interpolate(merged, env or {})
    return out


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def iotfuse_services(stack: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in stack["services"].items()
        if str(s.get("image", "")).startswith("iotfuse")
    }


def effective_settings(service: Mapping[str, Any]) -> tuple[Any, Settings]:
    """Parse the service's command with iotfuse's own parser; settings as the container
    gets them (defaults < its environment < its flags). Exits (fails) on a bad flag."""
    command = [str(a) for a in service["command"]]
    try:
        args = build_parser().parse_args(command)
    except SystemExit:  # argparse printed why to stderr
        raise AssertionError(f"`iotfuse {' '.join(command)}` does not parse") from None
    cli: dict[str, dict[str, Any]] = parse_assignments(args.set)
    for dest, (section, name) in SETTING_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            cli.setdefault(section, {})[name] = value
    env = environment(service)
    for name in env:
        assert name.startswith("IOTFUSE_") and "__" in name[8:], (
            f"{name}: iotfuse reads IOTFUSE_<SECTION>__<FIELD> only; this one is ignored"
        )
    return args, load_settings(None, environ=env, cli=cli)


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def published(service: Mapping[str, Any]) -> dict[int, int]:
    """Short-syntax `ports` -> {host port: container port} (single ports only)."""
    out = {}
    for spec in service.get("ports", []):
        *_, host, container = str(spec).split(":")
        out[int(host)] = int(container.split("/")[0])
    return out


def dockerfile() -> list[list[tuple[str, str]]]:
    """Stages of docker/Dockerfile, each a list of (INSTRUCTION, arguments)."""
    lines = [
        ln
        for ln in (DOCKER / "Dockerfile").read_text().splitlines()
        if not ln.lstrip().startswith("#")
    ]
    logical = re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()
    stages: list[list[tuple[str, str]]] = [[]]
    for line in filter(str.strip, logical):
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def healthcheck_command() -> list[str]:
    """The exec-form command of the final stage's HEALTHCHECK."""
    (check,) = [a for op, a in dockerfile()[-1] if op == "HEALTHCHECK"]
    command = json.loads(check.partition(" CMD ")[2] or check.partition("CMD ")[2])
    assert isinstance(command, list)
    return [str(c) for c in command]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins; a
    pattern matching a parent directory matches everything below it)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").strip("/"))
        regex = (
            regex.replace(r"\*\*/", "(?:.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


# --- compose: commands and settings --------------------------------------------------------

STACKS = {"cpu": ("compose.yaml",), "gpu": ("compose.yaml", "compose.gpu.yaml")}


@pytest.mark.parametrize("files", STACKS.values(), ids=STACKS.keys())
def test_every_service_runs_a_real_iotfuse_command_with_valid_settings(
    files: tuple[str, ...],
) -> None:
    stack = compose(*files)
    services = iotfuse_services(stack)
    assert {"topics", "worker", "simulator"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == REPO, name
        assert (REPO / build["dockerfile"]).resolve() == DOCKER / "Dockerfile", name
        args, settings = effective_settings(service)
        assert args.command == {"topics": "topics", "worker": "run", "simulator": "simulate"}.get(
            name, args.command
        )
        # every service speaks the contract's topic names
        assert tuple(getattr(settings.topics, r) for r in ROLES) == TopicNames().all, name
    if "compose.gpu.yaml" in files:
        worker = stack["services"]["worker"]
        assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
        assert effective_settings(worker)[1].runtime.device == "cuda"
        assert {s["build"]["args"]["TORCH_VARIANT"] for s in services.values()} == {"cuda"}


def test_topics_are_created_first_co_partitioned_and_only_by_iotfuse() -> None:
    stack = compose("compose.yaml")
    s = stack["services"]
    _, topics = effective_settings(s["topics"])
    # enough partitions for the documented `--scale worker=3`
    assert topics.topics.partitions >= 3 and topics.topics.replication_factor == 1
    assert s["topics"]["restart"] in ("no", "on-failure")  # one-shot, not a loop
    for name in ("worker", "simulator"):
        assert s[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert s[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert s["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    # no input topic can be auto-created with another partition count
    assert str(environment(s["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"


@pytest.mark.parametrize(
    "env",
    [{}, {"KAFKA_HOST_PORT": "29092", "KAFKA_ADVERTISED_HOST": "gateway.lan"}],
    ids=["defaults", "other-host-port"],
)
def test_listeners_ports_and_bootstrap_servers_agree(env: dict[str, str]) -> None:
    stack = compose("compose.yaml", env=env)
    kafka = stack["services"]["kafka"]
    kenv = environment(kafka)
    bound = listeners(kenv["KAFKA_LISTENERS"])
    advertised = listeners(kenv["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in kenv["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = kenv["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert set(bound) == set(protocols) and controller in bound
    assert controller not in advertised and set(advertised) == set(bound) - {controller}
    node, _, voter = kenv["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert (
        node == str(kenv["KAFKA_NODE_ID"]) and int(voter.rpartition(":")[2]) == bound[controller][1]
    )
    hostname = kafka.get("hostname", "kafka")
    internal = [n for n, (host, _) in advertised.items() if host == hostname]
    external = [n for n in advertised if n not in internal]
    assert internal == [kenv["KAFKA_INTER_BROKER_LISTENER_NAME"]] and len(external) == 1
    ports = published(kafka)
    for name in external:  # a host client is sent to host:port: that port must be published
        host, port = advertised[name]
        assert ports.get(port) == bound[name][1], f"{name} advertises {host}:{port}"
    for name in internal:  # the internal listener is not published (containers only)
        assert bound[name][1] not in ports.values()
    inside = "{}:{}".format(*advertised[internal[0]])
    for name, service in iotfuse_services(stack).items():
        assert effective_settings(service)[1].kafka.bootstrap_servers == inside, name
    assert inside in " ".join(kafka["healthcheck"]["test"])
    cluster_id = kenv["CLUSTER_ID"]  # Kafka's Uuid: 16 bytes in 22 base64url characters
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16 and len(cluster_id) == 22
    if "KAFKA_ADVERTISED_HOST" in env:
        assert advertised[external[0]] == (
            env["KAFKA_ADVERTISED_HOST"],
            int(env["KAFKA_HOST_PORT"]),
        )


def test_workers_scale_in_one_group_with_metrics_on_the_network() -> None:
    s = compose("compose.yaml")["services"]
    worker = s["worker"]
    _, settings = effective_settings(worker)
    assert "container_name" not in worker  # --scale needs generated names
    assert not published(worker), "a fixed host port per worker collides with --scale"
    assert str(settings.runtime.metrics_port) in [str(p) for p in worker["expose"]]
    assert settings.kafka.group_id and "healthcheck" not in worker  # the image's check
    # the image's health check probes metrics: off for the services that serve none
    for name in ("topics", "simulator"):
        assert s[name]["healthcheck"] == {"disable": True}
    assert "test" in s["kafka"]["healthcheck"]


def test_an_optional_mosquitto_takes_the_workers_incidents_when_asked() -> None:
    plain = compose("compose.yaml")["services"]
    mqtt = plain["mosquitto"]
    assert mqtt["profiles"] == ["mqtt"]  # not started by a plain `up`
    assert str(mqtt["image"]).startswith("eclipse-mosquitto:2")
    assert mqtt["command"][-1] == "/mosquitto-no-auth.conf"  # 2.x listens on 1883 with it
    assert published(mqtt) == {1883: 1883}
    # sinks are off unless asked for
    sinks = effective_settings(plain["worker"])[1].sinks
    assert (sinks.mqtt_host, sinks.webhook_url, sinks.webhook_secret) == ("", "", "")
    env = {
        "MQTT_HOST": "mosquitto",
        "WEBHOOK_URL": "https://ops.example/iotfuse",
        "WEBHOOK_SECRET": "s3cret",
        "MQTT_HOST_PORT": "21883",
    }
    asked = compose("compose.yaml", env=env)["services"]
    sinks = effective_settings(asked["worker"])[1].sinks
    assert sinks.mqtt_host == "mosquitto" and "mosquitto" in asked
    assert sinks.mqtt_port in published(asked["mosquitto"]).values()  # the container's port
    assert published(asked["mosquitto"]) == {21883: 1883}
    assert (sinks.webhook_url, sinks.webhook_secret) == ("https://ops.example/iotfuse", "s3cret")
    assert sinks.webhook_verify_tls  # on unless turned off


# --- Dockerfile and build context -------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_model_healthcheck_and_entrypoint() -> None:
    stages = dockerfile()
    final = stages[-1]
    ops = [op for op, _ in final]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["iotfuse"]
    check = " ".join(healthcheck_command())
    assert "/healthz" in check and "urlopen" in check  # 503 on a worker not consuming
    # the port it probes is read from the variable that sets runtime.metrics_port
    (port_var,) = set(re.findall(r"IOTFUSE_\w+", check))
    assert load_settings(None, environ={port_var: "1234"}).runtime.metrics_port == 1234
    # multi-stage: dependencies in their own stage and layer, before any source is copied
    deps = next(st for st in stages if any("-r requirements.txt" in a for op, a in st))
    copied = " ".join(a for op, a in deps if op == "COPY").split()
    assert copied and not {"pipeline", "encoders", "fusion"} & {c.strip("./") for c in copied}
    assert any(op == "COPY" and "/opt/venv" in a and "--from=" in a for op, a in final)
    # the default model: fusion/ (with default_model/ as package data) goes into the wheel,
    # and the final stage refuses to finish without it
    assert any(op == "COPY" and a.split()[0] == "fusion" for st in stages for op, a in st)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'fusion\s*=\s*\[[^]]*"default_model/\*"', pyproject)
    assert any(op == "RUN" and "default_model_dir" in a for op, a in final)
    args = {
        a.partition("=")[0]: a.partition("=")[2] for st in stages for op, a in st if op == "ARG"
    }
    assert args["TORCH_VARIANT"] == "cpu"


def test_the_edge_target_serves_an_exported_model_without_torch() -> None:
    stages = {st[0][1].split()[-1]: st for st in dockerfile()[1:]}  # name -> instructions
    assert list(stages)[-1] == "runtime"  # a plain build still gives the full image
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    heavy = ("torch", "torchaudio", "transformers")
    for deps in (project["dependencies"], extras["edge"]):
        assert not [d for d in deps if re.split(r"[<>=\[ ]", d)[0] in heavy]
    assert any(d.startswith("onnxruntime") for d in extras["edge"])
    assert any(d.startswith("torch") for d in extras["full"]) and "iotfuse[full]" in extras["dev"]
    installs = [a for op, a in stages["edge-deps"] if op == "RUN" and "requirements.txt" in a]
    assert installs and "['edge']" in installs[0] and "['full']" not in installs[0]
    assert "import torch" in installs[0]  # the build stops if torch slipped in
    # pip, setuptools and packages' tests leave in the layer that installed them (removed
    # in a later layer, they stayed in the image: ~0.62 GB estimated against the 0.6 goal)
    assert "pip uninstall --yes --quiet pip setuptools" in installs[0]
    assert "-name tests" in installs[0]
    (deps_full,) = [a for op, a in stages["deps"] if op == "RUN" and "requirements.txt" in a]
    assert "['full']" in deps_full
    assert stages["exported"][0][1].split()[0] == "deps"  # exported with torch, checked
    (export,) = [a for op, a in stages["exported"] if op == "RUN"]
    model = re.search(r"iotfuse export --out (\S+)", export)
    assert model is not None
    edge = stages["edge"]
    copies = [a.split() for op, a in edge if op == "COPY"]
    assert ["--from=edge-deps", "/opt/venv", "/opt/venv"] in copies
    assert any(c[0] == "--from=exported" and c[1] == model.group(1) for c in copies)
    assert not any(c[0] == "--from=deps" for c in copies)  # nothing of the torch venv
    (wheel,) = [a for op, a in edge if op == "RUN" and "/tmp/wheels" in a]
    assert "--python /opt/venv/bin/python" in wheel  # the base image's pip: the venv has none
    env = dict(kv.split("=", 1) for op, a in edge if op == "ENV" for kv in shlex.split(a))
    target = next(c[2] for c in copies if c[0] == "--from=exported")
    assert load_settings(None, environ=env).runtime.model == target
    ops = [op for op, _ in edge]
    users = [a for op, a in edge if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    assert json.loads(dict(edge)["ENTRYPOINT"]) == ["iotfuse"]
    assert dict(edge)["HEALTHCHECK"] == dict(stages["runtime"])["HEALTHCHECK"]


def test_the_served_images_allocate_with_jemalloc() -> None:
    """A worker's RSS crept for minutes on glibc's malloc and held flat on jemalloc (the
    soak, docs/performance.md): both images that serve a model preload it, from the path
    their install links."""
    stages = {st[0][1].split()[-1]: st for st in dockerfile()[1:]}  # name -> instructions
    for name in ("edge", "runtime"):
        assert stages[name][0][1].split()[0] == "served", name
    served = stages["served"]
    env = dict(kv.split("=", 1) for op, a in served if op == "ENV" for kv in shlex.split(a))
    (install,) = [a for op, a in served if op == "RUN" and "libjemalloc2" in a]
    assert env["LD_PRELOAD"].endswith("libjemalloc.so.2")
    assert "ln -s" in install and env["LD_PRELOAD"] in install
    ops = [op for op, _ in served]
    assert ops.index("ENV") > ops.index("RUN")  # preloaded once it is there, not before


JEMALLOC = sorted(Path("/usr/lib").glob("*/libjemalloc.so.2"))  # Debian's libjemalloc2


@pytest.mark.skipif(not JEMALLOC, reason="libjemalloc2 is not installed (.ci/run installs it)")
def test_the_pipeline_runs_on_the_images_allocator(tmp_path: Path) -> None:
    """What the images preload, under torch, OpenCV and the pipeline: `simulate` and
    `evaluate` exit 0 with jemalloc mapped into their process."""
    rec, report = tmp_path / "r.iotrec", tmp_path / "report"
    code = (
        "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        "sys.exit(rc or (0 if 'libjemalloc' in open('/proc/self/maps').read() else 3))"
    )
    env = {**os.environ, "LD_PRELOAD": str(JEMALLOC[0])}
    for argv in (
        ["simulate", "--seed", "3", "--devices", "2", "--duration", "6", "--out", str(rec)],
        ["evaluate", "--data", str(rec), "--out", str(report), "--device", "cpu"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{argv[0]}: exit {done.returncode}\n{done.stderr[-2000:]}"
    assert json.loads((report / "metrics.json").read_text())["windows"] == 6


def test_build_context_holds_the_packages_and_model_but_no_venv_git_or_recordings() -> None:
    stages = dockerfile()
    sources = [
        [w for w in a.split()[:-1] if not w.startswith("--")]
        for st in stages
        for op, a in st
        if op == "COPY" and "--from=" not in a
    ]
    for path in (p for group in sources for p in group):
        assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
        assert not dockerignored(path), f"Dockerfile copies {path}, which .dockerignore drops"
    for kept in (
        "pipeline/cli.py",
        "encoders/modality.py",
        "pipeline/kafka/pom.xml",
        "fusion/default_model/config.json",
        "fusion/default_model/model.safetensors",
    ):
        assert not dockerignored(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_cli.py",
        "bench/x.py",
        "run.iotrec",
        "recordings/a.iotrec",
        "fusion/tmp/a.iotrec",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/x",
    ):
        assert dockerignored(dropped), dropped


# --- live: the compose commands against the local broker --------------------------------


def _iotfuse() -> list[str]:
    script = Path(sys.executable).with_name("iotfuse")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def _with(command: list[Any], flag: str, value: str) -> list[str]:
    out = [str(a) for a in command]
    assert flag in out, f"compose command {out} lacks {flag}"
    out[out.index(flag) + 1] = value
    return out


def _assignments(admin: Any, group: str) -> list[dict[str, list[int]]]:
    """Per member of `group`: topic -> the partitions it holds."""
    members = admin.describe_groups([group])[group]["members"]
    return [
        {
            a["topic"]: sorted(a["partitions"])
            for a in (m["member_assignment"] or {}).get("assigned_partitions", [])
        }
        for m in members
    ]


def _env(service: Mapping[str, Any], **overrides: str) -> dict[str, str]:
    """The service's environment over ours (minus our IOTFUSE_*), with the venv first on
    PATH as /opt/venv/bin is in the image."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("IOTFUSE_")}
    base["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), base.get("PATH", "")))
    return {**base, **environment(service), **overrides}


class Processes:
    """Started commands, each logging to its own file; killed at teardown if still alive."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, name: str, command: list[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=self.logs
            )
        self.started.append((proc, log))
        return proc

    def wait(self, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout_s} s\n{self.tail(proc)}") from None

    def tail(self, proc: subprocess.Popen[bytes]) -> str:
        log = next(log for p, log in self.started if p is proc)
        return f"--- {log.name}:\n" + log.read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


@pytest.mark.kafka
@pytest.mark.slow
def test_the_compose_commands_run_the_pipeline(bootstrap: str, processes: Processes) -> None:
    from kafka import KafkaAdminClient

    from pipeline.kafka.local.runtime import free_ports
    from tests.kafka_util import read_until

    s = compose("compose.yaml")["services"]
    names = TopicNames.prefixed(f"docker-stack-{uuid.uuid4().hex[:8]}")
    group = f"docker-stack-{uuid.uuid4().hex[:8]}"
    extra = [a for r in ROLES for a in ("--set", f"topics.{r}={getattr(names, r)}")]
    extra += ["--set", f"kafka.group_id={group}"]

    def command(name: str) -> list[str]:
        """The service's compose command, pointed at the local broker and our topics."""
        return _iotfuse() + _with(s[name]["command"], "--bootstrap-servers", bootstrap) + extra

    # 1. topics (one-shot), as the compose file orders it
    topics = processes.start("topics", command("topics"), _env(s["topics"]))
    assert processes.wait(topics, 60) == 0, processes.tail(topics)
    partitions = effective_settings(s["topics"])[1].topics.partitions
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        described = admin.describe_topics(list(names.all))
    assert {t["name"]: len(t["partitions"]) for t in described} == {
        t: partitions for t in names.all
    }

    # 2. the simulator (short and fast) and two workers of one group, together
    devices = 2
    sim = _with(
        _with(_with(command("simulator"), "--duration", "6"), "--speed", "3"),
        "--devices",
        str(devices),
    )
    simulator = processes.start("simulator", sim, _env(s["simulator"]))
    envs = [
        _env(s["worker"], IOTFUSE_RUNTIME__METRICS_PORT=str(port))
        for port in free_ports("127.0.0.1", 2, exclude=set())
    ]
    workers = [processes.start("worker", command("worker"), env) for env in envs]

    try:
        events = read_until(
            bootstrap,
            [names.events],
            lambda got: len({e.key for e in got}) >= devices,
            timeout_s=90,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(processes.tail(w) for w in workers)) from None
    for e in events:
        body = json.loads(e.value or b"")
        assert body["schema"] == "iotfuse.event/v1" and body["device_id"].encode() == e.key
    assert processes.wait(simulator, 60) == 0, processes.tail(simulator)

    # both workers are members of the one group, each holding the same partition numbers
    # of every input topic (co-partitioning), together all of them
    deadline = time.monotonic() + 30
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        while not all(held := _assignments(admin, group)) or len(held) < 2:
            assert time.monotonic() < deadline, f"group {group}: {held}\n" + "\n".join(
                processes.tail(w) for w in workers
            )
            time.sleep(0.2)
    for member in held:
        assert len({tuple(member.get(t, ())) for t in names.inputs}) == 1, held
    assert sorted(p for member in held for p in member[names.camera]) == list(range(partitions))
    # the image's HEALTHCHECK passes on every worker
    for env in envs:
        assert subprocess.run(healthcheck_command(), env=env, timeout=30).returncode == 0

    # 3. `docker compose stop`: SIGTERM, and a clean exit
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        assert processes.wait(w, 60) == 0, processes.tail(w)
