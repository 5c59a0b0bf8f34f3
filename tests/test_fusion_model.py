"""FusionClassifier and WindowBatch on tiny CPU configs: shapes, masking, row independence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.modality import ALL_MODALITIES, Modality
from fusion.batch import WindowBatch
from fusion.model import FusionClassifier
from fusion.modelfile import save_model
from tests.factory import TINY_RATE, all_subsets, random_window, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> FusionClassifier:
    torch.manual_seed(0)
    return FusionClassifier(tiny_config()).eval()


def test_every_subset_of_modalities_per_row(model: FusionClassifier) -> None:
    rng = np.random.default_rng(0)
    subsets = all_subsets()  # 8 rows: none, singles, pairs, all three
    batch = WindowBatch.collate([random_window(rng, model.config, s) for s in subsets], TINY_RATE)
    with torch.inference_mode():
        out = model(batch)
    assert out["logits"].shape == (8, 3)
    assert out["embeddings"].shape == (8, 3, 16)
    assert torch.isfinite(out["logits"]).all()
    expected = torch.tensor([[m in s for m in model.modalities] for s in subsets])
    assert torch.equal(out["present"], expected)
    assert (out["embeddings"][~expected] == 0).all()
    assert (out["embeddings"][expected].abs().sum(dim=1) > 0).all()


def test_collate_keeps_only_rows_with_the_modality() -> None:
    cfg = tiny_config()
    rng = np.random.default_rng(1)
    windows = [
        random_window(rng, cfg, s)
        for s in [(Modality.CAMERA,), (Modality.AUDIO, Modality.TELEMETRY), ALL_MODALITIES]
    ]
    batch = WindowBatch.collate(windows, TINY_RATE)
    assert batch.size == 3
    assert batch.rows[Modality.CAMERA].tolist() == [0, 2]
    assert batch.rows[Modality.AUDIO].tolist() == [1, 2]
    assert batch.raw[Modality.CAMERA].shape == (2, 2, 32, 32, 3)
    assert batch.raw[Modality.CAMERA].dtype == torch.uint8
    np.testing.assert_array_equal(batch.raw[Modality.AUDIO][0].numpy(), windows[1][Modality.AUDIO])
    moved = batch.to("cpu")
    assert moved.rows[Modality.AUDIO].dtype == torch.int64 and moved.audio_sample_rate == TINY_RATE
    empty = WindowBatch.collate([random_window(rng, cfg, ())], TINY_RATE)
    assert empty.raw == {} and empty.size == 1


def test_collate_refuses_mixed_shapes_and_unknown_keys() -> None:
    a = {Modality.AUDIO: np.zeros(4000, np.float32)}
    b = {Modality.AUDIO: np.zeros(3999, np.float32)}
    with pytest.raises(ValueError, match="audio: windows have different raw shapes"):
        WindowBatch.collate([a, b], TINY_RATE)
    with pytest.raises(ValueError, match="unknown modality"):
        WindowBatch.collate([{"lidar": np.zeros(3)}], TINY_RATE)  # type: ignore[dict-item]


def test_missing_modality_of_another_row_changes_nothing(model: FusionClassifier) -> None:
    rng = np.random.default_rng(2)
    windows = [
        random_window(rng, model.config, (Modality.AUDIO, Modality.TELEMETRY)),
        random_window(rng, model.config, ALL_MODALITIES),
    ]
    with torch.inference_mode():
        before = model(WindowBatch.collate(windows, TINY_RATE))["logits"]
        windows[1][Modality.CAMERA] = 255 - windows[1][Modality.CAMERA]  # row 0 has no camera
        after = model(WindowBatch.collate(windows, TINY_RATE))["logits"]
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-6)
    assert not torch.allclose(after[1], before[1], atol=1e-4)  # row 1 does see its camera


def test_row_output_is_independent_of_batch_composition(model: FusionClassifier) -> None:
    rng = np.random.default_rng(3)
    subsets = all_subsets()
    windows = [random_window(rng, model.config, s) for s in subsets]
    with torch.inference_mode():
        together = model(WindowBatch.collate(windows, TINY_RATE))["logits"]
        for i, window in enumerate(windows):
            alone = model(WindowBatch.collate([window], TINY_RATE))["logits"]
            torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
        reversed_ = model(WindowBatch.collate(windows[::-1], TINY_RATE))["logits"]
    torch.testing.assert_close(reversed_.flip(0), together, rtol=1e-5, atol=1e-5)


def test_absent_slots_are_masked_not_zero_filled(model: FusionClassifier) -> None:
    tokens = torch.randn(4, 3, 16)
    present = torch.tensor(
        [[True, False, True], [False, False, False], [True, True, True], [False, True, False]]
    )
    garbage = torch.where(present[..., None], tokens, 1e3 * torch.randn(4, 3, 16))
    with torch.inference_mode():
        torch.testing.assert_close(model.fuse(garbage, present), model.fuse(tokens, present))
        # presence matters: the same tokens with everything unmasked give other logits
        assert not torch.allclose(
            model.fuse(tokens, torch.ones_like(present)), model.fuse(tokens, present)
        )


def test_model_refuses_modality_it_was_not_built_for() -> None:
    cfg = tiny_config((Modality.TELEMETRY,))
    model = FusionClassifier(cfg).eval()
    full = tiny_config()
    window = random_window(np.random.default_rng(4), full, ALL_MODALITIES)
    with pytest.raises(ValueError, match="uses only"):
        model(WindowBatch.collate([window], TINY_RATE))
    only = {Modality.TELEMETRY: window[Modality.TELEMETRY]}
    assert model(WindowBatch.collate([only], TINY_RATE))["logits"].shape == (1, 3)


def test_empty_batch_gives_empty_outputs(model: FusionClassifier) -> None:
    pred = model.predict(WindowBatch.collate([], TINY_RATE))
    assert pred.probs.shape == (0, 3) and pred.attribution.shape == (0, 3)


def test_gradients_reach_every_stage(model: FusionClassifier) -> None:
    model.train()
    rng = np.random.default_rng(5)
    batch = WindowBatch.collate(
        [random_window(rng, model.config, ALL_MODALITIES) for _ in range(3)], TINY_RATE
    )
    loss = model(batch)["logits"].logsumexp(dim=1).sum()
    loss.backward()
    for part in ("trunks", "heads", "postprocess"):
        for m in model.modalities:
            grads = [p.grad for p in getattr(model, part)[m].parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads), (part, m)


def test_preprocessors_hold_no_parameters_and_state_dict_has_no_buffers_of_theirs(
    model: FusionClassifier,
) -> None:
    keys = model.state_dict().keys()
    assert not any(k.startswith("preprocess") for k in keys)
    assert {k.split(".")[1] for k in keys if k.startswith("trunks.")} == {
        "camera",
        "audio",
        "telemetry",
    }


def test_predict_restores_training_mode_and_gives_probabilities(model: FusionClassifier) -> None:
    rng = np.random.default_rng(6)
    batch = WindowBatch.collate(
        [random_window(rng, model.config, s) for s in all_subsets()], TINY_RATE
    )
    model.train()
    pred = model.predict(batch)
    assert model.training
    torch.testing.assert_close(pred.probs.sum(dim=1), torch.ones(8))
    assert torch.equal(pred.label_idx, pred.probs.argmax(dim=1))
    assert pred.attribution.shape == (8, 3)


def test_folding_batchnorm_keeps_outputs_and_refuses_training(
    model: FusionClassifier, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.uniform_(-1, 1)  # statistics a trained model would have
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    batch = WindowBatch.collate(
        [random_window(rng, model.config, s) for s in all_subsets()], TINY_RATE
    )
    before = model.predict(batch)
    folded = model.fold_for_inference()
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.trunks.modules()
    )
    after = folded.predict(batch)
    torch.testing.assert_close(after.probs, before.probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.attribution, before.attribution, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="load it again"):
        folded.train()
    with pytest.raises(ValueError, match="folded for inference"):
        save_model(folded, tmp_path / "m")
