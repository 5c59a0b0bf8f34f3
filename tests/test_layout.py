"""The house rules, checked: the folder says what a module may touch.

- pipeline/kafka/ is the one place that imports a Kafka client (kafka-python, and
  confluent-kafka for `kafka.fetcher=librdkafka`); every other module imports
  without it (checked by importing them with kafka-python blocked, and by reading every
  import statement, those inside functions included);
- dependencies point one way: pipeline -> fusion -> encoders;
- no import cycle anywhere, imports inside functions included;
- only the modules every layer reads sit directly under pipeline/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "encoders", "fusion")
TOP_LEVEL = {"cli", "clock", "errors", "logs", "metrics", "records", "settings", "testing"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import module` imports pkg.module
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def _is_kafka_client(name: str) -> bool:
    return name.split(".")[0] in ("kafka", "confluent_kafka")


def test_only_pipeline_kafka_imports_kafka_python() -> None:
    offenders = {
        name: sorted(i for i in _imports(path) if _is_kafka_client(i))
        for name, path in MODULES.items()
        if not (name == "pipeline.kafka" or name.startswith("pipeline.kafka."))
    }
    assert {n: i for n, i in offenders.items() if i} == {}


def test_every_module_outside_pipeline_kafka_imports_with_kafka_python_blocked() -> None:
    names = [n for n in MODULES if not n.startswith("pipeline.kafka")]
    script = (
        "import importlib, sys\n"
        "sys.modules['kafka'] = None  # any import of kafka-python raises ImportError\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_dependencies_point_one_way() -> None:
    allowed = {
        "pipeline": set(PACKAGES),
        "fusion": {"fusion", "encoders"},
        "encoders": {"encoders"},
    }
    wrong = sorted(
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        for imported in _imports(path)
        if imported.split(".")[0] in PACKAGES
        and imported.split(".")[0] not in allowed[name.split(".")[0]]
    )
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = {
        name: {i for i in _imports(path) if i in MODULES and i != name}
        for name, path in MODULES.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert [" -> ".join(c) for c in cycles] == []


def test_only_what_every_layer_reads_sits_directly_under_pipeline() -> None:
    direct = {p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    assert direct <= TOP_LEVEL, f"move {sorted(direct - TOP_LEVEL)} into a room of pipeline/"
