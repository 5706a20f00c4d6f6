"""The training objective: what one micro-batch's loss is (docs/method.md §1–§2, §7.3).

Distillation items (`loss: distill`), with m the loss mask (`loss_mask`), T the
distillation temperature, D the divergence (forward KL, reverse KL or JSD) between the
teacher's p_T (prompt with the gold demonstration) and the student's p_S (prompt only)
at each completion position, ℓ̂ = clip(ℓ) (§2.5), w and s the agreement weights of a
token and of a sequence (§2.1, 1 when agreement is off) and Z the normaliser
(`agreement.normalize`; the token count Σ m by default):

    L_div = Σ_bt s_b · w_bt · ℓ̂_bt · m_bt / Z        ℓ_bt = D(p_T,bt ‖ p_S,bt) at T
    L     = L_div + λ_f · L_feat + λ_c · L_con        (feature: none or joint)
    L     = L_feat + λ_c · L_con                      (feature: repr)

with L_feat the hidden-state MSE (§2.4) and L_con the token-level margin loss on the
sampled tokens' log-probs under the gold and the wrong-demonstration teacher (§2.3);
a term is there only when its component is on. SFT items (`loss: sft`, and `gold_mix`
items under any recipe) get the mean token cross-entropy at T = 1:

    L = − Σ_bt m_bt · log p_θ(y_bt | x_b, y_b,<t) / Σ_bt m_bt

m holds every completion token, the final EOS included (with pad = EOS, as in SmolLM2,
masking it would teach the student never to stop), except each completion's first
`skip_first_tokens` for the teacher-based terms. Every term is one function of
`unisd.losses` (pure math); the divergence comes from hidden states a chunk at a time
(`unisd.chunked`). The training loop (`unisd.train`) calls `batch_loss` once per
micro-batch and logs the terms it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from unisd.agreement import sequence_weights, token_weights
from unisd.chunked import chunked_divergence, token_logprobs
from unisd.logprobs import completion_hidden, head_fn
from unisd.losses import clip_divergence, contrastive_loss, feature_matching_loss, weighted_token_loss
from unisd.recipes import Method
from unisd.teachers import Teacher


class HiddenCache(Protocol):
    """Where a frozen teacher's hidden states may come from instead of a pass (`unisd.train.TeacherCache`)."""

    def hidden(self, prompt: str, batch: dict[str, Any], compute: Callable[[], Tensor]) -> Tensor: ...


def loss_mask(mask: Tensor, skip: int) -> Tensor:
    """The completion positions [B, C] that enter the loss: all but each row's first
    `skip`. A position's index within its (right-aligned) completion is cumsum(mask) − 1,
    so it counts when cumsum(mask) > skip; the last one (EOS) always counts while the
    completion is longer than `skip`."""
    return mask & (mask.cumsum(1) > skip)


def batch_loss(
    method: Method,
    lm: Any,
    teacher: Teacher,
    head_name: str,
    batch: dict[str, Any],
    chunk: int,
    cache: HiddenCache | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The recipe's total loss on one micro-batch (the module docstring's L), and its
    terms for logging. `batch` is `unisd.train.collate`'s; with a `cache` (frozen teacher
    only), `batch["ids"]` names the items of the batch."""
    if method.loss == "sft" or batch["sft"]:
        return _sft_loss(lm, batch, chunk)
    targets, width = batch["targets"], batch["width"]
    mask = loss_mask(batch["mask"], method.skip_first_tokens)
    terms: dict[str, float] = {}

    # Teacher passes first: swapping the teacher's weights in place must not touch
    # tensors that the student's forward has saved for backward.
    def teacher_hidden(prompt: str) -> Tensor:
        def run() -> Tensor:
            return completion_hidden(lm, batch[prompt], width)

        return run() if cache is None else cache.hidden(prompt, batch, run)

    with teacher.active():
        h_t = teacher_hidden("teacher_prompt")
        h_neg = teacher_hidden("negative_prompt") if method.contrastive.enabled else None
    h_s = completion_hidden(lm, batch["student"], width)
    head, t_head = head_fn(lm), head_fn(lm, teacher.weight(head_name, lm.get_output_embeddings().weight))
    T = method.temperature
    loss = h_s.new_zeros(())
    lp_s = lp_pos = None
    if method.feature.mode != "repr":
        res = chunked_divergence(
            h_s,
            head,
            h_t,
            t_head,
            kind=method.divergence,
            alpha=method.alpha,
            temperature=T,
            targets=targets if method.contrastive.enabled else None,
            chunk_size=chunk,
        )
        ell, terms["clipped_frac"] = clip_divergence(
            res.divergence, mask, method.clip.mode, method.clip.tau, method.clip.q
        )
        token_w, seq_w = _agreement_weights(method, batch, mask, terms)
        normalize = method.agreement.normalize if method.agreement.enabled else "tokens"
        kl = weighted_token_loss(ell, mask, token_w, seq_w, normalize)
        terms["divergence"] = kl.item()
        loss = loss + kl
        lp_s, lp_pos = res.student_logprobs, res.teacher_logprobs
    if method.feature.mode != "none":
        feat = feature_matching_loss(h_s, h_t, mask)
        terms["feature"] = feat.item()
        loss = loss + (feat if method.feature.mode == "repr" else method.feature.weight * feat)
    if method.contrastive.enabled:
        assert h_neg is not None  # the negative-context pass runs whenever the contrastive term is on
        if lp_s is None or lp_pos is None:
            lp_s = token_logprobs(h_s, head, targets, T, chunk)
            lp_pos = token_logprobs(h_t, t_head, targets, T, chunk)
        lp_neg = token_logprobs(h_neg, t_head, targets, T, chunk)
        con = contrastive_loss(lp_s, lp_pos, lp_neg, mask, method.contrastive.margin)
        terms["contrastive"] = con.item()
        loss = loss + method.contrastive.weight * con
    return loss, terms


def _sft_loss(lm: Any, batch: dict[str, Any], chunk: int) -> tuple[Tensor, dict[str, float]]:
    """Mean token cross-entropy of the completions (T = 1, every completion token)."""
    mask = batch["mask"]
    lp = token_logprobs(
        completion_hidden(lm, batch["student"], batch["width"]), head_fn(lm), batch["targets"], 1.0, chunk
    )
    loss = -(lp * mask).sum() / mask.sum()
    return loss, {"sft": loss.item()}


def _agreement_weights(
    method: Method, batch: dict[str, Any], mask: Tensor, terms: dict[str, float]
) -> tuple[Tensor | None, Tensor | None]:
    """(token weights [B, T], sequence weights [B]) from the batch's agreement scores
    (§2.1), None where that level is off; their statistics go into `terms`."""
    a = method.agreement
    if not a.enabled:
        return None, None
    if a.level == "token":
        token_w = token_weights(batch["scores"], mask, a.gamma, a.stat)
        terms["token_weight_mean"] = float(token_w[mask].mean())
        terms["token_weight_min"] = float(token_w[mask].min())
        return token_w, None
    seq_w = sequence_weights(batch["scores"], mask, a.gamma)
    terms["seq_weight_mean"] = float(seq_w.mean())
    return None, seq_w
