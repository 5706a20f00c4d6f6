"""Teacher-forced log-probabilities of completions given prompts (and of candidate
next tokens at the end of prompts).

Sequences are left-padded so that every completion ends at the last position, and
position ids follow the attention mask so padding does not shift positions. Only
completion positions reach the LM head: for scoring, only each row's own completion
tokens, a chunk at a time, so a batch that mixes short and long completions computes
no [B, T, V] logits for padding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from unisd.chunked import token_logprobs
from unisd.losses import token_divergence
from unisd.modeling import inference_autocast
from unisd.progress import Progress


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, L] of sequences left-padded to the longest."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def pack_left(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, Any]:
    """Batch (prompt, completion) pairs, left-padded; `keep` covers every completion."""
    ids, mask = pad_left([p + c for p, c in pairs], pad_id, device)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "keep": max(len(c) for _, c in pairs) + 1,
    }


def completion_hidden(lm: Any, packed: dict[str, Any], width: int) -> torch.Tensor:
    """Final-layer hidden states (after the final norm) at the positions that predict
    each completion token: [B, width, H], right-aligned like the batch's mask."""
    out = lm.get_decoder()(
        input_ids=packed["input_ids"],
        attention_mask=packed["attention_mask"],
        position_ids=packed["position_ids"],
        use_cache=False,
    )
    return out.last_hidden_state[:, -(width + 1) : -1]


