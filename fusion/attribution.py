"""Exact Shapley attribution over the M modality slots of a fusion model.

The game: players are modality slots, v(S) = probability of the target class when the model
attends only to the slots in S (CLS is always attended; v(empty) is the CLS-only prediction).
For small M (here <= 3) all 2^M coalitions are evaluated exactly, in one batched `fuse` call:

    phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S))

A slot whose modality is absent from a window is masked whatever S says, so v(S + i) = v(S) and
phi_i = 0 (the null-player property); the result is set to exactly 0 there. Efficiency holds:
sum_i phi_i = v(all) - v(empty) = p(full input) - p(CLS only).

The caller chooses the mode: use eval mode (FusionClassifier.predict does) so dropout is off.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

from math import factorial
from typing import Protocol

import torch
from torch import Tensor


class Fuser(Protocol):
    def fuse(self, tokens: Tensor, present: Tensor) -> Tensor: ...


def coalitions(m: int, device: torch.device | str = "cpu") -> Tensor:
    """All subsets of m slots as a bool matrix [2^m, m]; row s contains slot i iff bit i of s."""
    s = torch.arange(2**m, device=device)  # [2^m]
    bits = torch.arange(m, device=device)  # [m]
    return (s[:, None] >> bits[None, :]) & 1 == 1  # [2^m, 1] >> [1, m] -> [2^m, m]


def shapley_weights(m: int) -> Tensor:
    """w[s] = |S|! (m - |S| - 1)! / m! for every coalition S (row s of coalitions(m)): [2^m]."""
    sizes = coalitions(m).sum(dim=1).tolist()  # [2^m]
    return torch.tensor(
        [factorial(k) * factorial(m - k - 1) / factorial(m) if k < m else 0.0 for k in sizes],
        dtype=torch.float64,
    )


def coalition_values(model: Fuser, tokens: Tensor, present: Tensor, target_class: Tensor) -> Tensor:
    """v[S, b] = p(target_class[b] | only slots in S attended, and only those present): [2^M, B]."""
    b, m, d = tokens.shape
    sets = coalitions(m, tokens.device)  # [2^M, M]
    mask = sets[:, None, :] & present[None, :, :]  # [2^M, 1, M] & [1, B, M] -> [2^M, B, M]
    x = tokens.unsqueeze(0).expand(2**m, b, m, d)  # [B, M, D] -> [2^M, B, M, D]
    logits = model.fuse(x.reshape(-1, m, d), mask.reshape(-1, m))  # -> [2^M * B, C]
    probs = logits.softmax(dim=-1).view(2**m, b, logits.shape[-1])  # -> [2^M, B, C]
    index = target_class.view(1, b, 1).expand(2**m, b, 1)  # [B] -> [2^M, B, 1]
    return probs.gather(2, index).squeeze(2)  # [2^M, B, C] -> [2^M, B]


def shapley(model: Fuser, tokens: Tensor, present: Tensor, target_class: Tensor) -> Tensor:
    """Exact Shapley value of each modality slot for target_class: float32 [B, M].
    Marginal differences v(S + i) - v(S) are formed first, so a null player gets exactly 0."""
    m = tokens.shape[1]
    with torch.no_grad():
        v = coalition_values(model, tokens, present, target_class).double()  # [2^M, B]
        weights = shapley_weights(m).to(v.device)  # [2^M]
        s = torch.arange(2**m, device=v.device)  # [2^M] coalition ids (bit i = slot i)
        phi = []
        for i in range(m):
            without = s[(s >> i) & 1 == 0]  # [2^(M-1)] coalitions not containing slot i
            gain = v[without | (1 << i)] - v[without]  # [2^(M-1), B]
            phi.append((weights[without, None] * gain).sum(dim=0))  # -> [B]
        result = torch.stack(phi, dim=1)  # M x [B] -> [B, M]
        result = torch.where(present, result, 0.0)  # absent slot: exactly 0 (null player)
    return result.float()
