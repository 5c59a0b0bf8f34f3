"""Do the explanations mean something? Checked against what the simulator knows.

The simulator drives one metric hardest for each class it shows in telemetry
(pipeline/simulate/telemetry.py): fire raises smoke (40-400 ppm over 1-8) and temperature;
a machine fault multiplies vibration (gamma bursts) and adds motor current; maintenance
stops the machine (current and vibration near 0). On held-out simulated windows and the
shipped model:

- the metric driven hardest ranks first or second, for the report's ranking (Shapley
  values of the metrics) and the stream's (each metric absent in turn);
- deletion: the top-attributed metric or camera region set to its baseline lowers the
  predicted class's probability more than a random one does, on average over >= 100 windows;
- randomisation (Adebayo et al., 2018): the trained model's attributions do not rank cells
  like those of the same architecture with fresh weights.

Figures go to stdout (`pytest -s`); the report in the issue's closing note quotes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from encoders.modality import Modality
from fusion.batch import WindowBatch
from fusion.explain import Attributions, Explainer
from fusion.model import FusionClassifier
from pipeline.learn.dataset import LabelledWindow, labelled_windows
from pipeline.settings import Settings
from pipeline.simulate import ScenarioConfig, simulate
from pipeline.stream.assembly import window_config
from pipeline.stream.ingest import IngestConfig
from pipeline.stream.model_runner import ModelRunner

# the module's CPU time is ~1 minute; the timeout leaves room for a machine shared by many
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(900)]

# what pipeline/simulate/telemetry.py changes for each class: a fault shakes the machine
# and loads its motor (vibration bursts, current up), maintenance stops it, fire smokes.
# A driven metric must rank first or second of the five: in 0.8 of the windows for one
# (chance 0.4), in 0.9 for two (chance 0.7).
DRIVEN = {
    "fire": ("smoke_ppm",),
    "machine_fault": ("vibration_rms", "motor_current_a"),
    "maintenance": ("motor_current_a",),
}
BATCH = 64


@dataclass
class Explained:
    """One batch of windows with what the tests read from it, computed once."""

    ex: Explainer  # log-odds, as the report explains
    score: Explainer  # probability, as the stream explains and the score is
    camera_ig: Attributions
    shapley: Attributions
    ablation: Attributions
    ig: Attributions  # telemetry


@pytest.fixture(scope="module")
def windows(shipped: ModelRunner) -> list[LabelledWindow]:
    """Held-out simulated windows: seed 99 (training used 1, evaluation 1001 and 1002)."""
    s, spec = Settings(), shipped.features
    return labelled_windows(
        simulate(ScenarioConfig(seed=99, devices=6, duration_s=60)),
        IngestConfig.from_settings(s.topics, s.limits, spec.sample_rate),
        window_config(s, spec.window_ms),
        spec,
        s.topics.labels,
    )


@pytest.fixture(scope="module")
def explained(shipped: ModelRunner, windows: list[LabelledWindow]) -> Iterator[list[Explained]]:
    """IG with fixed steps (8 camera, 32 telemetry): the report doubles them until complete,
    which ranks the same here and costs more. One torch thread (as `one_thread`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    for i in range(0, len(windows), BATCH):
        batch = WindowBatch.collate([w.inputs for w in windows[i : i + BATCH]], 16000)
        ex = Explainer(shipped.model, batch)
        score = Explainer(shipped.model, batch, output="probability")
        out.append(
            Explained(
                ex,
                score,
                ex.integrated_gradients(Modality.CAMERA, steps=8),
                ex.metric_shapley(),
                score.metric_ablation(),
                ex.integrated_gradients(Modality.TELEMETRY, steps=32),
            )
        )
    torch.set_num_threads(threads)
    yield out


def per_window(got: list[Explained], name: str) -> np.ndarray:
    """A telemetry method's values per metric, every window [N, M], NaN without telemetry."""
    parts = []
    for e in got:
        a: Attributions = getattr(e, name)
        rows = torch.full((e.ex.batch.size, a.cells.shape[-1]), float("nan"))
        rows[a.rows] = a.per_metric().float()
        parts.append(rows.numpy())
    return np.concatenate(parts)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation of each row of a and b [n, cells] -> [n]."""
    ra, rb = (x.argsort(-1).argsort(-1).double() for x in (a, b))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def test_the_metric_the_simulator_drives_ranks_first_or_second(
    shipped: ModelRunner, windows: list[LabelledWindow], explained: list[Explained]
) -> None:
    classes, metrics = list(shipped.config.classes), list(shipped.config.telemetry.metrics)
    truth = np.array([classes.index(w.label) for w in windows])
    right = torch.cat([e.ex.target for e in explained]).numpy() == truth
    right &= ~np.isnan(per_window(explained, "shapley")).any(axis=1)  # and has telemetry
    lines, failed = [], []
    for label, driven in DRIVEN.items():
        metric = "|".join(driven)
        chosen = right & (truth == classes.index(label))
        assert chosen.sum() >= 8, f"too few correct {label} windows ({chosen.sum()}) to judge"
        for name in ("shapley", "ablation", "ig"):
            values = per_window(explained, name)[chosen]  # [n, M]
            best = values[:, [metrics.index(m) for m in driven]].max(axis=1, keepdims=True)
            rank = (values > best).sum(axis=1)  # the best driven metric's rank; 0 = first
            share = float((rank <= 1).mean())
            lines.append(f"{label:<14} {metric:<16} {name:<9} {share:.2f} of {chosen.sum()}")
            if name != "ig" and share < (0.8 if len(driven) == 1 else 0.9):
                failed.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert not failed, failed


def test_deleting_the_top_attributed_part_lowers_the_score_more_than_a_random_part(
    shipped: ModelRunner, explained: list[Explained]
) -> None:
    """Per window, p(predicted class) falls by `top` when the top-attributed part holds its
    baseline, and by `random` on average over all parts (the expected fall of a part drawn
    at random). Camera parts: a 4 x 4 grid of regions, blurred in every frame (ranked by
    integrated gradients); telemetry parts: the metrics, absent (ranked by Shapley value)."""
    s = shipped.config.camera.image_size
    k = s // 4
    grid = torch.zeros(16, s, s, dtype=torch.bool)  # [R, S, S]
    for r in range(16):
        grid[r, (r // 4) * k : (r // 4 + 1) * k, (r % 4) * k : (r % 4 + 1) * k] = True
    metrics = len(shipped.config.telemetry.metrics)
    by_metric = torch.eye(metrics, dtype=torch.bool).repeat(1, 2)  # [M, 2M]: value, presence
    falls: dict[str, list[torch.Tensor]] = {"camera": [], "telemetry": []}
    for e in explained:
        for m, a, parts, mass in (
            (
                Modality.CAMERA,
                e.camera_ig,
                grid[:, None, None, None],  # [R, 1, 1, 1, S, S]: every frame, every channel
                (e.camera_ig.cells[:, None] * grid[None, :, None]).flatten(2).sum(-1),  # [n, R]
            ),
            (Modality.TELEMETRY, e.shapley, by_metric[:, None, None, :], e.shapley.per_metric()),
        ):
            x, base, rows = e.ex.input(m), e.ex.baseline(m), a.rows
            f, target = e.score.forward(m), e.ex.target[rows][:, None]
            args = (e.ex.tokens[rows], e.ex.present[rows])
            with torch.no_grad():
                p = f(x, *args).gather(1, target)[:, 0]  # [n]
                without = [
                    f(torch.where(part, base, x), *args).gather(1, target)[:, 0] for part in parts
                ]
            fall = p[:, None] - torch.stack(without, dim=1)  # [n, parts]
            top = fall.gather(1, mass.argmax(dim=1, keepdim=True))[:, 0]
            falls[str(m)].append(torch.stack([top, fall.mean(dim=1)], dim=1))
    lines = []
    for m, got in falls.items():
        both = torch.cat(got)  # [n, 2]: top, random
        n, (top, rand) = len(both), both.mean(dim=0).tolist()
        wins = float((both[:, 0] > both[:, 1]).double().mean())
        lines.append(
            f"{m:<10} {n} windows: p falls {top:.4f} (top part) vs {rand:.4f} (random part), "
            f"margin {top - rand:.4f}; the top part's fall is larger in {wins:.0%} of windows"
        )
    print("\n" + "\n".join(lines))
    for got in falls.values():
        both = torch.cat(got)
        assert len(both) >= 100
        assert float(both[:, 0].mean() - both[:, 1].mean()) > 0.01, lines


def test_attributions_differ_from_those_of_a_reinitialised_model(
    shipped: ModelRunner, windows: list[LabelledWindow], explained: list[Explained]
) -> None:
    """Same windows and target class, the same architecture with fresh weights: the rank
    correlation of the cells (per window, then the mean) is near 0. For scale, the trained
    model's two telemetry methods against each other."""
    torch.manual_seed(0)
    fresh = FusionClassifier(shipped.config).eval()
    batch = WindowBatch.collate([w.inputs for w in windows[:16]], 16000)
    trained = Explainer(shipped.model, batch)
    random = Explainer(fresh, batch, target=trained.target)
    lines, rhos = [], {}
    for m in (Modality.CAMERA, Modality.AUDIO, Modality.TELEMETRY):
        a = trained.integrated_gradients(m, steps=16).cells.flatten(1)
        b = random.integrated_gradients(m, steps=16).cells.flatten(1)
        rho, rho_abs = spearman(a, b), spearman(a.abs(), b.abs())
        rhos[m] = float(rho.mean())
        lines.append(
            f"{m:<10} integrated gradients per cell, {len(a)} windows, trained vs fresh: "
            f"{rhos[m]:+.3f} (median {float(rho.median()):+.3f}); of |values| "
            f"{float(rho_abs.mean()):+.3f}"
        )
    against, control = [], []
    for e in explained:  # every window: the metrics' Shapley values
        theirs = Explainer(fresh, e.ex.batch, target=e.ex.target).metric_shapley().cells
        against.append(spearman(e.shapley.cells, theirs))
        control.append(spearman(e.shapley.cells, e.ig.per_metric()))
    vs_fresh, vs_ig = float(torch.cat(against).mean()), float(torch.cat(control).mean())
    lines.append(
        f"telemetry  Shapley values per metric, {len(torch.cat(against))} windows, trained vs "
        f"fresh: {vs_fresh:+.3f}; the trained model's Shapley vs its IG: {vs_ig:+.3f}"
    )
    print("\n" + "\n".join(lines))
    assert abs(rhos[Modality.CAMERA]) < 0.3 and abs(rhos[Modality.AUDIO]) < 0.3, lines
    assert abs(vs_fresh) < 0.3 and vs_ig > vs_fresh + 0.3, lines
