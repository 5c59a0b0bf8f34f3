"""Exact Shapley values from coalition values, in numpy (no torch: the exported model's path).

The same game and formula as fusion/attribution.py: v[s, b] is the target class's
probability for window b when only the slots of coalition s are attended (bit i of s =
slot i), and

    phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S))

computed in float64 from the marginal differences, so a slot absent from a window (whose
v(S + i) equals v(S)) gets exactly 0, as the torch path sets it.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

from math import factorial

import numpy as np


def coalition_sizes(m: int) -> np.ndarray:
    """|S| of every coalition s of m slots: int [2^m]."""
    s = np.arange(2**m)  # [2^m]
    return ((s[:, None] >> np.arange(m)[None, :]) & 1).sum(axis=1)  # [2^m, m] -> [2^m]


def shapley_weights(m: int) -> np.ndarray:
    """w[s] = |S|! (m - |S| - 1)! / m! for every coalition s: float64 [2^m]."""
    return np.array(
        [
            factorial(k) * factorial(m - k - 1) / factorial(m) if k < m else 0.0
            for k in coalition_sizes(m).tolist()
        ]
    )


def shapley_from_coalitions(
    coalition_probs: np.ndarray, label: np.ndarray, present: np.ndarray
) -> np.ndarray:
    """Shapley value of each slot for each window's `label`: float32 [B, M].

    coalition_probs [2^M, B, C], label int [B], present bool [B, M]."""
    s_count, b = coalition_probs.shape[:2]
    m = present.shape[1]
    v = coalition_probs[:, np.arange(b), label].astype(np.float64)  # [2^M, B, C] -> [2^M, B]
    weights = shapley_weights(m)  # [2^M]
    s = np.arange(s_count)  # [2^M]
    phi = np.empty((b, m), dtype=np.float64)  # [B, M]
    for i in range(m):
        without = s[(s >> i) & 1 == 0]  # [2^(M-1)] coalitions not containing slot i
        gain = v[without | (1 << i)] - v[without]  # [2^(M-1), B]
        phi[:, i] = (weights[without, None] * gain).sum(axis=0)  # -> [B]
    return np.where(present, phi, 0.0).astype(np.float32)  # absent slot: exactly 0
