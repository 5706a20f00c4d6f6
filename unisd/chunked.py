"""Vocabulary-sized per-token quantities from hidden states, a chunk of positions at a time.

The LM head turns [B, T, H] hidden states into [B, T, V] logits; at a large vocabulary
those (and their log-probs, mixtures and gradients) are most of a training step's
memory. The functions here apply the head and a per-token function of the logits
(`unisd.losses`: the divergence, a log-probability) one chunk of positions at a time,
so no B×T×V tensor is ever held, in the forward or for the backward:

* `chunked_divergence`: the divergence (and the sampled tokens' log-probs) from student
  and teacher hidden states. When the student's head is frozen (LoRA), each output's
  gradient with respect to the hidden states is taken during the forward
  (`_per_token_gradients`, `_KnownGradient`), so the backward recomputes no logits;
  otherwise each chunk is checkpointed and recomputed in the backward.
* `token_logprobs`: log p(y_t) from hidden states, each chunk checkpointed.

The values are exactly those of `unisd.losses` on full logits (tests/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from unisd.losses import Divergence, divergence, log_probs


class ChunkedDivergence(NamedTuple):
    divergence: Tensor  # [B, T]
    student_logprobs: Tensor | None  # [B, T] log p_S(targets) at temperature T, if targets given
    teacher_logprobs: Tensor | None  # [B, T] log p_T(targets) at temperature T (no grad), if targets given


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher: Tensor,
    teacher_head: Callable[[Tensor], Tensor] | None = None,
    *,
    kind: Divergence = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    targets: Tensor | None = None,
    chunk_size: int = 128,
) -> ChunkedDivergence:
    """`unisd.losses.token_divergence` from hidden states, without ever holding B×T×V tensors.

    student_hidden [B, T, H] goes through `student_head` (hidden → logits) one chunk of
    `chunk_size` positions at a time. `teacher` is either teacher hidden states [B, T, H']
    passed through `teacher_head` (no grad), or, with `teacher_head=None`, teacher logits
    [B, T, V] that are only sliced. A chunk's B×chunk×V logits, log-probs and mixtures
    are freed before the next chunk; peak memory is a few B×chunk×V floats plus the [B, T]
    outputs (and, with teacher_head=None, the caller's own teacher logits).

    The backward needs no logits either. When the student head has no trainable weights
    (LoRA: the LM head is frozen), each output's gradient with respect to the hidden
    states is taken in the forward, chunk by chunk (`_per_token_gradients`), and the
    backward only scales it. Otherwise each chunk runs under activation checkpointing and
    is recomputed in the backward, teacher head included.

    With `targets` [B, T] (the sampled tokens y_t) the same pass also returns
    log p_S(y_t) and log p_T(y_t) at temperature T, which the contrastive loss needs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def chunk(hidden: Tensor, teacher_chunk: Tensor, *target: Tensor) -> tuple[Tensor, ...]:
        lp_s = log_probs(student_head(hidden), temperature)
        with torch.no_grad():
            lp_t = log_probs(teacher_chunk if teacher_head is None else teacher_head(teacher_chunk), temperature)
        div = divergence(lp_s, lp_t, kind, alpha)
        if not target:
            return (div,)
        y = target[0].unsqueeze(-1)
        return div, lp_s.gather(-1, y).squeeze(-1), lp_t.gather(-1, y).squeeze(-1)

    grads_now = (
        torch.is_grad_enabled()
        and student_hidden.requires_grad
        and not student_head(student_hidden[:1, :1].detach()).requires_grad
    )
    outs = []
    for start in range(0, student_hidden.shape[1], chunk_size):
        cut = slice(start, start + chunk_size)
        args = (student_hidden[:, cut], teacher[:, cut].detach(), *(() if targets is None else (targets[:, cut],)))
        outs.append(_per_token_gradients(chunk, *args) if grads_now else checkpoint(chunk, *args, use_reentrant=False))
    columns = [torch.cat(column, dim=1) for column in zip(*outs)]
    return ChunkedDivergence(*columns) if targets is not None else ChunkedDivergence(columns[0], None, None)


def _per_token_gradients(fn: Callable[..., tuple[Tensor, ...]], hidden: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
    """fn(hidden, *rest) -> outputs [B, C], each output token a function of that token's
    hidden state alone. Returns the outputs attached to `hidden` through their per-token
    gradients ∂out[b, t]/∂hidden[b, t], computed here: since tokens do not interact,
    ∂(Σ out)/∂hidden is exactly that. The backward then costs one multiply per output
    instead of recomputing fn."""
    leaf = hidden.detach().requires_grad_()
    with torch.enable_grad():
        outs = fn(leaf, *rest)
    needs = [i for i, out in enumerate(outs) if out.requires_grad]
    jacobians = {}
    for n, i in enumerate(needs):
        (jacobians[i],) = torch.autograd.grad(outs[i].sum(), leaf, retain_graph=n < len(needs) - 1)
    return tuple(
        _KnownGradient.apply(hidden, out.detach(), jacobians[i])  # type: ignore[no-untyped-call]
        if i in jacobians
        else out.detach()
        for i, out in enumerate(outs)
    )


class _KnownGradient(torch.autograd.Function):
    """`value` [B, C] as a function of `hidden` [B, C, H] whose per-token gradient is
    `jacobian` [B, C, H]: backward returns grad[b, t] · jacobian[b, t]."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, value: Tensor, jacobian: Tensor) -> Tensor:
        ctx.save_for_backward(jacobian)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (jacobian,) = ctx.saved_tensors
        return (grad.unsqueeze(-1) * jacobian).to(jacobian.dtype), None, None


def token_logprobs(
    hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, temperature: float = 1.0, chunk_size: int = 128
) -> Tensor:
    """log p(y_t) [B, T] at temperature T from hidden states [B, T, H], a chunk at a time.

    Under autograd each chunk is checkpointed, so no B×T×V tensor is kept for backward
    (the SFT loss and the contrastive loss's negative-context teacher use it).
    """

    def chunk(h: Tensor, y: Tensor) -> Tensor:
        return log_probs(head(h), temperature).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    outs = []
    for start in range(0, hidden.shape[1], chunk_size):
        cut = slice(start, start + chunk_size)
        if hidden.requires_grad:
            outs.append(checkpoint(chunk, hidden[:, cut], targets[:, cut], use_reentrant=False))
        else:
            outs.append(chunk(hidden[:, cut], targets[:, cut]))
    return torch.cat(outs, dim=1)
