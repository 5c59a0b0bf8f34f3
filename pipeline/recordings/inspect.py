"""`iotfuse inspect`: what a recording holds, as a table, a JSON object or a timeline PNG.

    info = inspect_recording("run.iotrec", TopicSettings(), timeline_bins=600)
    print(format_table(info)); json.dumps(to_json(info)); plot_timeline(info, "run.png")

Two streaming passes, each in constant memory: `pipeline.recordings.summary.summarize` (counts,
devices, time span, digest), then -- only when there is a labels topic or a plot is
wanted -- one pass collecting the label spans and, per plotted device and modality, which
of `timeline_bins` time bins hold records. Memory grows with devices, labels and bins,
never with records. A topic's modality comes from its name: the configured topic names
(`[topics]` settings), else the name's last dot-separated part (`x.camera`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.recordings.file import open_recording
from pipeline.recordings.summary import RecordingSummary, summarize
from pipeline.settings import TopicSettings

ROLES = ("camera", "audio", "telemetry", "labels")
MODALITIES = ("camera", "audio", "telemetry")
_STYLE = {  # modality -> (colour, marker, row offset)
    "camera": ("tab:blue", "s", 0.25),
    "audio": ("tab:orange", "^", 0.0),
    "telemetry": ("tab:green", "o", -0.25),
}
_LABEL_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def topic_role(topic: str, topics: TopicSettings) -> str | None:
    """camera, audio, telemetry, labels, or None (another topic)."""
    for role in ROLES:
        if topic == getattr(topics, role):
            return role
    last = topic.rsplit(".", 1)[-1]
    return last if last in ROLES else None


@dataclass(frozen=True, slots=True)
class LabelSpan:
    device: str
    label: str
    start_ms: int
    end_ms: int


@dataclass
class Timeline:
    start_ms: int
    bin_ms: float
    bins: int
    devices: list[str]  # plotted rows, sorted
    hidden_devices: int  # devices left out of the plot (max_devices)
    marks: dict[tuple[str, str], bytearray] = field(default_factory=dict)  # (device, modality)
    labels: list[LabelSpan] = field(default_factory=list)  # of the plotted devices

    def bin_of(self, timestamp_ms: int) -> int:
        return min(self.bins - 1, max(0, int((timestamp_ms - self.start_ms) / self.bin_ms)))


@dataclass
class LabelStats:
    spans: int = 0
    duration_ms: int = 0
    devices: set[str] = field(default_factory=set)


@dataclass
class Inspection:
    summary: RecordingSummary
    roles: dict[str, str | None]  # topic -> role
    labels_topics: list[str]
    labels: dict[str, LabelStats]  # label -> stats
    invalid_labels: int  # records on a labels topic that are not label JSON
    timeline: Timeline | None

    @property
    def devices(self) -> list[str]:
        return sorted(set().union(*(t.devices for t in self.summary.topics.values())))


def _parse_label(value: bytes | None) -> tuple[str, int, int] | None:
    try:
        body = json.loads(value or b"")
        label, start, end = body["label"], body["start_ms"], body["end_ms"]
    except (ValueError, TypeError, KeyError):
        return None
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    if not isinstance(label, str) or not ints or end < start:
        return None
    return label, start, end


def _time_start(summary: RecordingSummary) -> int:
    """First record time, ignoring records without timestamp (-1)."""
    starts = [t.min_timestamp_ms for t in summary.topics.values() if t.min_timestamp_ms >= 0]
    return min(starts, default=0)


def _new_timeline(
    summary: RecordingSummary, devices: list[str], bins: int, max_devices: int
) -> Timeline:
    start = _time_start(summary)
    end = max(start + 1, (summary.max_timestamp_ms or start) + 1)
    shown = devices[:max_devices]
    return Timeline(start, (end - start) / bins, bins, shown, len(devices) - len(shown))


def inspect_recording(
    source: str | os.PathLike[str],
    topics: TopicSettings,
    *,
    timeline_bins: int | None = None,
    max_devices: int = 40,
) -> Inspection:
    """Summary, labels and (if `timeline_bins`) the timeline of a recording."""
    summary = summarize(source)
    roles = {name: topic_role(name, topics) for name in summary.topics}
    labels_topics = [t for t, role in roles.items() if role == "labels"]
    info = Inspection(summary, roles, labels_topics, {}, 0, None)
    if timeline_bins is not None and summary.records:
        info.timeline = _new_timeline(summary, info.devices, timeline_bins, max_devices)
    if labels_topics or info.timeline is not None:
        _second_pass(source, info)
    return info


def _second_pass(source: str | os.PathLike[str], info: Inspection) -> None:
    timeline = info.timeline
    shown = set(timeline.devices) if timeline is not None else set()
    with open_recording(source) as reader:
        for block in reader.iter_blocks():
            for rec in block:
                role = info.roles[rec.topic]
                device = rec.key.decode("utf-8", "backslashreplace") if rec.key else ""
                if role == "labels":
                    _add_label(info, device, rec.value, device in shown)
                elif timeline is not None and role is not None and device in shown:
                    if rec.timestamp_ms >= 0:
                        marks = timeline.marks.setdefault((device, role), bytearray(timeline.bins))
                        marks[timeline.bin_of(rec.timestamp_ms)] = 1


def _add_label(info: Inspection, device: str, value: bytes | None, shown: bool) -> None:
    parsed = _parse_label(value)
    if parsed is None:
        info.invalid_labels += 1
        return
    label, start, end = parsed
    stats = info.labels.setdefault(label, LabelStats())
    stats.spans += 1
    stats.duration_ms += end - start
    stats.devices.add(device)
    if shown and info.timeline is not None:
        info.timeline.labels.append(LabelSpan(device, label, start, end))


def to_json(info: Inspection) -> dict[str, Any]:
    s = info.summary
    span = None
    if s.min_timestamp_ms is not None and s.max_timestamp_ms is not None:
        span = {
            "start_ms": s.min_timestamp_ms,
            "end_ms": s.max_timestamp_ms,
            "duration_ms": s.max_timestamp_ms - s.min_timestamp_ms,
        }
    topics = {
        name: {
            "role": info.roles[name],
            "records": t.records,
            "value_bytes": t.value_bytes,
            "partitions": sorted(t.partitions),
            "devices": len(t.devices),
            "keyless_records": t.keyless_records,
            "start_ms": t.min_timestamp_ms,
            "end_ms": t.max_timestamp_ms,
        }
        for name, t in s.topics.items()
    }
    labels = {
        name: {"spans": st.spans, "duration_ms": st.duration_ms, "devices": len(st.devices)}
        for name, st in sorted(info.labels.items())
    }
    return {
        "source": s.source,
        "format_version": s.format_version,
        "records": s.records,
        "blocks": s.blocks,
        "bytes": s.bytes_read,
        "truncated": s.truncated,
        "truncated_at": s.truncated_at,
        "time_span": span,
        "digest": s.digest,
        "offset_order_violations": s.offset_order_violations,
        "devices": info.devices,
        "topics": topics,
        "labels": {
            "topics": info.labels_topics,
            "by_label": labels,
            "invalid_records": info.invalid_labels,
        },
    }


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _table(rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """Aligned columns: the first `text_columns` left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def format_table(info: Inspection) -> str:
    """The summary as readable text."""
    s = info.summary
    lines = [
        f"recording  {s.source} (format v{s.format_version}, {s.blocks} blocks,"
        f" {_size(s.bytes_read)})"
    ]
    if s.truncated:
        lines.append(
            f"TRUNCATED  at byte {s.truncated_at} (a crash while recording?);"
            " figures cover the whole blocks before it"
        )
    if s.min_timestamp_ms is not None and s.max_timestamp_ms is not None:
        secs = (s.max_timestamp_ms - s.min_timestamp_ms) / 1000
        lines.append(
            f"time span  {_utc(s.min_timestamp_ms)} .. {_utc(s.max_timestamp_ms)} ({secs:.3f} s)"
        )
    devices = info.devices
    more = f", ... (+{len(devices) - 8})" if len(devices) > 8 else ""
    lines.append(f"devices    {len(devices)}: {', '.join(devices[:8])}{more}")
    lines.append(f"records    {s.records}")
    lines.append(f"digest     {s.digest}")
    numbered = any(p >= 0 for t in s.topics.values() for p in t.partitions)
    if s.offset_order_violations and numbered:  # simulator records are all offset -1
        lines.append(
            f"WARNING    {s.offset_order_violations} records out of offset order"
            " (re-read after a consumer restart?)"
        )
    rows = [["topic", "role", "records", "value bytes", "partitions", "devices", "keyless"]]
    rows += [
        [
            name,
            info.roles[name] or "-",
            str(t.records),
            _size(t.value_bytes),
            str(len(t.partitions)),
            str(len(t.devices)),
            str(t.keyless_records),
        ]
        for name, t in s.topics.items()
    ]
    lines += ["", *_table(rows, text_columns=2)]
    if info.labels or info.invalid_labels:
        rows = [["label", "spans", "seconds", "devices"]]
        rows += [
            [name, str(st.spans), f"{st.duration_ms / 1000:.1f}", str(len(st.devices))]
            for name, st in sorted(info.labels.items())
        ]
        lines += ["", f"labels on {', '.join(info.labels_topics)}:", *_table(rows)]
        if info.invalid_labels:
            lines.append(
                f"({info.invalid_labels} records on the labels topic are not label"
                ' JSON {"label", "start_ms", "end_ms"})'
            )
    return "\n".join(lines)


