"""torch against exported models (issue 14), in one run: model only, offline, end to end.

    .venv/bin/python bench/edge_bench.py                       # starts a local broker
    .venv/bin/python bench/edge_bench.py --edge-venv build/edge-venv   # workers without torch
    .venv/bin/python bench/edge_bench.py --quick
    .venv/bin/python bench/edge_bench.py --e2e-only --skip-evaluate --fetchers librdkafka

Models: the shipped torch model, and its exports (fp32, int8, fp16) written into a
temporary directory by `iotfuse export` (each checked against torch). Inputs: the devices of
bench/fleet.py (5 fps 640x480 JPEG, 0.5 s WAV chunks, 10 Hz telemetry; 34 records a window).
One inference thread for every backend (what `iotfuse run` sets on 2 cores).

1. model only: `runner.classify` (preprocessing, trunks, fusion, Shapley) in batches of 64,
   alone, and again beside a thread running pure Python (the worker's situation: the Kafka
   client's parsing, ingest and windows hold the GIL);
2. offline pipeline: `run_offline` over the records, max_batch 64;
3. end to end via Kafka: records produced once; per model, `iotfuse run` in its own process
   (with --edge-venv: that venv's, no torch installed; else this venv's) of a new group
   drains them into its own events topic, once per fetcher of its input (`--fetchers`:
   kafka.fetcher, kafka-python and librdkafka); windows/s from its first batch of events to its
   last (group join, model loading and the first batch left out), the best of `--repeat`
   runs alternated between the models (the others in brackets), and the worker's peak
   RSS (VmHWM);
4. accuracy: `iotfuse evaluate --compare` of torch, fp32 and int8 on held-out recordings
   (`iotfuse simulate --seed 1001`, 32 devices x 60 s; --quick: 4 x 20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from fleet import closing, make_media, produced, settings_for, stream
from kafka import KafkaConsumer

from pipeline.cli import main as iotfuse
from pipeline.clock import wall_clock_ms
from pipeline.kafka.admin import TopicNames, ensure_topics
from pipeline.kafka.local.broker import LocalKafka
from pipeline.stream.assembly import build_engine, run_offline
from pipeline.stream.features import window_inputs
from pipeline.stream.model_runner import ModelRunner, set_inference_threads
from pipeline.stream.windows import Windower

REPO = Path(__file__).resolve().parent.parent
BLOCK = "import sys\nfor n in ('torch', 'torchaudio', 'transformers'):\n    sys.modules[n] = None\n"


def best_rate(job: Callable[[], int], repeat: int) -> float:
    """Items per second of the fastest of `repeat` runs of job (which returns its count)."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        n = job()
        best = max(best, n / (time.perf_counter() - start))
    return best


class PythonLoad:
    """A thread running pure Python until stopped (holds the GIL like a Kafka client)."""

    def __enter__(self) -> PythonLoad:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.spin, daemon=True)
        self.thread.start()
        return self

    def spin(self) -> None:
        while not self.stop.is_set():
            sum(i * i for i in range(2000))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def window_raws(records: list, runner: ModelRunner) -> list:
    cfg = build_engine(settings_for("unused:9092", None), runner).cfg
    windower, out = Windower(cfg.windows), []
    from pipeline.stream.ingest import ingest

    for r in records:
        got = ingest(r, cfg.ingest)
        for w in windower.add(got.device_id, got.item, 0).closed:
            out.append(window_inputs(w, cfg.features).raw)
    out += [window_inputs(w, cfg.features).raw for w in windower.close_all()]
    return [raw for raw in out if raw]


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by process `pid` (user + system), or by the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is None:
        user, nice, system = Path("/proc/stat").read_text().split()[1:4]
        return (int(user) + int(nice) + int(system)) / tick
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


@dataclass
class E2E:
    rate: float  # windows/s from the first event to the last (NaN: the worker stalled)
    peak_mib: float  # the worker's peak RSS
    worker_ms: float  # the worker's CPU per window, between the first event and the last
    machine_ms: float  # every process's CPU per window (broker, bench, worker) meanwhile


