"""The end of `iotfuse demo`: accuracy against the simulator's labels and a timeline PNG.

    results = [WindowResult("cell-00", 0, 2000, "fire", 0.91, "fire"), ...]
    print("\\n".join(summary_lines(results, expected=12)))
    draw_timeline(Path("demo-output/timeline.png"), truth, results, classes, incidents=spans)

The timeline has one row per device: the ground-truth label spans as a wide band, the
predicted label of each window as a thin band below it, in the same colour per class, and
each incident as a line under them from its start to its end (an arrow: still open). It
is drawn on a matplotlib `Figure` with the Agg canvas: no pyplot, no global state.
`Incidents` keeps the demo's incident records and says each opening and close in a line.
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


@dataclass(frozen=True, slots=True)
class IncidentSpan:
    """An incident as the demo shows it: `end_ms` None while it is still open."""

    device: str
    cls: str
    start_ms: int
    end_ms: int | None
    last_end_ms: int


class Incidents:
    """The latest record of each incident; a line for each one opened or closed."""

    def __init__(self, truth: Mapping[str, Sequence[Episode]]) -> None:
        self.truth = truth
        self.latest: dict[str, Mapping[str, Any]] = {}

    def add(self, record: Mapping[str, Any]) -> str | None:
        """Take a record; the line saying what happened, or None (an update, a repeat)."""
        from pipeline.simulate import label_at

        key = str(record["incident_id"])
        seen = self.latest.get(key)
        if seen is not None and int(seen["seq"]) >= int(record["seq"]):
            return None
        self.latest[key] = record
        device, cls, start = record["device_id"], record["class"], int(record["start_ms"])
        if record["change"] == "open":
            truth = label_at(self.truth, device, start + 1000) or "-"
            return f"  >> incident opened: {device} {cls} since {_hms(start)} (truth: {truth})"
        if record["change"] == "close":
            end = int(record["end_ms"])
            return (
                f"  >> incident closed: {device} {cls} {_hms(start)}-{_hms(end)} "
                f"({(end - start) / 1000:.0f} s, peak {float(record['peak_score']):.2f}, "
                f"{record['close_reason']})"
            )
        return None

    @property
    def spans(self) -> list[IncidentSpan]:
        return [
            IncidentSpan(
                r["device_id"],
                r["class"],
                int(r["start_ms"]),
                None if r["state"] != "closed" else int(r["end_ms"]),
                int(r["last_window"]["end_ms"]),
            )
            for r in self.latest.values()
        ]

    def summary(self) -> str:
        spans = self.spans
        still = sum(s.end_ms is None for s in spans)
        true = sum(e.label != "normal" for eps in self.truth.values() for e in eps)
        return (
            f"incidents: {len(spans)} opened ({len(spans) - still} closed, {still} still open) "
            f"for {true} true incidents (ground-truth episodes other than normal)"
        )


def _hms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


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
    *,
    incidents: Sequence[IncidentSpan] = (),
) -> None:
    """Write the timeline PNG to `path` (its directory must exist); the title defaults to
    the accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    devices = sorted({r.device for r in results} | set(truth) | {i.device for i in incidents})
    rows = {device: i for i, device in enumerate(devices)}
    colours = label_colours(
        [*classes, *(r.label for r in results), *(e.label for eps in truth.values() for e in eps)]
        + [i.cls for i in incidents]
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
    for i in incidents:  # a line under the bands, from start to end; an arrow: still open
        end = i.end_ms if i.end_ms is not None else i.last_end_ms
        x0, x1, y = (i.start_ms - origin) / 1000, (end - origin) / 1000, rows[i.device] + 0.44
        ax.plot([x0, x1], [y, y], color=colours[i.cls], linewidth=3, solid_capstyle="butt")
        ax.plot([x0], [y], marker="|", color="black", markersize=9)
        ax.plot([x1], [y], marker="|" if i.end_ms is not None else ">", color="black")
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
    ax.set_xlabel(
        f"seconds since {start}  (wide band: ground truth, thin band: predicted, line: incident)"
    )
    ax.set_title(title)
    handles = [Patch(facecolor=c, label=name) for name, c in colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