def length_batches(lengths: list[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices grouped for padded forwards: longest first, at most `max_rows` per batch
    and, when `max_tokens` > 0, at most that many padded tokens (rows × longest); a
    sequence longer than the budget goes alone. Neighbours in length share a batch, so
    padding stays small, and long sequences get fewer rows: on a CPU a single long
    sequence already fills the matmuls, and padding is pure extra work."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else None
        if batch and len(batch) < max_rows and (not max_tokens or (len(batch) + 1) * lengths[batch[0]] <= max_tokens):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def head_fn(lm, weight: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits through the LM head (optionally with another weight, e.g. the
    teacher's), including the final logit soft-capping some models use."""
    head = lm.get_output_embeddings()
    w = head.weight if weight is None else weight
    cap = getattr(lm.config, "final_logit_softcapping", None)

    def apply(h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w.to(h.dtype), None if head.bias is None else head.bias.to(h.dtype))
        return torch.tanh(logits / cap) * cap if cap else logits

    return apply


def completion_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, keep-1, V] whose position j predicts completion slot j (right-aligned)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=batch["keep"],
        use_cache=False,
    )
    return out.logits[:, :-1].float()


@torch.inference_mode()
def completion_logprobs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str = "score",
    chunk_size: int = 256,
    max_tokens: int = 0,
) -> list[torch.Tensor]:
    """log p(c_t | prompt, c_<t) for each completion token, one tensor per pair, in input
    order; batches as `length_batches(…, batch_size, max_tokens)`."""
    head = head_fn(model)
    out: list[torch.Tensor | None] = [None] * len(pairs)
    progress = Progress(desc, len(pairs), "sequences")
    with inference_autocast(model, bf16):
        for idx in length_batches([len(p) + len(c) for p, c in pairs], batch_size, max_tokens):
            batch = pack_left([pairs[i] for i in idx], pad_id, model.device)
            width = batch["keep"] - 1
            lengths = [len(pairs[i][1]) for i in idx]
            real = (
                torch.arange(width, device=model.device) >= width - torch.tensor(lengths, device=model.device)[:, None]
            )
            hidden = completion_hidden(model, batch, width)[real]  # [sum of lengths, H], row by row
            targets = batch["input_ids"][:, -width:][real]
            token_lp = token_logprobs(hidden[None], head, targets[None], 1.0, chunk_size)[0].float()
            for i, lp in zip(idx, token_lp.split(lengths)):
                out[i] = lp.cpu()
            progress.update(len(idx), tokens=int(batch["attention_mask"].sum()))
    progress.close()
    return out  # type: ignore[return-value]


def _over_shared_prompts(
    model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, max_tokens: int, desc: str
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """For pairs (prompt, continuation) that share prompts, each distinct prompt run once:
    yields, batch by batch, the pairs' indices and for each pair the final hidden states
    [|c| + 1, H] at the prompt's last position and at every continuation position, so row
    t predicts continuation token t and row |c| the token after the continuation.

    A batch of distinct prompts (left-padded, `length_batches` on their lengths) is one
    forward that keeps its KV cache; the continuations of those prompts then run over it,
    the cache rows repeated one per continuation, right-padded after the prompts with
    positions continuing each prompt's own, in groups of similar length (`length_batches`
    again: a short option is not padded to a long answer's width). n continuations of a
    P-token prompt cost P + Σ|c| tokens instead of n·P + Σ|c|.
    """
    device, decoder = model.device, model.get_decoder()
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt -> indices of its pairs
    for i, (prompt, _) in enumerate(pairs):
        groups.setdefault(tuple(prompt), []).append(i)
    prompts = list(groups)
    progress = Progress(desc, len(pairs), "sequences")
    for idx in length_batches([len(p) for p in prompts], batch_size, max_tokens):
        batch = pack_left([(list(prompts[g]), []) for g in idx], pad_id, device)
        first = decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=True,
        )
        rows = [(row, i) for row, g in enumerate(idx) for i in groups[prompts[g]]]  # (prompt row, pair)
        parts = length_batches([len(pairs[i][1]) for _, i in rows], len(rows), max_tokens)
        for k, part in enumerate(parts):
            chunk = [rows[r] for r in part]
            conts = [pairs[i][1] for _, i in chunk]
            width = max(1, *map(len, conts))
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            cont_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, c in enumerate(conts):
                ids[r, : len(c)], cont_mask[r, : len(c)] = torch.tensor(c, dtype=torch.long), 1
            select = torch.tensor([row for row, _ in chunk], device=device)
            cache = first.cache if k == len(parts) - 1 else copy.deepcopy(first.cache)
            cache.batch_select_indices(select)  # one cache row per continuation
            prompt_mask = batch["attention_mask"][select]
            hidden = decoder(
                input_ids=ids.to(device),
                attention_mask=torch.cat([prompt_mask, cont_mask.to(device)], 1),
                position_ids=prompt_mask.sum(-1, keepdim=True) + torch.arange(width, device=device),
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            last = first.last_hidden_state[select, -1:]
            yield [i for _, i in chunk], [torch.cat([last[r], hidden[r, : len(c)]]) for r, c in enumerate(conts)]
            progress.update(
                len(chunk), tokens=(int(batch["attention_mask"].sum()) if k == 0 else 0) + int(cont_mask.sum())
            )
    progress.close()


@torch.inference_mode()
def shared_prompt_logprobs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str = "score",
    chunk_size: int = 256,
    max_tokens: int = 0,
) -> list[torch.Tensor]:
    """`completion_logprobs` for pairs that share prompts (an MCQ item's options), each
    distinct prompt run once (`_over_shared_prompts`); the values are
    `completion_logprobs`' up to float rounding (tested)."""
    head, out = head_fn(model), [torch.empty(0)] * len(pairs)
    with inference_autocast(model, bf16):
        for idx, hiddens in _over_shared_prompts(model, pairs, pad_id, batch_size, max_tokens, desc):
            lengths = [len(pairs[i][1]) for i in idx]
            predicting = torch.cat([h[:n] for h, n in zip(hiddens, lengths)])  # [Σ|c|, H], row by row
            targets = torch.tensor([t for i in idx for t in pairs[i][1]], dtype=torch.long, device=model.device)
            token_lp = token_logprobs(predicting[None], head, targets[None], 1.0, chunk_size)[0].float().cpu()
            for i, lp in zip(idx, token_lp.split(lengths)):
                out[i] = lp
    return out


@torch.inference_mode()
def shared_prefix_next_token_logprobs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    candidates: list[list[int]],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str = "next token",
    max_tokens: int = 0,
) -> list[torch.Tensor]:
    """`next_token_logprobs` of prompts written as (shared prefix, own suffix) pairs (an
    MCQ item's rotations: the same question, the options in another order), each
    distinct prefix run once (`_over_shared_prompts`): log p(x | prefix + suffix) of each
    candidate x of `candidates[i]`. The values are `next_token_logprobs`' on the joined
    prompts up to float rounding (tested)."""
    head, out = head_fn(model), [torch.empty(0)] * len(pairs)
    with inference_autocast(model, bf16):
        for idx, hiddens in _over_shared_prompts(model, pairs, pad_id, batch_size, max_tokens, desc):
            lp = torch.log_softmax(head(torch.stack([h[-1] for h in hiddens])).float(), -1)
            for row, i in enumerate(idx):
                out[i] = lp[row, candidates[i]].cpu()
    return out


