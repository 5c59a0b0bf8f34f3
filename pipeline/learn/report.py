"""An evaluation on disk: metrics.json, confusion_matrix.png and report.md.

    paths = write_report(Path("report"), metrics)   # metrics: evaluation.evaluate_recordings

The PNG is drawn on a matplotlib `Figure` with the Agg canvas: no pyplot, no global state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = "metrics.json"
CONFUSION = "confusion_matrix.png"
REPORT = "report.md"


def confusion_png(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str
) -> None:
    """Counts per (true, predicted) class, each cell shaded by its share of the true class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(cm, dtype=np.int64)  # [C, C]
    rows = counts.sum(axis=1, keepdims=True)  # [C, 1]
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)  # [C, C]
    n = len(classes)
    fig = Figure(figsize=(1.1 * n + 2.5, 1.0 * n + 2.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_xticks(range(n), labels=list(classes), rotation=40, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for t in range(n):
        for p in range(n):
            ax.text(
                p,
                t,
                str(counts[t, p]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[t, p] > 0.5 else "black",
            )
    fig.tight_layout()
    fig.savefig(path)


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _epsilon(model: dict[str, Any]) -> str:
    """The DP epsilon a model spent ("-": trained without DP)."""
    privacy = model.get("privacy")
    return "-" if not privacy else f"{privacy['epsilon']:.2f}"


def report_markdown(metrics: dict[str, Any]) -> str:
    """A short human summary of a metrics dict."""
    model = metrics["model"]
    lines = [
        f"# Evaluation of {model['name']}",
        "",
        f"- model: `{model['path']}` ({model['version']}), modalities "
        f"{', '.join(model['modalities'])}",
        f"- data: {', '.join(f'`{d}`' for d in metrics['data'])}; {metrics['windows']} "
        "labelled windows",
        f"- **macro-F1 {_f(metrics['macro_f1'])}**, accuracy {_f(metrics['accuracy'])}",
        *(
            [f"- trained with DP-SGD: epsilon {_epsilon(model)} at delta {p['delta']:g}"]
            if (p := model.get("privacy"))
            else []
        ),
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, c in metrics["per_class"].items():
        lines.append(
            f"| {name} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} "
            f"| {c['support']} |"
        )
    ablation = metrics.get("ablation", {})
    if ablation:
        lines += [
            "",
            "Modalities removed from the inputs (the model masks them):",
            "",
            "| inputs | macro-F1 | accuracy | windows |",
            "|---|---|---|---|",
        ]
        for name, s in ablation.items():
            lines.append(
                f"| {name.replace('_', ' ')} | {_f(s['macro_f1'])} | "
                f"{_f(s['accuracy'])} | {s['windows']} |"
            )
    compare = metrics.get("compare", [])
    if compare:
        lines += [
            "",
            "Models compared on the same data:",
            "",
            "| model | modalities | macro-F1 | accuracy | windows | DP epsilon | version |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in [{**model, **metrics}, *compare]:
            lines.append(
                f"| {m['name']} | {', '.join(m['modalities'])} | {_f(m['macro_f1'])} "
                f"| {_f(m['accuracy'])} | {m['windows']} | {_epsilon(m)} | {m['version'][:19]} |"
            )
    best = metrics.get("best_single_modality")
    if best is not None:
        lines += [
            "",
            f"Best single-modality score: {best['name']}, macro-F1 "
            f"{_f(best['macro_f1'])}; the model is {best['fused_margin']:+.3f} above it.",
        ]
    lines += ["", f"Confusion matrix: [{CONFUSION}]({CONFUSION}) (rows: true class).", ""]
    return "\n".join(lines)


def write_report(directory: Path, metrics: dict[str, Any]) -> list[Path]:
    """Write the three files into `directory` (created if needed); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / METRICS, directory / CONFUSION, directory / REPORT]
    paths[0].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    title = f"{metrics['model']['name']}: macro-F1 {metrics['macro_f1']:.3f}"
    confusion_png(metrics["confusion_matrix"], metrics["classes"], paths[1], title)
    paths[2].write_text(report_markdown(metrics), encoding="utf-8")
    return paths