def plot_timeline(info: Inspection, out: str | os.PathLike[str]) -> None:
    """One row per device, a mark per modality where it has records, label bands behind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tl = info.timeline
    if tl is None:
        raise ValueError("inspect_recording(timeline_bins=...) collects the timeline first")
    fig = Figure(figsize=(12, 1.5 + 0.45 * max(1, len(tl.devices))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = {device: i for i, device in enumerate(tl.devices)}
    colours = _label_colours(tl.labels)
    for span in tl.labels:
        x0 = (span.start_ms - tl.start_ms) / 1000
        ax.broken_barh(
            [(x0, (span.end_ms - span.start_ms) / 1000)],
            (rows[span.device] - 0.45, 0.9),
            facecolors=colours[span.label],
            alpha=0.25,
            linewidth=0,
        )
    for (device, modality), marks in sorted(tl.marks.items()):
        colour, marker, offset = _STYLE[modality]
        xs = [(i + 0.5) * tl.bin_ms / 1000 for i, hit in enumerate(marks) if hit]
        ax.scatter(
            xs, [rows[device] + offset] * len(xs), s=9, c=colour, marker=marker, linewidths=0
        )
    ax.set_yticks(range(len(tl.devices)), tl.devices)
    ax.set_ylim(len(tl.devices) - 0.4, -0.6)  # first device on top
    ax.set_xlim(0, tl.bins * tl.bin_ms / 1000)
    ax.set_xlabel(f"seconds since {_utc(tl.start_ms)}")
    hidden = f" ({tl.hidden_devices} more devices not shown)" if tl.hidden_devices else ""
    ax.set_title(f"{os.path.basename(info.summary.source)}: {info.summary.records} records{hidden}")
    handles: list[Any] = [
        Line2D([], [], color=_STYLE[m][0], marker=_STYLE[m][1], linestyle="", label=m)
        for m in MODALITIES
    ]
    handles += [Patch(facecolor=c, alpha=0.25, label=name) for name, c in colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(out), format="png")


def _label_colours(spans: list[LabelSpan]) -> Mapping[str, str]:
    return label_colours(s.label for s in spans)


def label_colours(labels: Iterable[str]) -> Mapping[str, str]:
    """A colour per label name: "normal" light grey, the others in turn (sorted by name)."""
    others = itertools.cycle(_LABEL_COLOURS)
    return {name: "lightgrey" if name == "normal" else next(others) for name in sorted(set(labels))}