@torch.inference_mode()
def next_token_logprobs(
    model,
    prompts: list[list[int]],
    candidates: list[list[int]],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str = "next token",
    max_tokens: int = 0,
) -> list[torch.Tensor]:
    """log p(x | prompt) of each candidate token x of `candidates[i]` right after
    `prompts[i]`: the whole-vocabulary next-token log-softmax read at the candidates, one
    tensor [len(candidates[i])] per prompt, in input order. Only the last position
    reaches the LM head (logits_to_keep=1), so a forward costs no [B, T, V] logits;
    batches as `length_batches(…, batch_size, max_tokens)`."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    progress = Progress(desc, len(prompts), "sequences")
    with inference_autocast(model, bf16):
        for idx in length_batches([len(p) for p in prompts], batch_size, max_tokens):
            batch = pack_left([(prompts[i], []) for i in idx], pad_id, model.device)
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                logits_to_keep=1,
                use_cache=False,
            ).logits
            lp = torch.log_softmax(logits[:, -1].float(), -1)
            for row, i in enumerate(idx):
                out[i] = lp[row, candidates[i]].cpu()
            progress.update(len(idx), tokens=int(batch["attention_mask"].sum()))
    progress.close()
    return out  # type: ignore[return-value]


@torch.inference_mode()
def retention(
    model,
    base,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str = "retention",
    max_tokens: int = 0,
) -> list[tuple[torch.Tensor, float]]:
    """For each (prompt, ŷ) of `model`: the *base* model's log-probs of ŷ (for PPLret) and
    the mean per-token JSD(base ‖ model) over ŷ (docs/method.md §5: drift from the base distribution)."""
    out: list[tuple[torch.Tensor, float] | None] = [None] * len(pairs)
    progress = Progress(desc, len(pairs), "sequences")
    with inference_autocast(model, bf16), inference_autocast(base, bf16):
        for idx in length_batches([len(p) + len(c) for p, c in pairs], batch_size, max_tokens):
            batch = pack_left([pairs[i] for i in idx], pad_id, model.device)
            base_logits, model_logits = completion_logits(base, batch), completion_logits(model, batch)
            targets = batch["input_ids"][:, -(batch["keep"] - 1) :]
            for row, i in enumerate(idx):  # one row at a time: [C, V] intermediates, not [B, C, V]
                n = len(pairs[i][1])
                b, m = base_logits[row, -n:], model_logits[row, -n:]
                lp = torch.log_softmax(b, -1).gather(-1, targets[row, -n:, None]).squeeze(-1)
                out[i] = (lp.cpu(), float(token_divergence(m, b, "jsd", alpha=0.5).mean()))
            progress.update(len(idx), tokens=int(batch["attention_mask"].sum()))
    progress.close()
    return out  # type: ignore[return-value]


def perplexity(logprobs: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of one sequence (its token log-probs)."""
    return float(torch.exp(-logprobs.mean())) if logprobs.numel() else float("nan")
