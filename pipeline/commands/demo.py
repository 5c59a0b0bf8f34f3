"""`iotfuse demo`: a local Kafka, simulated devices, the pipeline, events as they arrive.

Until a trained default model ships (the training issue), the demo builds an untrained
model with the scenario's classes and says so: the pipeline, windows, dead letters and
delivery are real; the labels are not yet meaningful.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.settings import Settings

METRICS = ("temperature_c", "smoke_ppm", "vibration_rms", "motor_current_a", "door_open")


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=3, help="simulated devices")
    p.add_argument("--duration", type=float, default=20.0, help="simulated seconds")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--model", metavar="DIR", help="model directory (default: shipped model)")


def _model_dir(args: argparse.Namespace, settings: Settings, tmp: Path) -> Path:
    from pipeline.model_runner import default_model_dir  # noqa: PLC0415

    chosen = args.model or settings.runtime.model
    if chosen:
        return Path(chosen)
    if (default_model_dir() / "config.json").exists():
        return default_model_dir()
    from fusion.config import ModelConfig, TelemetryConfig  # noqa: PLC0415
    from fusion.model import FusionClassifier  # noqa: PLC0415
    from fusion.modelfile import save_model  # noqa: PLC0415
    from pipeline.simulate import CLASSES  # noqa: PLC0415

    print("demo: no trained default model ships yet; using an UNTRAINED model "
          "(labels are random until `iotfuse train` produces one)")
    cfg = ModelConfig(name="untrained-demo", classes=tuple(CLASSES),
                      telemetry=TelemetryConfig(metrics=METRICS))
    save_model(FusionClassifier(cfg), tmp / "model")
    return tmp / "model"


def demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.app import build_engine  # noqa: PLC0415
    from pipeline.kafka.admin import TopicNames, ensure_topics  # noqa: PLC0415
    from pipeline.kafka.broker import LocalKafka  # noqa: PLC0415
    from pipeline.model_runner import ModelRunner  # noqa: PLC0415
    from pipeline.simulate import ScenarioConfig, episodes_from_records, simulate  # noqa: PLC0415
    from pipeline.worker import KafkaWorker  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="iotfuse-demo-") as tmp_name:
        tmp = Path(tmp_name)
        runner = ModelRunner.load(_model_dir(args, settings, tmp), settings.runtime.device)
        scenario = ScenarioConfig(seed=args.seed, devices=args.devices,
                                  duration_s=args.duration, start_ms=_now_ms() - 60_000)
        records = list(simulate(scenario))
        truth = episodes_from_records(records, settings.topics.labels)
        print(f"demo: simulated {len(records)} records from {args.devices} devices "
              f"({args.duration:.0f} s each)")
        with LocalKafka() as kafka:
            print(f"demo: local Kafka at {kafka.bootstrap_servers}")
            t = settings.topics
            ensure_topics(kafka.bootstrap_servers, TopicNames.from_settings(t), 3, 1)
            kafka_settings = dataclasses.replace(
                settings.kafka, bootstrap_servers=kafka.bootstrap_servers)
            live = dataclasses.replace(
                settings,
                kafka=kafka_settings,
                windows=dataclasses.replace(settings.windows, idle_timeout_ms=2000),
                runtime=dataclasses.replace(settings.runtime, metrics_port=0),
            )
            _produce(kafka.bootstrap_servers, records)
            worker = KafkaWorker(live, build_engine(live, runner))
            stop = threading.Event()
            thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
            thread.start()
            shown = _show_events(kafka.bootstrap_servers, t.events, truth, len(records))
            stop.set()
            thread.join(timeout=60)
        print(f"demo: done. {shown['events']} events, {shown['correct']} matching the "
              f"simulator's ground truth ({shown['correct'] / max(shown['events'], 1):.0%}).")
    return 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _produce(bootstrap: str, records: list[Any]) -> None:
    from kafka import KafkaProducer  # noqa: PLC0415

    from pipeline.producer import BoundedProducer  # noqa: PLC0415

    out: BoundedProducer[None] = BoundedProducer(
        KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                      max_request_size=11 * 1024 * 1024), 32 * 1024 * 1024)
    for r in records:
        out.send(None, r.topic, r.key, r.value, r.headers, r.timestamp_ms)
    out.flush()
    out.close()


def _show_events(bootstrap: str, topic: str, truth: Any, n_records: int) -> dict[str, int]:
    from kafka import KafkaConsumer  # noqa: PLC0415

    from pipeline.simulate import label_at  # noqa: PLC0415

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=None)
    counts = {"events": 0, "correct": 0}
    quiet_since = time.monotonic()
    print(f"{'device':<10} {'window start':>14} {'label':<14} {'conf':>5}  truth")
    while time.monotonic() - quiet_since < 15:  # stop once no event came for 15 s
        for msgs in consumer.poll(timeout_ms=500).values():
            for m in msgs:
                v = json.loads(m.value)
                mid = (v["window"]["start_ms"] + v["window"]["end_ms"]) // 2
                gt = label_at(truth, v["device_id"], mid)
                counts["events"] += 1
                counts["correct"] += int(gt == v["label"])
                print(f"{v['device_id']:<10} {v['window']['start_ms']:>14} {v['label']:<14} "
                      f"{v['confidence']:>5.2f}  {gt}")
                quiet_since = time.monotonic()
    consumer.close()
    return counts
