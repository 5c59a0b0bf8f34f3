"""Federated normalisation statistics: sites send aggregates, the server combines them.

The telemetry mean/std that `iotfuse train` fits on its training windows comes out the
same from per-site counts, sums and sums of squares per metric (added over the sites),
and so does the class list from per-site label counts. No site sends a value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.learn.dataset import LabelledWindow
from pipeline.learn.federated.protocol import Config, Scalar, counts, numbers


def site_stats(windows: Sequence[LabelledWindow], n_metrics: int) -> Config:
    """A site's stats reply (protocol.py) for its training windows (n_metrics 0: no
    telemetry in the model)."""
    from fusion.train import telemetry_sums

    count, total, total_sq = telemetry_sums((w.inputs for w in windows), n_metrics)
    labels: dict[str, int] = {}
    for w in windows:
        labels[w.label] = labels.get(w.label, 0) + 1
    return {
        "windows": len(windows),
        "count": json.dumps(count.tolist()),
        "sum": json.dumps(total.tolist()),
        "sumsq": json.dumps(total_sq.tolist()),
        "labels": json.dumps(labels),
    }


@dataclass(frozen=True)
class Combined:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: dict[str, int]  # training windows per label over all sites
    windows: int


def combine(replies: Sequence[Mapping[str, Scalar]], n_metrics: int) -> Combined:
    """The federation's statistics from the sites' stats replies (each checked: a reply
    that does not hold what protocol.py says raises BadReply)."""
    from fusion.train import stats_from_sums

    count = np.zeros(n_metrics)
    total = np.zeros(n_metrics)
    total_sq = np.zeros(n_metrics)
    labels: dict[str, int] = {}
    windows = 0
    for reply in replies:
        count += numbers(reply, "count", n_metrics)
        total += numbers(reply, "sum", n_metrics)
        total_sq += numbers(reply, "sumsq", n_metrics)
        for label, n in counts(reply, "labels").items():
            labels[label] = labels.get(label, 0) + n
        windows += int(reply.get("windows", 0))
    mean, std = stats_from_sums(count, total, total_sq) if n_metrics else ((), ())
    return Combined(mean, std, labels, windows)