def end_to_end(
    bootstrap: str,
    names: object,
    model: Path,
    windows: int,
    python: str,
    block: bool,
    model_thread: str = "auto",
    fetcher: str = "kafka-python",
) -> E2E:
    """The worker on `model` reading the produced windows as fast as it can."""
    t = names
    out = TopicNames.prefixed(f"edge-bench-{time.monotonic_ns()}")  # this run's events
    ensure_topics(bootstrap, out, partitions=3, replication_factor=1)
    sets = [f"topics.{f}={getattr(t, f)}" for f in ("camera", "audio", "telemetry")]
    sets += [
        f"topics.events={out.events}",
        f"topics.deadletter={out.deadletter}",
        f"kafka.group_id=bench-{time.monotonic_ns()}",
        "windows.idle_timeout_ms=600000",
    ]
    argv = ["run", "--bootstrap-servers", bootstrap, "--model", str(model), "--device", "cpu"]
    argv += ["--metrics-port", "0", "--set", "runtime.torch_threads=1"]
    argv += ["--set", f"runtime.model_thread={model_thread}", "--set", f"kafka.fetcher={fetcher}"]
    argv += [a for s in sets for a in ("--set", s)]
    script = (BLOCK if block else "import sys\n") + "from pipeline.cli import main\n"
    script += "sys.exit(main(sys.argv[1:]))\n"
    log = open(Path(tempfile.gettempdir()) / "edge-bench-worker.log", "wb")  # noqa: SIM115
    cwd = REPO if python == sys.executable else Path(tempfile.gettempdir())  # edge: installed
    proc = subprocess.Popen([python, "-c", script, *argv], stdout=log, stderr=log, cwd=cwd)
    consumer = KafkaConsumer(
        out.events,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
    )
    seen, first, last, peak, at_first = 0, 0.0, 0.0, 0.0, 0
    cpu0 = cpu1 = (0.0, 0.0)  # (worker, machine) CPU seconds at the first and last event
    deadline = time.monotonic() + 120  # ~10 s when it works
    try:
        while seen < windows and time.monotonic() < deadline and proc.poll() is None:
            got = sum(len(msgs) for msgs in consumer.poll(timeout_ms=50).values())
            if got:
                now = time.perf_counter()
                cpu = (cpu_seconds(proc.pid), cpu_seconds())
                if not first:
                    first, at_first, cpu0 = now, got, cpu  # the first batch is not measured
                seen, last, cpu1 = seen + got, now, cpu
            status = Path(f"/proc/{proc.pid}/status").read_text()
            if "VmHWM:" in status:  # not once it exited
                peak = max(peak, float(status.split("VmHWM:")[1].split()[0]) / 1024)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        consumer.close()
    if seen < windows:  # kafka-python 3.0.12 sometimes never fetches (bench/pipeline_bench.py)
        print(f"STALLED: {seen} of {windows} events; see {log.name}", file=sys.stderr)
        return E2E(float("nan"), peak, float("nan"), float("nan"))
    measured = max(seen - at_first, 1)
    return E2E(
        measured / max(last - first, 1e-9),
        peak,
        1000 * (cpu1[0] - cpu0[0]) / measured,
        1000 * (cpu1[1] - cpu0[1]) / measured,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--edge-venv", type=Path, help="run the exported models' workers with it")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--skip-kafka", action="store_true")
    p.add_argument("--skip-evaluate", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--e2e-only", action="store_true", help="skip model only and offline")
    p.add_argument("--models", help="end to end only these, comma-separated (e.g. torch,onnx fp32)")
    p.add_argument(
        "--fetchers",
        default="kafka-python,librdkafka",
        help="kafka.fetcher values for end to end, comma-separated",
    )
    a = p.parse_args()
    if a.quick:
        a.devices, a.seconds, a.repeat = 4, 6, 1
    set_inference_threads(1)
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    models = {"torch": None}
    for q in ("none", "int8", "fp16"):
        out = work / f"onnx-{q}"
        assert iotfuse(["export", "--out", str(out), "--quantize", q]) == 0
        models[{"none": "onnx fp32"}.get(q, f"onnx {q}")] = out
    runners = {k: ModelRunner.load(v, "cpu") for k, v in models.items()}
    fp32 = models["onnx fp32"]
    media = make_media()
    t0 = (wall_clock_ms() // 2000) * 2000 - a.seconds * 1000 - 60_000
    records = stream(a.devices, t0, a.seconds, media)
    windows = a.devices * a.seconds // 2
    raws = window_raws(records, runners["torch"])
    lines = [
        f"{a.devices} devices x {a.seconds} s: {windows} windows, {len(records)} records; "
        f"1 inference thread; {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"
    ]

    def classify_all(runner: ModelRunner) -> int:
        for i in range(0, len(raws), 64):
            runner.classify(raws[i : i + 64])
        return len(raws)

    def offline(runner: ModelRunner) -> int:
        s = settings_for("unused:9092", None)
        engine = build_engine(replace(s, runtime=replace(s.runtime, feature_threads=1)), runner)
        return sum(1 for o in run_offline(engine, records) if o.topic == s.topics.events)

    table: dict[str, dict[str, str]] = {k: {} for k in models}
    for name, runner in {} if a.e2e_only else runners.items():
        print(f"{name}: model only, offline ...", file=sys.stderr, flush=True)
        table[name]["model"] = f"{best_rate(lambda r=runner: classify_all(r), a.repeat):.0f}"
        with PythonLoad():
            loaded = best_rate(lambda r=runner: classify_all(r), a.repeat)
        table[name]["model+py"] = f"{loaded:.0f}"
        table[name]["offline"] = f"{best_rate(lambda r=runner: offline(r), a.repeat):.0f}"
    if not a.skip_kafka:
        with (
            LocalKafka(nodes=1) if a.bootstrap_servers is None else _Given(a.bootstrap_servers) as k
        ):
            bootstrap = k.bootstrap_servers
            names = produced(bootstrap, records + closing(a.devices, t0 + a.seconds * 1000, media))
            # the exported fp32 model once more with the model thread off: what it buys
            workers = {**{k: (v, "auto") for k, v in models.items()}, NO_THREAD: (fp32, "off")}
            if a.models:
                workers = {k: v for k, v in workers.items() if k in a.models.split(",")}
            fetchers = a.fetchers.split(",")
            runs: dict[tuple[str, str], list[E2E]] = {(k, f): [] for k in workers for f in fetchers}
            for n in range(a.repeat):  # alternated: the machine's speed drifts
                for (name, fetcher), (model, thread) in ((k, workers[k[0]]) for k in runs):
                    print(f"{name}: end to end, round {n + 1} ...", file=sys.stderr, flush=True)
                    edge = model is not None and a.edge_venv is not None
                    python = (
                        str(a.edge_venv.resolve() / "bin" / "python") if edge else sys.executable
                    )
                    path = model or REPO / "fusion" / "default_model"
                    block = model is not None
                    runs[name, fetcher].append(
                        end_to_end(bootstrap, names, path, windows, python, block, thread, fetcher)
                    )
            for (name, fetcher), got in runs.items():
                row = name if len(fetchers) == 1 else f"{name}, {fetcher}"
                table.setdefault(row, {}).update(e2e_columns(got))
    cols = ["model", "model+py", "offline", "e2e", "rss", "worker_ms", "machine_ms"]
    heads = ["model only", "beside Python", "offline", "e2e Kafka", "worker RSS MiB"]
    heads += ["worker CPU ms", "all CPU ms"]
    lines.append(f"{'windows/s':<20}" + "".join(f"{h:>15}" for h in heads))
    lines.append(
        "(e2e: the best run, the others in brackets; * a run that stalled, left out; CPU ms: "
        "per window in the best run, the worker's and every process's on the machine)"
    )
    for name in table:
        lines.append(f"{name:<20}" + "".join(f"{table[name].get(c, '-'):>15}" for c in cols))
    if not a.skip_evaluate:
        print("evaluate --compare ...", file=sys.stderr, flush=True)
        devices, seconds = (4, 20) if a.quick else (32, 60)
        rec = work / "held-out.iotrec"
        sim = ["simulate", "--seed", "1001", "--devices", str(devices), "--duration", str(seconds)]
        assert iotfuse([*sim, "--out", str(rec)]) == 0
        report = work / "report"
        compare = [str(models["onnx fp32"]), str(models["onnx int8"])]
        argv = ["evaluate", "--data", str(rec), "--out", str(report), "--compare", *compare]
        assert iotfuse([*argv, "--device", "cpu"]) == 0
        m = json.loads((report / "metrics.json").read_text())
        lines.append(
            f"held-out (seed 1001, {devices} x {seconds} s, {m['windows']} windows) macro-F1: "
            f"torch {m['macro_f1']:.4f}, "
            + ", ".join(
                f"{n} {c['macro_f1']:.4f}"
                for n, c in zip(("fp32", "int8"), m["compare"], strict=True)
            )
        )
    print("\n".join(lines))
    return 0


NO_THREAD = "onnx fp32, no thread"  # runtime.model_thread=off


def e2e_columns(runs: list[E2E]) -> dict[str, str]:
    """The best run's rate (the others in brackets), CPU per window and the peak RSS."""
    ok = sorted((r for r in runs if r.rate == r.rate), key=lambda r: -r.rate)  # NaN: stalled
    stalled = "*" * (len(runs) - len(ok))
    if not ok:
        return {"e2e": "-" + stalled}
    best = ok[0]
    return {
        "e2e": f"{best.rate:.0f} ({'/'.join(f'{r.rate:.0f}' for r in ok[1:])}){stalled}",
        "rss": f"{max(r.peak_mib for r in runs):.0f}",
        "worker_ms": f"{best.worker_ms:.1f}",
        "machine_ms": f"{best.machine_ms:.1f}",
    }


class _Given:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap_servers = bootstrap

    def __enter__(self) -> _Given:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
