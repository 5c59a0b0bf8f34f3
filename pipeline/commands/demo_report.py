"""The end of `iotfuse demo`: accuracy against the simulator's labels and a timeline PNG.

    results = [WindowResult("cell-00", 0, 2000, "fire", 0.91, "fire"), ...]
    print("\\n".join(summary_lines(results, expected=12)))
    draw_timeline(Path("demo-output/timeline.png"), truth, results, classes)

The timeline has one row per device: the ground-truth label spans as a wide band and the
predicted label of each window as a thin band below it, in the same colour per class. It
is drawn on a matplotlib `Figure` with the Agg canvas: no pyplot, no global state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.recordings.inspect import label_colours

if TYPE_CHECKING:
    from pipeline.simulate import Episode


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One event of the demo next to the simulator's label at its window's middle."""

    device: str
    start_ms: int
    end_ms: int
    label: str
    confidence: float
    truth: str | None  # None: the window lies outside the device's labelled time


def accuracy(results: Iterable[WindowResult]) -> tuple[int, int]:
    """(windows whose label matches the ground truth, windows with a ground truth)."""
    judged = [r for r in results if r.truth is not None]
    return sum(r.label == r.truth for r in judged), len(judged)


def summary_lines(results: Sequence[WindowResult], expected: int) -> list[str]:
    """Events against expected windows, accuracy, and right/true counts per class."""
    right, judged = accuracy(results)
    share = f"{right / judged:.2f}" if judged else "n/a (no labelled window)"
    lines = [
        f"{len(results)} events for {expected} expected windows",
        f"{judged} windows with ground truth, {right} matching: accuracy {share}",
    ]
    true = Counter(r.truth for r in results if r.truth is not None)
    hits = Counter(r.truth for r in results if r.truth is not None and r.label == r.truth)
    if true:
        per = ", ".join(f"{name} {hits[name]}/{n}" for name, n in sorted(true.items()))
        lines.append(f"per class (right/true): {per}")
    return lines


def draw_timeline(
    path: Path,
    truth: Mapping[str, Sequence[Episode]],
    results: Sequence[WindowResult],
    classes: Iterable[str],
    title: str | None = None,
) -> None:
    """Write the timeline PNG to `path` (its directory must exist); the title defaults to
    the accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    devices = sorted({r.device for r in results} | set(truth))
    rows = {device: i for i, device in enumerate(devices)}
    colours = label_colours(
        [*classes, *(r.label for r in results), *(e.label for eps in truth.values() for e in eps)]
    )
    origin = min(
        [r.start_ms for r in results] + [e.start_ms for es in truth.values() for e in es], default=0
    )
    fig = Figure(figsize=(12, 1.6 + 0.6 * max(1, len(devices))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for device, episodes in truth.items():
        for e in episodes:  # ground truth: the wide band
            ax.broken_barh(
                [((e.start_ms - origin) / 1000, (e.end_ms - e.start_ms) / 1000)],
                (rows[device] - 0.42, 0.5),
                facecolors=colours[e.label],
                linewidth=0,
            )
    for r in results:  # predictions: the thin band below, one bar per window
        ax.broken_barh(
            [((r.start_ms - origin) / 1000, (r.end_ms - r.start_ms) / 1000)],
            (rows[r.device] + 0.14, 0.22),
            facecolors=colours[r.label],
            edgecolor="white",
            linewidth=0.5,
        )
    right, judged = accuracy(results)
    share = f"{right / judged:.0%}" if judged else "n/a"
    _decorate(
        ax,
        devices,
        colours,
        origin,
        title or f"iotfuse demo: accuracy {share} ({right} of {judged} windows)",
    )
    fig.tight_layout()
    fig.savefig(path, format="png")


def _decorate(
    ax: Any, devices: list[str], colours: Mapping[str, str], origin: int, title: str
) -> None:
    from matplotlib.patches import Patch

    ax.set_yticks(range(len(devices)), devices)
    ax.set_ylim(len(devices) - 0.5, -0.6)  # first device on top
    start = datetime.fromtimestamp(origin / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    ax.set_xlabel(f"seconds since {start}  (wide band: ground truth, thin band: predicted)")
    ax.set_title(title)
    handles = [Patch(facecolor=c, label=name) for name, c in colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
