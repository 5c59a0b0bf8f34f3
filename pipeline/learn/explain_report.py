"""The report of `iotfuse explain`: the PNG (one window in detail, or several windows one
row each) and the JSON beside it (`write_report`).

One window: the label, scores and modality Shapley values on top, beside the telemetry
ranking (Shapley values per metric, and integrated gradients summed per metric); then the
camera frames with their overlays, the log-mel spectrogram with its overlays, and the
telemetry attribution per metric and time step. Several windows (`--class`): the mean
telemetry ranking and modality share on top, then one row per window. Every picture names
its method and baseline. Red raises the probability of the explained class, blue lowers
it; an overlay's colour is full at the 99th percentile of that picture's |values|.

Drawn on a matplotlib `Figure` with the Agg canvas: no pyplot, no global state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encoders.modality import Modality
from pipeline.errors import UserError
from pipeline.learn.explain import (
    WindowExplanation,
    explain_windows,
    iso,
    report_json,
    window_at,
)
from pipeline.records import Record
from pipeline.settings import Settings
from pipeline.stream.model_runner import ModelRunner

RED = np.array([0.95, 0.1, 0.05])
BLUE = np.array([0.1, 0.35, 1.0])
NAMES = {
    "integrated_gradients": "integrated gradients",
    "occlusion": "occlusion",
    "shapley_values": "Shapley values",
}


def overlay(values: np.ndarray, alpha: float = 0.8) -> np.ndarray:
    """Attribution [H, W] -> RGBA [H, W, 4]: red where positive, blue where negative,
    opaque in proportion to |value| (full at the 99th percentile)."""
    scale = float(np.percentile(np.abs(values), 99)) or 1.0
    v = np.clip(values / scale, -1.0, 1.0)
    rgba = np.zeros((*values.shape, 4))
    rgba[..., :3] = np.where(v[..., None] > 0, RED, BLUE)
    rgba[..., 3] = alpha * np.abs(v)
    return rgba


def _smooth(a: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """IG per pixel or cell is speckled; a Gaussian (2 of 64 pixels) makes regions readable."""
    import cv2

    return np.asarray(cv2.GaussianBlur(a.astype(np.float32), (0, 0), sigma))


def _faded(frame: np.ndarray) -> np.ndarray:
    """A frame as the backdrop of an overlay: greyed and lightened, so colours read."""
    grey = frame.astype(np.float64).mean(axis=-1, keepdims=True) / 255.0
    return np.asarray(0.35 + 0.55 * (0.3 * frame / 255.0 + 0.7 * grey))


def _hbars(ax: Any, names: Sequence[str], values: Sequence[float], title: str) -> None:
    y = np.arange(len(names))
    colours = ["tab:red" if v > 0 else "tab:blue" for v in values]
    ax.barh(y, values, color=colours, height=0.6)
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=10)
    lim = max([abs(v) for v in values] + [1e-6]) * 1.45
    ax.set_xlim(-lim if min(values, default=0) < 0 else -lim * 0.08, lim)
    for yi, v in zip(y, values, strict=True):
        ax.text(v, yi, f" {v:+.3f} ", va="center", ha="left" if v >= 0 else "right", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def _scores(ax: Any, e: WindowExplanation) -> None:
    names = list(e.scores)
    y = np.arange(len(names))
    colours = ["tab:orange" if n == e.label else "lightgrey" for n in names]
    ax.barh(y, [e.scores[n] for n in names], color=colours, height=0.6)
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18)
    for yi, n in zip(y, names, strict=True):
        ax.text(e.scores[n], yi, f" {e.scores[n]:.2f}", va="center", fontsize=8)
    ax.set_title("scores (class probabilities)", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


def _telemetry_bars(ax: Any, e: WindowExplanation) -> None:
    view = e.views[Modality.TELEMETRY]
    ranking = e.ranking()
    names = [n for n, _ in ranking]
    order = [e.metrics.index(n) for n in names]
    shap = view.per_metric["shapley_values"][order]
    ig = view.per_metric["integrated_gradients"][order]
    y = np.arange(len(names))
    ax.barh(y - 0.2, shap, height=0.38, color="tab:red", label="Shapley values (metric absent)")
    ax.barh(y + 0.2, ig, height=0.38, color="salmon", label="integrated gradients, summed")
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    for yi, v in zip(y, shap, strict=True):
        ax.text(
            v, yi - 0.2, f" {v:+.3f} ", va="center", ha="left" if v >= 0 else "right", fontsize=8
        )
    lim = float(np.abs(np.concatenate([shap, ig])).max(initial=1e-6)) * 1.5
    ax.set_xlim(-lim, lim)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"telemetry: which sensor (log-odds of {e.label})", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


def _frames(fig: Any, cell: Any, e: WindowExplanation) -> None:
    view = e.views[Modality.CAMERA]
    frames = view.picture
    assert frames is not None
    ig, occ = view.maps["integrated_gradients"], view.maps["occlusion"]
    t = frames.shape[0]
    grid = cell.subgridspec(1, t + 1, wspace=0.05)
    ig_view = np.stack([_smooth(a) for a in ig])
    for i in range(t):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(_faded(frames[i]), interpolation="bilinear")
        ax.imshow(overlay(ig_view[i]), interpolation="bilinear")
        ax.set_title(f"frame {i + 1}: integrated gradients", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, t])
    ax.imshow(_faded(frames.mean(axis=0)), interpolation="bilinear")
    ax.imshow(overlay(occ[0]), interpolation="bilinear")
    ax.set_title("occlusion, all frames", fontsize=8)
    ax.axis("off")


def _spectrogram(ax: Any, e: WindowExplanation, method: str) -> None:
    view = e.views[Modality.AUDIO]
    logmel = view.picture
    assert logmel is not None
    extent = (0.0, (e.window.end_ms - e.window.start_ms) / 1000, 0, logmel.shape[0])
    ax.imshow(logmel, origin="lower", aspect="auto", cmap="gray", extent=extent)
    cells = view.maps[method]
    shown = _smooth(cells, 1.0) if method == "integrated_gradients" else cells
    ax.imshow(overlay(shown), origin="lower", aspect="auto", extent=extent)
    ax.set_title(f"audio log-mel: {NAMES[method]} (baseline {view.baseline})", fontsize=9)
    ax.set_xlabel("seconds into the window", fontsize=8)
    ax.set_ylabel("mel band (low to high)", fontsize=8)
    ax.tick_params(labelsize=8)


def _telemetry_heatmap(ax: Any, e: WindowExplanation, window_s: float) -> None:
    view = e.views[Modality.TELEMETRY]
    cells = view.maps["integrated_gradients"].T  # [steps, M] -> [M, steps]
    lim = float(np.abs(cells).max(initial=1e-6))
    ax.imshow(
        cells,
        aspect="auto",
        cmap="RdBu_r",
        vmin=-lim,
        vmax=lim,
        extent=(0.0, window_s, len(e.metrics) - 0.5, -0.5),
    )
    readings = view.picture  # raw [steps, M], NaN where absent
    assert readings is not None
    names = []
    for j, name in enumerate(e.metrics):
        got = readings[:, j][~np.isnan(readings[:, j])]
        names.append(f"{name}\n{got.min():.3g}..{got.max():.3g}" if len(got) else f"{name}\nabsent")
    ax.set_yticks(range(len(e.metrics)), names, fontsize=8)
    ax.set_xlabel("seconds into the window (left: each metric's readings, min..max)", fontsize=8)
    ax.set_title(
        f"telemetry: integrated gradients per metric and time step, log-odds of {e.label} "
        f"(baseline {view.baseline}; colour scale +-{lim:.3g})",
        fontsize=9,
    )
    ax.tick_params(labelsize=8)


def _title(e: WindowExplanation, model: str) -> str:
    w = e.window
    truth = f", truth {w.truth}" if w.truth else ""
    return (
        f"{w.device_id}  {iso(w.start_ms)} + {(w.end_ms - w.start_ms) / 1000:g} s:  "
        f"{e.label} ({e.confidence:.2f}){truth}  |  model {model}"
    )


def _missing(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="grey")
    ax.axis("off")


def draw_one(path: Path, e: WindowExplanation, model: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    window_s = (e.window.end_ms - e.window.start_ms) / 1000
    fig = Figure(figsize=(16, 13.5), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(_title(e, model), fontsize=14, fontweight="bold", y=0.995)
    fig.text(
        0.5,
        0.962,
        f"What made it say {e.label}: red raises p({e.label}), blue lowers it (inside a "
        "modality: its log-odds). Baselines, what 'nothing here' means: camera the frame "
        "blurred, audio silence, telemetry the metric absent.",
        ha="center",
        fontsize=10,
    )
    rows = fig.add_gridspec(
        4, 1, height_ratios=[2.3, 2.4, 2.5, 2.0], hspace=0.42, top=0.93, bottom=0.05
    )
    row0 = rows[0].subgridspec(1, 3, width_ratios=[1, 1, 1.5], wspace=0.45)
    _scores(fig.add_subplot(row0[0, 0]), e)
    modalities = list(e.attribution)
    _hbars(
        fig.add_subplot(row0[0, 1]),
        modalities,
        [e.attribution[m] for m in modalities],
        f"modalities: Shapley values of p({e.label})",
    )
    ax = fig.add_subplot(row0[0, 2])
    if Modality.TELEMETRY in e.views:
        _telemetry_bars(ax, e)
    else:
        _missing(ax, "no telemetry in this window")
    if Modality.CAMERA in e.views:
        _frames(fig, rows[1], e)
    else:
        _missing(fig.add_subplot(rows[1]), "no camera frames in this window")
    row2 = rows[2].subgridspec(1, 2, wspace=0.15)
    if Modality.AUDIO in e.views:
        _spectrogram(fig.add_subplot(row2[0, 0]), e, "occlusion")
        _spectrogram(fig.add_subplot(row2[0, 1]), e, "integrated_gradients")
    else:
        _missing(fig.add_subplot(rows[2]), "no audio in this window")
    if Modality.TELEMETRY in e.views:
        _telemetry_heatmap(fig.add_subplot(rows[3]), e, window_s)
    else:
        _missing(fig.add_subplot(rows[3]), "no telemetry in this window")
    fig.savefig(path, format="png")


def draw_many(path: Path, explanations: Sequence[WindowExplanation], model: str) -> None:
    """One row per window (most confident first), the means over them on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(explanations)
    first = explanations[0]
    height = 3.0 + 2.1 * n
    fig = Figure(figsize=(16, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(
        f"{n} most confident '{first.label}' windows  |  model {model}  |  red raises "
        f"p({first.label}), blue lowers it",
        fontsize=13,
        fontweight="bold",
        y=1 - 0.15 / height,
    )
    rows = fig.add_gridspec(
        n + 1,
        5,
        height_ratios=[1.4] + [1.0] * n,
        width_ratios=[1.1, 0.8, 0.8, 1.5, 1.3],
        hspace=0.6,
        wspace=0.6,
        top=1 - 0.7 / height,
        bottom=0.4 / height,
        left=0.04,
        right=0.98,
    )
    with_telemetry = [e for e in explanations if Modality.TELEMETRY in e.views]
    if with_telemetry:
        metrics = list(first.metrics)
        mean = np.mean(
            [e.views[Modality.TELEMETRY].per_metric["shapley_values"] for e in with_telemetry], 0
        )
        order = np.argsort(-mean)
        _hbars(
            fig.add_subplot(rows[0, 1:3]),
            [metrics[j] for j in order],
            [float(mean[j]) for j in order],
            f"telemetry: Shapley values (log-odds), mean over {len(with_telemetry)} windows",
        )
    legend = fig.add_subplot(rows[0, 0])
    legend.text(
        0.0,
        0.5,
        "each row, left to right:\nthe window, its label and\nmodality Shapley values;\n"
        "camera, its busiest frame:\nintegrated gradients and\nocclusion (baseline: blurred);"
        "\naudio: occlusion (silence);\ntelemetry: Shapley values\n(metric absent)",
        va="center",
        fontsize=9,
    )
    legend.axis("off")
    modalities = list(first.attribution)
    _hbars(
        fig.add_subplot(rows[0, 3:5]),
        modalities,
        [float(np.mean([e.attribution[m] for e in explanations])) for m in modalities],
        f"modality Shapley values, mean over {n} windows",
    )
    for i, e in enumerate(explanations, 1):
        _row(fig, rows, i, e)
    fig.savefig(path, format="png")


def _row(fig: Any, rows: Any, i: int, e: WindowExplanation) -> None:
    w = e.window
    ax = fig.add_subplot(rows[i, 0])
    shares = "\n".join(f"  {m} {v:+.2f}" for m, v in e.attribution.items())
    ax.text(
        0.0,
        0.5,
        f"{i}. {w.device_id}  {iso(w.start_ms)}\n{e.label} {e.confidence:.3f}"
        f"{f' (truth {w.truth})' if w.truth else ''}\nmodality Shapley values:\n{shares}",
        va="center",
        fontsize=9,
    )
    ax.axis("off")
    camera = e.views.get(Modality.CAMERA)
    for col, method in ((1, "integrated_gradients"), (2, "occlusion")):
        ax = fig.add_subplot(rows[i, col])
        if camera is None or camera.picture is None:
            _missing(ax, "no camera")
            continue
        cells = camera.maps[method]
        k = int(np.abs(cells).reshape(len(cells), -1).sum(1).argmax())  # the busiest frame
        shown = _smooth(cells[k]) if method == "integrated_gradients" else cells[k]
        ax.imshow(_faded(camera.picture[k]), interpolation="bilinear")
        ax.imshow(overlay(shown), interpolation="bilinear")
        ax.set_title(f"camera frame {k + 1}: {NAMES[method]}", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(rows[i, 3])
    if Modality.AUDIO in e.views:
        _spectrogram(ax, e, "occlusion")
        ax.set_title("audio: occlusion", fontsize=8)
    else:
        _missing(ax, "no audio")
    ax = fig.add_subplot(rows[i, 4])
    if Modality.TELEMETRY in e.views:
        ranking = e.ranking()
        _hbars(
            ax, [n for n, _ in ranking], [v for _, v in ranking], "telemetry: Shapley (log-odds)"
        )
    else:
        _missing(ax, "no telemetry")


def draw(path: Path, explanations: Sequence[WindowExplanation], model: str) -> None:
    """The report PNG: `draw_one` for one window, `draw_many` for several."""
    if len(explanations) == 1:
        draw_one(path, explanations[0], model)
    else:
        draw_many(path, explanations, model)


def write_report(
    out: Path, stem: str, runner: ModelRunner, explanations: Sequence[WindowExplanation]
) -> tuple[Path, Path]:
    """`<stem>.png` and `<stem>.json` in `out`; UserError if they cannot be written."""
    png, data = out / f"{stem}.png", out / f"{stem}.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps(report_json(runner, explanations), separators=(",", ":")))
        draw(png, explanations, runner.model_id.name)
    except OSError as exc:
        raise UserError(f"cannot write the explanation into {out}: {exc}") from exc
    return png, data


def explain_window(
    out: Path,
    records: Iterable[Record],
    settings: Settings,
    runner: ModelRunner,
    device: str,
    start_ms: int,
) -> tuple[Path, Path]:
    """One window's report (`explain-DEVICE-START.png` and `.json`) into `out`."""
    if runner.exported:
        raise UserError(
            "explain needs the torch model (gradients, Captum); an exported ONNX model has "
            "neither: pass --model with the directory it was exported from"
        )
    ref = window_at(records, settings, runner.features, device, start_ms)
    return write_report(
        out, f"explain-{device}-{ref.start_ms}", runner, explain_windows(runner, [ref])
    )
