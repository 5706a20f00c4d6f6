"""Batched generation: greedy for evaluation, sampled for trajectories.

Prompts are bucketed by length (longest first, so memory peaks early) and left-padded
within a batch; each completion is cut after its first EOS. Results come back in the
order of the input prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class Completion:
    ids: list[int]  # generated tokens, ending with EOS when the model stopped by itself
    text: str  # decoded, special tokens removed, cut at a stop string
    finished: bool  # stopped by EOS or a stop string rather than the token limit


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def _pad_left(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _finish(tokens: list[int], eos_ids: set[int], pad_id: int, tokenizer, stops: list[str]) -> Completion:
    cut = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    ids = tokens[: cut + 1] if cut is not None else [t for t in tokens if t != pad_id]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stopped = cut is not None
    for stop in stops:
        if stop in text:
            text, stopped = text[: text.index(stop)], True
    return Completion(ids, text, stopped)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], sampling: Sampling, batch_size: int = 16,
             stop_strings: list[str] | None = None, bf16: bool = False, desc: str = "generate") -> list[Completion]:
    stops = list(stop_strings or [])
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id
    knobs = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
             if sampling.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    device_type = model.device.type
    start, n_tokens = time.monotonic(), 0
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", mininterval=10, disable=None)
    for b, first in enumerate(range(0, len(order), batch_size)):
        idx = order[first : first + batch_size]
        ids, mask = _pad_left([prompts[i] for i in idx], pad_id, model.device)
        if sampling.do_sample:
            torch.manual_seed(sampling.seed * 100_003 + b)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                  pad_token_id=pad_id, eos_token_id=list(eos_ids), stop_strings=stops or None,
                                  tokenizer=tokenizer if stops else None, **knobs)
        for row, i in enumerate(idx):
            done = _finish(seqs[row, ids.shape[1]:].tolist(), eos_ids, pad_id, tokenizer, stops)
            n_tokens += len(done.ids)
            out[i] = done
        bar.update(len(idx))
    bar.close()
    elapsed = time.monotonic() - start
    log.info("%s: %d sequences, %d new tokens in %.1fs (%.1f tok/s)", desc, len(prompts), n_tokens, elapsed,
             n_tokens / max(elapsed, 1e-9))
    return out  # type: ignore[return-value]
