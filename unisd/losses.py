"""Distillation losses on plain tensors (docs/method.md §1, §2.1, §2.3–§2.5): pure math.

Each function is one formula of the method on tensors that are already there. How the
terms are combined into the training objective is `unisd.objective`; computing the
divergence from hidden states a chunk of positions at a time, with its gradients taken
in the forward, is `unisd.chunked`.

Shapes: B sequences, T completion positions (aligned by completion index between student
and teacher), V vocabulary, H hidden size. `mask` [B, T] is True at real completion
tokens. The teacher is always a constant: every teacher input is detached or computed
without gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
ClipMode = Literal["none", "static", "quantile"]
Normalize = Literal["tokens", "weight", "sequence"]


# ---------------------------------------------------------------------------------------
# per-token divergences (§1)


def _upcast(x: Tensor) -> Tensor:
    """At least float32: log-softmax over a large vocabulary is not safe in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) over the last dim, in at least float32."""
    return torch.log_softmax(_upcast(logits) / temperature, dim=-1)


def _kl(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q), from log-probabilities, over the last dim."""
    return (lp_p.exp() * (lp_p - lp_q)).sum(-1)


def divergence(lp_s: Tensor, lp_t: Tensor, kind: Divergence, alpha: float) -> Tensor:
    """Per-token divergence [...] from student and teacher log-probabilities (see `token_divergence`)."""
    if kind == "forward_kl":
        return _kl(lp_t, lp_s)
    if kind == "reverse_kl":
        return _kl(lp_s, lp_t)
    if kind == "jsd":
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"jsd needs 0 < alpha < 1, got {alpha}")
        # log m = log(α p_T + (1−α) p_S), by log-sum-exp so tiny probabilities survive
        lp_m = torch.logaddexp(lp_t + math.log(alpha), lp_s + math.log1p(-alpha))
        return alpha * _kl(lp_t, lp_m) + (1 - alpha) * _kl(lp_s, lp_m)
    raise ValueError(f"unknown divergence {kind!r}; expected forward_kl, reverse_kl or jsd")


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: Divergence = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Divergence [...] between p_S and p_T over the full vocabulary (last dim).

    Both sides use p = softmax(logits / T). forward_kl = KL(p_T ‖ p_S), reverse_kl =
    KL(p_S ‖ p_T), jsd = α KL(p_T ‖ m) + (1−α) KL(p_S ‖ m) with m = α p_T + (1−α) p_S.
    No T² rescaling (the method has none, docs/method.md §1.2). Holds several [..., V] tensors at once:
    for long sequences over a large vocabulary use `unisd.chunked.chunked_divergence`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return divergence(
        log_probs(student_logits, temperature), log_probs(teacher_logits.detach(), temperature), kind, alpha
    )


# ---------------------------------------------------------------------------------------
# clipping (§2.5) and weighted reduction (§2.1)


def clip_divergence(
    ell: Tensor, mask: Tensor, mode: ClipMode = "none", tau: float = 10.0, q: float = 0.99
) -> tuple[Tensor, float]:
    """Cap per-token divergences before weighting; returns (clipped [B, T], clipped fraction).

    static: min(ℓ, τ). quantile: min(ℓ, quantile_q of ℓ over the masked tokens), the
    threshold detached. A clamp passes no gradient to the clipped tokens, so outlier
    tokens stop pulling the student. The fraction is over masked tokens.
    """
    if mode not in ("none", "static", "quantile"):
        raise ValueError(f"unknown clip mode {mode!r}; expected none, static or quantile")
    mask = mask.bool()
    if mode == "none" or not mask.any():
        return ell, 0.0
    if mode == "static":
        limit = torch.as_tensor(tau, dtype=ell.dtype, device=ell.device)
    else:
        limit = torch.quantile(ell.detach()[mask], q)
    fraction = ((ell.detach() > limit) & mask).sum() / mask.sum()
    return ell.clamp(max=limit), float(fraction)


def weighted_token_loss(
    ell: Tensor,
    mask: Tensor,
    token_weights: Tensor | None = None,
    seq_weights: Tensor | None = None,
    normalize: Normalize = "tokens",
) -> Tensor:
    """Scalar Σ s_b w_bt ℓ_bt m_bt over a normaliser chosen by `normalize`.

    tokens (default): / Σ m, the batch's completion-token count.
    weight: / Σ s w m, the batch's total weight.
    sequence: per sequence Σ_t w ℓ / Σ_t w, then the mean over sequences with tokens. This
      is the public reference's reduction, under which a per-sequence weight s_b cancels
      (the defect of docs/method.md §9.1); it is kept only so the defect can be shown. The default
      "tokens" fixes it: a sequence's weight scales its share of the loss.
    Missing weights are 1. Padding never contributes, even if ℓ there is not finite.
    """
    mask = mask.bool()
    w = mask.to(ell.dtype)
    if token_weights is not None:
        w = w * token_weights
    if seq_weights is not None:
        w = w * seq_weights[:, None]
    weighted = torch.where(mask, ell, 0.0) * w
    if normalize == "tokens":
        return weighted.sum() / mask.sum().clamp_min(1)
    if normalize == "weight":
        return weighted.sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    if normalize == "sequence":
        per_seq = weighted.sum(-1) / w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
        return _mean_over(per_seq, mask.any(-1))
    raise ValueError(f"unknown normalize {normalize!r}; expected tokens, weight or sequence")


# ---------------------------------------------------------------------------------------
# auxiliary losses (§2.3, §2.4)


def _mean_over(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of values[keep]; 0 (not NaN) when nothing is kept."""
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp_min(1)


def _sequence_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Token mean within each sequence, then the mean over sequences that have tokens."""
    mask = mask.bool()
    per_seq = torch.where(mask, per_token, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    return _mean_over(per_seq, mask.any(-1))


def contrastive_loss(lp_student: Tensor, lp_pos: Tensor, lp_neg: Tensor, mask: Tensor, margin: float) -> Tensor:
    """Token-level margin loss on sampled-token log-probs (docs/method.md §2.3).

    pos_t = |lp_S − lp_T⁺|, neg_t = |lp_S − lp_T⁻|; the student should sit closer to the
    gold-context teacher than to the wrong-context one by `margin`:
    mean_seq(Σ_t m ReLU(margin + pos_t − neg_t) / Σ_t m). Teacher terms are constants.
    """
    pos = (lp_student - lp_pos.detach()).abs()
    neg = (lp_student - lp_neg.detach()).abs()
    return _sequence_mean(torch.relu(margin + pos - neg), mask)


def feature_matching_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> Tensor:
    """MSE of final-layer hidden states [B, T, H] (docs/method.md §2.4), teacher stop-gradient.

    Mean over the hidden size, token mean per sequence, then batch mean.
    """
    sq = (_upcast(student_hidden) - _upcast(teacher_hidden.detach())).pow(2).mean(-1)
    return _sequence_mean(sq, mask)
