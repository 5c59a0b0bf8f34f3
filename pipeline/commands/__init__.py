"""Subcommand registry: name -> (help, add_arguments, handler). Handlers import lazily."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pipeline.commands import (
    demo,
    explain,
    export,
    federate,
    incidents,
    infra,
    learn,
    recordings,
    run,
)

AddArgs = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace, Any], int]

COMMANDS: dict[str, tuple[str, AddArgs, Handler]] = {
    "broker": (
        "run a local Apache Kafka (1 or 3 nodes) in the foreground",
        infra.broker_args,
        infra.broker,
    ),
    "topics": (
        "create the contract's topics (idempotent, co-partitioned)",
        infra.topics_args,
        infra.topics,
    ),
    "run": (
        "consume the input topics and publish one event per device window",
        run.run_args,
        run.run,
    ),
    "demo": (
        "local Kafka + simulated devices + the pipeline, events shown as they arrive",
        demo.demo_args,
        demo.demo,
    ),
    "incidents": (
        "follow incidents: open ones with their age on top, closed ones below (or --json)",
        incidents.incidents_args,
        incidents.incidents,
    ),
    "config": (
        "print the effective settings or the settings reference",
        infra.config_args,
        infra.config,
    ),
    "record": (
        "record Kafka topics (every partition) into a recording file",
        recordings.record_args,
        recordings.record,
    ),
    "replay": (
        "publish a recording to Kafka again, at its original pace or faster",
        recordings.replay_args,
        recordings.replay,
    ),
    "inspect": (
        "summarize a recording (table or JSON) and draw its timeline",
        recordings.inspect_args,
        recordings.inspect,
    ),
    "simulate": (
        "simulated labelled device streams into a recording or Kafka topics",
        learn.simulate_args,
        learn.simulate,
    ),
    "train": (
        "train a fusion model (or a single-modality baseline) from labelled recordings",
        learn.train_args,
        learn.train,
    ),
    "evaluate": (
        "score a model on labelled recordings: metrics.json, confusion matrix, report",
        learn.evaluate_args,
        learn.evaluate,
    ),
    "explain": (
        "which pixels, sounds and sensors made a window's label (PNG report and JSON)",
        explain.explain_args,
        explain.explain,
    ),
    "federate": (
        "federated training: a server and sites that keep their recordings (Flower)",
        federate.federate_args,
        federate.federate,
    ),
    "export": (
        "export a model as one ONNX graph, to serve on ONNX Runtime (no torch needed)",
        export.export_args,
        export.export,
    ),
}
