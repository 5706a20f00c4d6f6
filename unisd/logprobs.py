"""Teacher-forced log-probabilities of completions given prompts.

Sequences are left-padded so that every completion ends at the last position; only the
logits of the completion positions are computed (`logits_to_keep`), and position ids
follow the attention mask so padding does not shift positions.
"""

from __future__ import annotations

import torch

from unisd.progress import Progress


def pack_left(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Batch (prompt, completion) pairs, left-padded; `keep` covers every completion."""
    seqs = [p + c for p, c in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(c) for _, c in pairs) + 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device), "keep": keep}


def completion_logits(model, batch: dict[str, torch.Tensor], bf16: bool = False) -> torch.Tensor:
    """Logits [B, keep-1, V] whose position j predicts completion slot j (right-aligned)."""
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=batch["keep"], use_cache=False)
    return out.logits[:, :-1].float()


@torch.inference_mode()
def completion_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                        bf16: bool = False, desc: str = "score") -> list[torch.Tensor]:
    """log p(c_t | prompt, c_<t) for each completion token, one tensor per pair, in input order."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[torch.Tensor | None] = [None] * len(pairs)
    progress = Progress(desc, len(pairs), "sequences")
    for first in range(0, len(order), batch_size):
        idx = order[first : first + batch_size]
        batch = pack_left([pairs[i] for i in idx], pad_id, model.device)
        logp = torch.log_softmax(completion_logits(model, batch, bf16), dim=-1)
        targets = batch["input_ids"][:, -(batch["keep"] - 1):]
        token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(idx):
            n = len(pairs[i][1])
            out[i] = token_lp[row, token_lp.shape[1] - n:].cpu()
        progress.update(len(idx), tokens=int(batch["attention_mask"].sum()))
    progress.close()
    return out  # type: ignore[return-value]


def perplexity(token_logprobs: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of one sequence."""
    return float(torch.exp(-token_logprobs.mean())) if token_logprobs.numel() else float("nan")
