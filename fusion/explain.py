"""Attribution inside each modality, on Captum: which pixels, which sounds, which sensor.

The modality Shapley values (fusion/attribution.py) say how much camera, audio and telemetry
each contributed. This module goes inside one modality m: it attributes the target class's
log-odds, log(p / (1 - p)) (`output="log_odds"`, the default; `"probability"`: p itself),
to the cells of m's *preprocessed* input, the other modalities' tokens held as they were:

    f_m(x) = log-odds(softmax(fuse(tokens with slot m = head_m(trunk_m(x)), present)))[target]

Log-odds, because p saturates: in a window at p = 0.998 every single input can go and p
barely moves, and the gradients vanish; the log-odds still show what holds it there.

    camera     x: normalised frames [n, T, 3, S, S]  -> cells [n, T, S, S] (RGB summed)
    audio      x: log-mel [n, F, L]                  -> one value per time-frequency cell
    telemetry  x: [n, steps, 2M] (values, presence)  -> per metric and step [n, steps, M]
                                                        (value and presence channels added)

Methods (Captum), named in every result:

- `integrated_gradients` (`IntegratedGradients`, Gauss-Legendre): every modality, the model
  being differentiable from the preprocessed input on. The cells of a window add up to
  f_m(x) - f_m(baseline) (completeness); the steps double from IG_STEPS until that holds
  within IG_TOLERANCE (audio needs ~256: the path from silence passes through sounds the
  model reads as other classes) or IG_MAX_STEPS, and what is left is reported (`delta`).
- `occlusion` (`Occlusion`), camera and audio: how much the target's probability falls when
  a patch is replaced by the baseline, averaged over the patches covering a cell. Camera:
  patches of S/4 pixels (stride S/8) in every frame at once: smaller patches, or one frame
  alone, barely move a model that averages its frames, and their maps ranked regions no
  better than chance in the deletion test. Audio: 1/8 of the mel bands x 0.21 s.
- `shapley_values` (`ShapleyValues`, exact over the M metrics), telemetry: each metric's
  Shapley value over coalitions of metrics, the others absent; they add up to
  f(x) - f(no metric). A single (metric, step) cell barely matters on its own (the
  readings repeat across steps), so the perturbation method works on whole metrics.
- `feature_ablation` (`FeatureAblation`), telemetry: the fall when one whole metric is
  absent, the others as they are: M + 1 evaluations, cheap enough for the stream.

Baselines, what "this part carried nothing" means for each input:

- camera: the same frame blurred (Gaussian, sigma = S/16 pixels): colours and lighting
  stay, shapes and edges (a person, a lamp, smoke) go;
- audio: digital silence (log(LOG_EPS) in every cell): what the pipeline feeds where no
  audio arrived, so the model has seen it;
- telemetry: the metric absent (value 0, presence 0), as a reading that never came is
  masked, never zero (docs/contract.md), and as an absent modality is in the modality
  Shapley values. (Its training mean was tried: the mean of a skewed metric is no ordinary
  reading, 14 ppm of smoke against 1-8 outside fires, and "less smoke than the mean" then
  ranked first for machine faults.)

What the checks on simulated data found (tests/test_explain_quality.py): the metric the
simulator drives ranks first or second by Shapley value and by ablation; deleting the top
region or metric lowers p far more than a random one; against the same architecture with
fresh weights, the cells' rank correlation is ~0 for camera and audio IG and for the
metrics' Shapley values, but 0.25-0.45 (median ~0) for telemetry IG per (metric, step):
with the "absent" baseline IG multiplies each reading by a gradient, so in some windows
that map echoes the input.
Read the telemetry ranking from the Shapley values; the per-step map says when.

Tensors in, tensors out; the model is put in eval mode.
Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from captum.attr import FeatureAblation, IntegratedGradients, Occlusion, ShapleyValues
from torch import Tensor

from encoders.audio import LOG_EPS
from encoders.modality import Modality
from fusion.attribution import shapley
from fusion.batch import WindowBatch
from fusion.model import FusionClassifier, Prediction

IG = "integrated_gradients"
OCCLUSION = "occlusion"
SHAPLEY = "shapley_values"
ABLATION = "feature_ablation"
LOG_ODDS = "log_odds"  # what is attributed: the log-odds of the target class (default) ...
PROBABILITY = "probability"  # ... or its probability (the stream, the modality Shapley values)
IG_STEPS = 32  # first try; doubled while completeness is off by more than IG_TOLERANCE
IG_MAX_STEPS = 512
IG_TOLERANCE = 0.01  # probability
BASELINES: dict[Modality, str] = {
    Modality.CAMERA: "the frame blurred (Gaussian, sigma = side/16)",
    Modality.AUDIO: "digital silence",
    Modality.TELEMETRY: "the metric absent",
}

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Attributions:
    """One method's attribution of one modality, for each window that has the modality."""

    modality: Modality
    method: str
    rows: Tensor  # int64 [n]: batch row of each window
    # camera [n, T, S, S], audio [n, F, L], telemetry [n, steps, M] or, for the per-metric
    # methods, [n, M]
    cells: Tensor
    delta: Tensor | None = None  # IG: [n] sum of cells - (f(x) - f(baseline))
    steps: int = 0  # IG: integration steps used

    def per_metric(self) -> Tensor:
        """Telemetry: one value per metric, [n, M] (summed over time steps)."""
        assert self.modality is Modality.TELEMETRY
        return self.cells if self.cells.dim() == 2 else self.cells.sum(dim=1)  # -> [n, M]


