"""Multi-teacher agreement weights (docs/method.md §2.1), on plain tensors.

`scores` [K, B, T] holds s_{k,t} = log π_φ(y_t | a_k(x), y_<t): the teacher's log-prob of
each sampled token under K auxiliary contexts. Where the K contexts disagree about a
token (or a whole trajectory) its supervision is less reliable and gets less weight.
`mask` [B, T] is True at completion tokens; padding never influences any statistic.
Weights are constants for the loss, so scores are detached.

Variance is the population variance over the K contexts (correction=0): the K contexts
are the whole set being compared, not a sample of a larger one. For token weights the
choice cancels in d/q; for sequence weights the unbiased variance would only rescale γ
by K/(K−1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Stat = Literal["var", "range"]


def _checked(scores: Tensor) -> Tensor:
    if scores.dim() != 3 or scores.shape[0] < 2:
        raise ValueError(
            f"agreement needs scores [K, B, T] from K >= 2 teacher contexts, got shape {tuple(scores.shape)}"
        )
    return scores.detach().to(torch.promote_types(scores.dtype, torch.float32))


def token_disagreement(scores: Tensor, mask: Tensor, stat: Stat = "var") -> Tensor:
    """d [B, T]: spread of the K scores of each token, Var_k (population) or max_k − min_k; 0 at padding."""
    scores = _checked(scores)
    if stat == "var":
        d = scores.var(dim=0, correction=0)
    elif stat == "range":
        d = scores.amax(dim=0) - scores.amin(dim=0)
    else:
        raise ValueError(f"unknown disagreement stat {stat!r}; expected var or range")
    return torch.where(mask.bool(), d, 0.0)


def token_weights(
    scores: Tensor,
    mask: Tensor,
    gamma: float,
    stat: Stat = "var",
    quantile: float = 0.95,
    cap: float = 10.0,
    floor: float = 0.01,
) -> Tensor:
    """w [B, T] = max(1 / (1 + γ d̃), floor) with d̃ = min(d / q, cap); 0 at padding.

    q is the `quantile` of d over the batch's completion tokens (floored at 1e-6), so γ
    acts on a scale-free disagreement; cap and floor bound how little weight a token gets.
    """
    mask = mask.bool()
    d = token_disagreement(scores, mask, stat)
    q = torch.quantile(d[mask], quantile).clamp_min(1e-6) if mask.any() else 1e-6
    w = (1.0 / (1.0 + gamma * (d / q).clamp(max=cap))).clamp(min=floor)
    return torch.where(mask, w, 0.0)


def sequence_disagreement(scores: Tensor, mask: Tensor) -> Tensor:
    """D [B] = Var_k(mean_t s_{k,t}), the token mean over each sequence's completion tokens.

    A sequence without tokens has D = 0.
    """
    scores = _checked(scores)
    mask = mask.bool()
    means = torch.where(mask, scores, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    return means.var(dim=0, correction=0)


def sequence_weights(scores: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """w [B] = exp(−γ D), one weight for every token of a trajectory."""
    return torch.exp(-gamma * sequence_disagreement(scores, mask))


def keep_by_disagreement(disagreement: Tensor, quantile: float) -> Tensor:
    """bool [B]: keep trajectories whose D is at most the `quantile` of D (1.0 keeps all).

    The pipeline's filter stage drops the rest and logs how many.
    """
    if disagreement.numel() == 0:
        return torch.zeros_like(disagreement, dtype=torch.bool)
    d = disagreement.to(torch.promote_types(disagreement.dtype, torch.float32))
    return d <= torch.quantile(d, quantile)
