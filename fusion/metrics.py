"""Classification metrics from a confusion matrix.

Convention: any ratio whose denominator is 0 is defined as 0 (e.g. the precision of a class that
is never predicted, the recall of a class with no true examples). Macro-F1 is the unweighted mean
of the per-class F1 over *all* classes, including classes absent from the data (their F1 is 0),
as scikit-learn does with zero_division=0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n: int) -> np.ndarray:
    """int64 [n, n]; entry [t, p] counts examples of true class t predicted as p."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    for name, y in (("y_true", t), ("y_pred", p)):
        if y.size and (y.min() < 0 or y.max() >= n):
            raise ValueError(f"{name} has class indices outside 0..{n - 1}")
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out  # 0 where den == 0


def classification_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, macro averages and accuracy (plain floats/ints):

    {"per_class": {name: {"precision", "recall", "f1", "support"}}, "macro_precision",
     "macro_recall", "macro_f1", "accuracy", "support"}
    """
    cm = np.asarray(cm)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix is {cm.shape} but there are {len(classes)} classes")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true examples per class
    predicted = cm.sum(axis=0)  # predictions per class
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = int(cm.sum())
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "per_class": per_class,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "support": total,
    }
