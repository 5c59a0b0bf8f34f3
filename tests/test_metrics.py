"""Confusion matrix and classification report against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.metrics import classification_report, confusion_matrix


def test_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 2, 0, 0]
    cm = confusion_matrix(y_true, y_pred, 3)
    expected = np.array([[3, 1, 0], [0, 1, 1], [1, 0, 3]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_report_on_a_known_matrix() -> None:
    cm = np.array([[3, 1, 0], [0, 1, 1], [1, 0, 3]])
    r = classification_report(cm, ["normal", "fire", "intrusion"])
    # normal: tp 3, predicted 4, support 4 -> p 3/4, r 3/4, f1 3/4
    # fire: tp 1, predicted 2, support 2 -> p 1/2, r 1/2, f1 1/2
    # intrusion: tp 3, predicted 4, support 4 -> p 3/4, r 3/4, f1 3/4
    assert r["per_class"]["normal"] == pytest.approx(
        {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    )
    assert r["per_class"]["fire"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert r["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    assert r["accuracy"] == pytest.approx(7 / 10)
    assert r["support"] == 10


def test_asymmetric_precision_and_recall() -> None:
    cm = np.array([[4, 0], [2, 2]])  # class 0: p 4/6 r 1; class 1: p 1, r 1/2
    r = classification_report(cm, ["a", "b"])
    assert r["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["a"]["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))  # 0.8
    assert r["per_class"]["b"]["f1"] == pytest.approx(2 * 0.5 / 1.5)  # 2/3
    assert r["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_zero_denominators_are_zero() -> None:
    cm = np.array(
        [
            [2, 0, 0],
            [0, 0, 0],  # class 1 never occurs
            [1, 0, 0],
        ]
    )  # class 2 occurs but is never predicted
    r = classification_report(cm, ["a", "b", "c"])
    assert r["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    a_f1 = 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)
    assert r["macro_f1"] == pytest.approx(a_f1 / 3)  # absent classes count as 0
    empty = classification_report(np.zeros((2, 2), dtype=np.int64), ["a", "b"])
    assert empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 1"):
        confusion_matrix([0, 1], [0], 3)
    with pytest.raises(ValueError, match="3 classes"):
        classification_report(np.zeros((2, 2)), ["a", "b", "c"])