def blurred(frames: Tensor) -> Tensor:
    """Gaussian blur of frames [n, T, 3, S, S], sigma S/16 pixels, borders replicated."""
    n, t, c, s, _ = frames.shape
    sigma = s / 16
    radius = math.ceil(3 * sigma)
    grid = torch.arange(-radius, radius + 1, dtype=frames.dtype, device=frames.device)  # [k]
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # [k]
    x = frames.reshape(n * t * c, 1, s, s)  # [n, T, 3, S, S] -> [n*T*3, 1, S, S]
    x = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")  # -> [., 1, S+2r, S+2r]
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))  # -> [., 1, S+2r, S]
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))  # -> [., 1, S, S]
    return x.reshape(n, t, c, s, s)  # -> [n, T, 3, S, S]


class Explainer:
    """Attributions of the target class's probability inside each modality of a batch.

    `target` defaults to each window's predicted class. The tokens of every modality are
    computed once, then held while one modality is explained."""

    def __init__(
        self,
        model: FusionClassifier,
        batch: WindowBatch,
        target: Tensor | None = None,
        output: str = LOG_ODDS,
    ):
        if output not in (LOG_ODDS, PROBABILITY):
            raise ValueError(f"output must be {LOG_ODDS!r} or {PROBABILITY!r}, got {output!r}")
        self.output = output
        self.model = model.eval()
        device = model.cls_token.device
        self.batch = batch.to(device)
        with torch.no_grad():
            self.tokens, self.present = model.embed(self.batch)  # [B, M, D], [B, M]
            self.probs = model.fuse(self.tokens, self.present).softmax(dim=-1)  # [B, C]
            self.target = self.probs.argmax(dim=-1) if target is None else target.to(device)
        self._inputs: dict[Modality, Tensor] = {}

    @property
    def modalities(self) -> list[Modality]:
        """The model's modalities that some window of the batch has, in slot order."""
        return [m for m in self.model.modalities if m in self.batch.raw]

    def input(self, m: Modality) -> Tensor:
        """Modality m's preprocessed input, [n_m, ...] (computed once, when first asked)."""
        if m not in self._inputs:
            with torch.no_grad():
                self._inputs[m] = self.model.preprocess[m](self.batch.raw[m], self.batch.info)
        return self._inputs[m]

    def prediction(self) -> Prediction:
        """What FusionClassifier.predict says of the batch, for the target classes."""
        with torch.no_grad():
            phi = shapley(self.model, self.tokens, self.present, self.target)  # [B, M]
        return Prediction(probs=self.probs, label_idx=self.target, attribution=phi)

    def forward(self, m: Modality) -> Forward:
        """f(x [k, ...], tokens [k, M, D], present [k, M]) -> class probabilities [k, C],
        modality m's token computed from its preprocessed input x."""
        model, slot = self.model, self.model.modalities.index(m)
        trunk, head, post = model.trunks[m.value], model.heads[m.value], model.postprocess[m.value]

        log_odds = self.output == LOG_ODDS

        def f(x: Tensor, tokens: Tensor, present: Tensor) -> Tensor:
            token = post(head(trunk(x)))  # [k, ...] -> [k, D]
            tokens = torch.cat([tokens[:, :slot], token[:, None], tokens[:, slot + 1 :]], dim=1)
            present = present.clone()
            present[:, slot] = True  # [k, M]
            logits = model.fuse(tokens, present)  # -> [k, C]
            return class_log_odds(logits) if log_odds else logits.softmax(dim=-1)

        return f

    def baseline(self, m: Modality) -> Tensor:
        """The input of modality m that carries nothing (module docstring), [n_m, ...]."""
        x = self.input(m)
        if m is Modality.CAMERA:
            return blurred(x)
        if m is Modality.AUDIO:
            return torch.full_like(x, math.log(LOG_EPS))
        return torch.zeros_like(x)  # telemetry: value 0 and presence 0, i.e. absent

    def _context(self, m: Modality) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        rows = self.batch.rows[m].to(self.target.device)
        return rows, self.target[rows], (self.tokens[rows], self.present[rows])

    def integrated_gradients(
        self, m: Modality, steps: int | None = None, internal_batch: int = 512
    ) -> Attributions:
        """IG from the baseline; `steps` fixed, or None: doubled until complete (above)."""
        rows, target, args = self._context(m)
        n = IG_STEPS if steps is None else steps
        ig = IntegratedGradients(self.forward(m))
        while True:
            with torch.enable_grad():
                raw, delta = ig.attribute(
                    self.input(m),
                    baselines=self.baseline(m),
                    target=target,
                    additional_forward_args=args,
                    n_steps=n,
                    internal_batch_size=max(internal_batch, len(rows)),
                    return_convergence_delta=True,
                )
            off = float(delta.abs().max()) if delta.numel() else 0.0
            if steps is not None or off <= IG_TOLERANCE or n >= IG_MAX_STEPS:
                break
            n *= 2
        return Attributions(m, IG, rows, reduce_cells(m, raw.detach()), delta.detach(), n)

    def occlusion(self, m: Modality, per_eval: int = 64) -> Attributions:
        """Occlusion of patches (camera, audio) with the modality's baseline."""
        assert m is not Modality.TELEMETRY, "telemetry: shapley_values or metric_ablation"
        rows, target, args = self._context(m)
        x = self.input(m)
        window, stride = occlusion_window(m, tuple(x.shape[1:]))
        with torch.no_grad():
            raw = Occlusion(self.forward(m)).attribute(
                x,
                sliding_window_shapes=window,
                strides=stride,
                baselines=self.baseline(m),
                target=target,
                additional_forward_args=args,
                perturbations_per_eval=per_eval,
            )
        return Attributions(m, OCCLUSION, rows, reduce_cells(m, raw))

    def metric_shapley(self, per_eval: int = 64) -> Attributions:
        """Telemetry: exact Shapley values of the metrics, a coalition's others absent."""
        return self._per_metric(ShapleyValues, SHAPLEY, per_eval)

    def metric_ablation(self) -> Attributions:
        """Telemetry, cheaply: the fall of the target's probability when each whole metric
        is absent in turn, all in one forward call (M + 1 rows per window)."""
        metrics = self.input(Modality.TELEMETRY).shape[-1] // 2
        return self._per_metric(FeatureAblation, ABLATION, metrics)

    def _per_metric(
        self, method: type[FeatureAblation] | type[ShapleyValues], name: str, per_eval: int
    ) -> Attributions:
        m = Modality.TELEMETRY
        rows, target, args = self._context(m)
        x = self.input(m)
        with torch.no_grad():
            raw = method(self.forward(m)).attribute(
                x,
                baselines=self.baseline(m),
                target=target,
                additional_forward_args=args,
                feature_mask=metric_mask(x),
                perturbations_per_eval=per_eval,
            )  # [n, steps, 2M]: every cell of metric j holds metric j's value
        return Attributions(m, name, rows, raw[:, 0, : x.shape[-1] // 2])  # -> [n, M]


def class_log_odds(logits: Tensor) -> Tensor:
    """log(p_c / (1 - p_c)) for every class c: logits [k, C] -> [k, C]. Unlike p_c it does
    not saturate: a window at p = 0.998 still shows which inputs hold it there."""
    c = logits.shape[-1]
    eye = torch.eye(c, dtype=torch.bool, device=logits.device)  # [C, C]
    others = logits[:, None, :].masked_fill(eye, float("-inf"))  # [k, C, C]: row c without c
    return logits - others.logsumexp(dim=-1)  # [k, C] - [k, C]


def reduce_cells(m: Modality, raw: Tensor) -> Tensor:
    """A method's attribution of the preprocessed input -> the cells a person reads."""
    if m is Modality.CAMERA:
        return raw.sum(dim=2)  # [n, T, 3, S, S] -> [n, T, S, S]
    if m is Modality.TELEMETRY:
        half = raw.shape[-1] // 2
        return raw[..., :half] + raw[..., half:]  # [n, steps, 2M] -> [n, steps, M]
    return raw  # audio [n, F, L]


def metric_mask(x: Tensor) -> Tensor:
    """Captum feature ids for telemetry input [n, steps, 2M]: metric j's value and presence
    channels at every step share id j. [1, steps, 2M]."""
    steps, metrics = x.shape[1], x.shape[2] // 2
    ids = torch.arange(metrics, device=x.device).repeat(2)  # [2M]
    return ids[None, None, :].expand(1, steps, -1).contiguous()  # -> [1, steps, 2M]


def occlusion_window(
    m: Modality, shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Captum Occlusion's patch and stride for one window's input `shape` (module docstring)."""
    if m is Modality.CAMERA:
        t, c, s, _ = shape
        p = max(2, s // 4)
        return (t, c, p, p), (t, c, p // 2, p // 2)
    bands, frames = shape
    pf, pl = max(1, bands // 8), max(1, min(frames, 21))
    return (pf, pl), (max(1, pf // 2), max(1, (pl + 1) // 2))


def predict_with_telemetry(
    model: FusionClassifier, batch: WindowBatch
) -> tuple[Prediction, Tensor]:
    """FusionClassifier.predict, and per window the fall of the predicted class's probability
    when each telemetry metric is absent (`metric_ablation`): [B, M metrics], NaN for a window
    without telemetry. For the stream: the tokens are computed once; only the telemetry
    encoder and the fusion run again, on B x (M + 1) inputs."""
    with torch.inference_mode():  # as FusionClassifier.predict: no gradient is needed
        explainer = Explainer(model, batch, output=PROBABILITY)
        pred = explainer.prediction()
        metrics = len(model.config.telemetry.metrics) if model.config.telemetry is not None else 0
        out = torch.full((batch.size, metrics), float("nan"), device=pred.probs.device)
        if batch.rows.get(Modality.TELEMETRY, torch.empty(0)).shape[0] > 0:
            got = explainer.metric_ablation()
            out[got.rows] = got.per_metric()
    return pred, out
