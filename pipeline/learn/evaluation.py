"""Score models on labelled recordings: metrics, and what each modality is worth.

    result = evaluate_recordings(EvalOptions(model=None, data=(Path("test.iotrec"),)), settings)
    pipeline.learn.report.write_report(Path("report"), result)

Windows come from `pipeline.learn.dataset.windows_from_recordings` (the live pipeline's code
path). Besides the full scores, the model is scored with modalities removed from its
inputs -- `without_<m>` (every modality but m) and `only_<m>` -- by deleting them from
each window's inputs, so the model masks them exactly as it does for a window in which
they never arrived. A window left with none of the kept modalities is left out of that
score (a model of only those modalities would never be asked about it); how many windows
each score covers is reported. Compared models are scored on the same recordings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.modality import Modality
from pipeline.errors import UserError
from pipeline.learn.dataset import LabelledWindow
from pipeline.settings import Settings
from pipeline.stream.features import FeatureSpec

SCHEMA = "iotfuse.evaluation/v1"
Inputs = Mapping[Modality, np.ndarray]
Classify = Callable[[Sequence[Inputs]], np.ndarray]  # windows -> class index per window


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    model: Path | None  # None: the shipped default model
    data: tuple[Path, ...]
    compare: tuple[Path, ...] = ()
    device: str = "auto"
    batch_size: int = 64


def scores(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """macro_f1, accuracy, per_class {precision, recall, f1, support}, confusion_matrix
    (rows: true class, columns: predicted, in `classes` order) and the window count."""
    from fusion.metrics import classification_report, confusion_matrix

    cm = confusion_matrix(y_true, y_pred, len(classes))
    report = classification_report(cm, classes)
    return {
        "macro_f1": report["macro_f1"],
        "accuracy": report["accuracy"],
        "per_class": report["per_class"],
        "confusion_matrix": cm.tolist(),
        "windows": int(cm.sum()),
    }


def keep_modalities(
    windows: Sequence[Inputs], keep: Sequence[Modality]
) -> tuple[list[dict[Modality, np.ndarray]], list[int]]:
    """Each window's inputs of only the `keep` modalities, and the indices of the windows
    that still have at least one input (the others are left out)."""
    kept, index = [], []
    for i, window in enumerate(windows):
        inputs = {m: x for m, x in window.items() if m in keep}
        if inputs:
            kept.append(inputs)
            index.append(i)
    return kept, index


def ablation(
    classify: Classify,
    windows: Sequence[Inputs],
    y_true: np.ndarray,
    modalities: Sequence[Modality],
    classes: Sequence[str],
) -> dict[str, Any]:
    """{"without_<m>": scores, "only_<m>": scores} for each modality m of the model
    (nothing for a single-modality model: its only_ is its full score)."""
    out: dict[str, Any] = {}
    if len(modalities) < 2:
        return out
    for m in modalities:
        for name, keep in (
            (f"without_{m.value}", [x for x in modalities if x is not m]),
            (f"only_{m.value}", [m]),
        ):
            kept, index = keep_modalities(windows, keep)
            if not kept:
                out[name] = {"macro_f1": 0.0, "accuracy": 0.0, "windows": 0}
                continue
            out[name] = scores(y_true[index], classify(kept), classes)
    return out


def class_indices(windows: Sequence[LabelledWindow], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({w.label for w in windows} - set(index))
    if unknown:
        raise UserError(
            f"the data has labels {unknown} that the model does not know (its "
            f"classes: {list(classes)}); evaluate it on data with its classes"
        )
    return np.array([index[w.label] for w in windows], dtype=np.int64)


def model_classifier(model: Any, batch_size: int) -> Classify:
    """Argmax of the model's logits, `batch_size` windows at a time (eval mode); an
    exported model (fusion.onnx_model.OnnxModel) gives the argmax of its probabilities."""
    from fusion.onnx_model import OnnxModel

    if isinstance(model, OnnxModel):
        return model.label_classifier(batch_size)
    import torch

    from fusion.batch import WindowBatch

    rate = model.config.audio.sample_rate if model.config.audio is not None else 16000
    device = next(model.parameters()).device

    def classify(windows: Sequence[Inputs]) -> np.ndarray:
        model.eval()
        preds = []
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                batch = WindowBatch.collate(windows[start : start + batch_size], rate).to(device)
                logits = model(batch)["logits"]  # [B, C]
                preds.append(logits.argmax(dim=1).cpu().numpy())  # [B, C] -> [B]
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)

    return classify


def evaluate_windows(
    classify: Classify,
    windows: Sequence[LabelledWindow],
    classes: Sequence[str],
    modalities: Sequence[Modality],
    with_ablation: bool = True,
) -> dict[str, Any]:
    """Scores of the full inputs, plus the ablation (`without_*`/`only_*` macro-F1 at the
    top level, their full scores under "ablation")."""
    y_true = class_indices(windows, classes)
    inputs = [w.inputs for w in windows]
    result = scores(y_true, classify(inputs), classes)
    if with_ablation:
        parts = ablation(classify, inputs, y_true, modalities, classes)
        result |= {name: s["macro_f1"] for name, s in parts.items()}
        result["ablation"] = parts
    return result


def merged_spec(specs: Sequence[FeatureSpec]) -> FeatureSpec | None:
    """One spec serving every model (the union of their modalities), or None when two
    models read a shared modality differently (window length, frames, rate, metrics)."""
    fields = {
        Modality.CAMERA: ("image_size", "num_frames"),
        Modality.AUDIO: ("sample_rate",),
        Modality.TELEMETRY: ("metrics", "steps"),
    }
    merged: dict[str, Any] = {}
    for spec in specs:
        if spec.window_ms != specs[0].window_ms:
            return None
        for m in spec.modalities:
            for name in fields[m]:
                if merged.setdefault(name, getattr(spec, name)) != getattr(spec, name):
                    return None
    mods = tuple(m for m in fields if any(m in s.modalities for s in specs))
    return dataclasses.replace(specs[0], modalities=mods, **merged)


def model_windows(
    windows: Sequence[LabelledWindow], modalities: Sequence[Modality]
) -> list[LabelledWindow]:
    """The windows as a model of `modalities` sees them (same as building them with its
    own spec: other modalities dropped, windows left empty skipped)."""
    out = []
    for w in windows:
        inputs = {m: x for m, x in w.inputs.items() if m in modalities}
        if inputs:
            out.append(dataclasses.replace(w, inputs=inputs))
    return out


def model_info(runner: Any, path: Path) -> dict[str, Any]:
    privacy = getattr(runner.config, "privacy", None)  # DP-SGD's spent budget (issue 17)
    return {
        "name": runner.config.name,
        "version": runner.version,
        "path": str(path),
        "modalities": [m.value for m in runner.config.modalities],
        "classes": list(runner.config.classes),
        "privacy": None if privacy is None else dataclasses.asdict(privacy),
    }


def evaluate_recordings(
    options: EvalOptions, settings: Settings, on_records: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """The full metrics dict written to metrics.json (see write_report)."""
    from pipeline.learn.dataset import windows_from_recordings
    from pipeline.stream.model_runner import ModelRunner, default_model_dir

    paths = [options.model or default_model_dir(), *options.compare]
    runners = [ModelRunner.load(p, options.device) for p in paths]
    specs = [r.features for r in runners]
    shared = merged_spec(specs)
    cache: dict[FeatureSpec, list[LabelledWindow]] = {}

    def windows_for(spec: FeatureSpec) -> list[LabelledWindow]:
        source = shared or spec
        if source not in cache:
            cache[source] = windows_from_recordings(options.data, settings, source, on_records)
        return model_windows(cache[source], spec.modalities)

    results = []
    for i, (runner, path) in enumerate(zip(runners, paths, strict=True)):
        classify = model_classifier(runner.model, options.batch_size)
        got = evaluate_windows(
            classify,
            windows_for(specs[i]),
            runner.config.classes,
            runner.config.modalities,
            with_ablation=i == 0,
        )
        results.append(model_info(runner, path) | got)
    main = results[0]
    out = {
        "schema": SCHEMA,
        "data": [str(p) for p in options.data],
        "model": {k: main.pop(k) for k in ("name", "version", "path", "modalities", "privacy")},
        "classes": main.pop("classes"),
        **main,
        "compare": results[1:],
    }
    best = best_single_modality(out)
    return out if best is None else out | {"best_single_modality": best}


def best_single_modality(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The best one-modality score: the model's `only_<m>` scores and the compared models
    of one modality. None when there is neither."""
    candidates = [
        (f"{metrics['model']['name']} only_{k[5:]}", v)
        for k, v in metrics.items()
        if k.startswith("only_")
    ]
    candidates += [
        (m["name"], m["macro_f1"]) for m in metrics.get("compare", []) if len(m["modalities"]) == 1
    ]
    if not candidates:
        return None
    name, score = max(candidates, key=lambda c: c[1])
    return {"name": name, "macro_f1": score, "fused_margin": metrics["macro_f1"] - score}
