"""A live worker on an exported model, with the edge install, against the real broker.

With IOTFUSE_EDGE_VENV naming a venv of `pip install '.[edge]'` (CI builds one with `make
edge`), the worker is that venv's iotfuse: no torch installed at all. Without it, the
worker is this venv's iotfuse with torch, torchaudio and transformers blocked from import.
Either way its events are the torch model's events for the same records, but for
`model.version`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.kafka.admin import TopicNames
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.simulate import ScenarioConfig, simulate
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.model_runner import ModelRunner
from tests.kafka_util import produce, read_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BLOCK = (
    "import sys\nfor name in ('torch', 'torchaudio', 'transformers'):\n"
    "    sys.modules[name] = None\n"
)
DEVICES, SECONDS = 2, 10


def edge_python() -> tuple[list[str], Path | None]:
    """The interpreter of the edge install and the directory to run it in (outside the
    source tree, so that a real edge venv imports its installed package)."""
    venv = os.environ.get("IOTFUSE_EDGE_VENV")
    if venv:
        python = Path(venv).resolve() / "bin" / "python"
        assert python.exists(), f"IOTFUSE_EDGE_VENV={venv} has no bin/python: run make edge"
        return [str(python)], None
    return [sys.executable], REPO


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", "--out", str(out), "--overwrite"]) == 0
    return out


@pytest.fixture
def worker(
    bootstrap: str, topics: TopicNames, exported: Path, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    python, cwd = edge_python()
    sets = [
        f"topics.{f}={getattr(topics, f)}"
        for f in ("camera", "audio", "telemetry", "events", "deadletter")
    ]
    sets += ["windows.idle_timeout_ms=1500", f"kafka.group_id=g-{topics.camera}"]
    argv = ["run", "--bootstrap-servers", bootstrap, "--model", str(exported), "--device", "cpu"]
    argv += ["--metrics-port", "0", *[a for s in sets for a in ("--set", s)]]
    script = BLOCK + "from pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*python, "-c", script, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd or tmp_path,
        )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def simulated(topics: TopicNames) -> list[Record]:
    names = {m: getattr(topics, m) for m in ("camera", "audio", "telemetry", "labels")}
    cfg = ScenarioConfig(seed=1001, devices=DEVICES, duration_s=SECONDS, topics=names)
    return [r for r in simulate(cfg) if r.topic != topics.labels]


def torch_events(records: list[Record], topics: TopicNames, shipped: ModelRunner) -> dict:
    s = Settings()
    s = replace(
        s,
        topics=replace(
            s.topics, camera=topics.camera, audio=topics.audio, telemetry=topics.telemetry
        ),
    )
    out = run_offline(build_engine(s, shipped), records)
    events = [json.loads(o.value or b"") for o in out if o.topic == s.topics.events]
    return {(e["device_id"], e["window"]["start_ms"]): e for e in events}


def test_a_live_edge_worker_serves_the_export_with_the_torch_models_events(
    bootstrap: str,
    topics: TopicNames,
    worker: subprocess.Popen[bytes],
    shipped: ModelRunner,
    tmp_path: Path,
) -> None:
    records = simulated(topics)
    want = torch_events(records, topics, shipped)
    assert len(want) == DEVICES * SECONDS // 2
    produce(bootstrap, records)

    def done(got: list) -> bool:
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        return len(got) >= len(want)

    got = read_until(bootstrap, [topics.events], done, timeout_s=120)
    live = {
        (e["device_id"], e["window"]["start_ms"]): e for e in (json.loads(p.value) for p in got)
    }
    assert live.keys() == want.keys()
    for key, e in want.items():
        f = live[key]
        assert (
            f["model"]["version"]
            == f"onnx:sha256:{f['model']['version'][12:76]} of {e['model']['version']}"
        )
        assert f["label"] == e["label"] and f["modalities"] == e["modalities"]
        assert max(abs(e["scores"][c] - f["scores"][c]) for c in e["scores"]) <= 1e-4
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
