"""The edge install: what `pip install '.[edge]'` serves, checked here with torch blocked.

Every command an edge device runs (run, demo, replay, record, inspect, topics, evaluate)
imports without torch, torchaudio and transformers, serves an exported model on ONNX
Runtime, and a torch model or training there says in one line what to install. CI also
builds the real edge venv and runs a live worker with it (tests/test_edge_kafka.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.recordings.file import RecordingWriter
from pipeline.simulate import ScenarioConfig, simulate

REPO = Path(__file__).resolve().parent.parent
BLOCK = (  # a module set to None in sys.modules raises ImportError when imported
    "import sys\nfor name in ('torch', 'torchaudio', 'transformers'):\n"
    "    sys.modules[name] = None\n"
)
# the modules behind run, demo, replay, record, inspect, topics and evaluate
EDGE_MODULES = [
    "pipeline.cli",
    "pipeline.commands",
    "pipeline.commands.demo_report",
    "pipeline.kafka.worker",
    "pipeline.kafka.admin",
    "pipeline.kafka.record",
    "pipeline.kafka.replay",
    "pipeline.kafka.produce",
    "pipeline.kafka.local.broker",
    "pipeline.stream.assembly",
    "pipeline.stream.model_runner",
    "pipeline.stream.onnx_runner",
    "pipeline.recordings.offline",
    "pipeline.recordings.inspect",
    "pipeline.learn.dataset",
    "pipeline.learn.evaluation",
    "pipeline.learn.report",
    "pipeline.simulate",
    "pipeline.decode",
    "fusion.onnx_model",
]


def edge_python() -> tuple[str, Path]:
    """The interpreter of the edge install and where to run it: the venv IOTFUSE_EDGE_VENV
    names (CI: `make edge`), run outside the source tree so that it imports its installed
    package; else this venv, in the source tree (BLOCK keeps torch out)."""
    venv = os.environ.get("IOTFUSE_EDGE_VENV")
    if venv:
        python = Path(venv).resolve() / "bin" / "python"
        assert python.exists(), f"IOTFUSE_EDGE_VENV={venv} has no bin/python: run make edge"
        return str(python), Path(tempfile.gettempdir())
    return sys.executable, REPO


def blocked(script: str, *argv: str) -> subprocess.CompletedProcess[str]:
    python, cwd = edge_python()
    return subprocess.run(
        [python, "-c", BLOCK + script, *argv], cwd=cwd, capture_output=True, text=True, timeout=240
    )


def without_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    """`iotfuse ARGV` in a process where importing torch, torchaudio or transformers fails."""
    return blocked("from pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n", *argv)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", "--out", str(out), "--overwrite"]) == 0
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "edge.iotrec"
    with RecordingWriter(path) as writer:
        for record in simulate(ScenarioConfig(seed=1001, devices=2, duration_s=10)):
            writer.write(record)
    return path


def test_the_edge_commands_modules_import_without_torch() -> None:
    done = blocked(
        f"import importlib\nfor name in {EDGE_MODULES!r}:\n    importlib.import_module(name)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_replay_evaluate_and_inspect_serve_an_export_without_torch(
    exported: Path, recording: Path, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    done = without_torch(
        "replay", str(recording), "--offline", "--out", str(out), "--model", str(exported)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == 10 and all(e["model"]["version"].startswith("onnx:") for e in events)
    report = tmp_path / "report"
    done = without_torch(
        "evaluate", "--model", str(exported), "--data", str(recording), "--out", str(report)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["model"]["version"].startswith("onnx:") and metrics["windows"] == 10
    assert without_torch("inspect", str(recording)).returncode == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "{rec}", "--offline", "--out", "{tmp}/e.jsonl"],  # the shipped torch model
        ["train", "--data", "{rec}", "--out", "{tmp}/model"],
        ["export", "--out", "{tmp}/exported"],
    ],
    ids=["torch-model", "train", "export"],
)
def test_what_needs_torch_says_in_one_line_what_to_install(
    argv: list[str], recording: Path, tmp_path: Path
) -> None:
    done = without_torch(*(a.format(rec=recording, tmp=tmp_path) for a in argv))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "pip install 'iotfuse[full]'" in done.stderr
