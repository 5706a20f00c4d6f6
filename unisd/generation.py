"""Batched generation: greedy for evaluation, sampled for trajectories.

Decoding uses continuous batching: a slot freed by a finished sequence is refilled
with the next prompt at once, so a batch never waits for its longest member (plain
`model.generate` keeps every row until the last one stops; with short answers and a
few long ones most of its work is padding). New prompts are prefilled together and
their KV cache is merged into the running one, left-padded to a common length; the
attention mask and per-row position ids keep the padding invisible. Models whose
cache is not plain full attention (e.g. sliding-window layers) fall back to
`model.generate` in length-sorted batches. Results come back in the input order.

Backends. This HF path is the reference ("hf"); `unisd.fast_decode` is a second
implementation of the same contract for llama-architecture models ("fast"): its own
forward over the model's weights with a preallocated KV cache; `unisd.vllm_backend`
("vllm", optional, GPU machines only, not exercised on a GPU) runs vLLM on the same
weights. `get_backend(name)` gives any of them as a `Backend`; `generate(..., backend=name)`
dispatches to it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from unisd.logprobs import pad_left
from unisd.modeling import inference_autocast
from unisd.progress import Progress


@dataclass
class Completion:
    ids: list[int]  # generated tokens, ending with EOS when the model stopped by itself
    text: str  # decoded, special tokens removed, cut at a stop string
    finished: bool  # stopped by EOS or a stop string rather than the token limit
    logprobs: list[float]  # log π(ids[t] | prompt, ids[:t]) at T=1 under the decoding model, one per token


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] from last-position logits [B, V] (argmax, or top-p sampling at T)
    and their log-probabilities [B] at T=1, log softmax(logits)[token]: the model's own
    distribution whatever the sampling knobs, so no second scoring pass is needed."""
    logits = logits.float()
    if not sampling.do_sample:
        picked = logits.argmax(-1)
    else:
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > sampling.top_p  # keep the smallest nucleus
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        picked = _inverse_cdf(probs, torch.rand(len(probs), generator=gen, dtype=torch.float64))
    return picked, _token_logprobs(logits, picked)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens [B] drawn from probs [B, V] (rows summing to about 1) by uniforms u [B] in
    [0, 1): the token whose interval of the row's cumulative sum, in float64, holds u times
    the row's total; zero-probability tokens have empty intervals. One uniform per row,
    where `torch.multinomial` spends about 1 ms on each 49,152-token row on the CPU
    (benchmarks/README.md, "one uniform per draw")."""
    cdf = probs.to(torch.float64).cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1)  # u·total rounding up to the total


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits [B, V])[b, tokens[b]] in fp32: [B]."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)


def _finish(tokens: list[int], logprobs: list[float], tokenizer, stops: list[str], finished: bool) -> Completion:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in stops:
        if stop in text:
            text, finished = text[: text.index(stop)], True
    return Completion(tokens, text, finished, logprobs)


def _check(
    tokens: list[int], logprobs: list[float], tokenizer, eos_ids: set[int], stops: list[str], sampling: Sampling
) -> Completion | None:
    """The completion of a running sequence if it is done after its latest token, else None.

    Done: the latest token is an EOS, a stop string appears in the text of the last 8
    tokens (a stop string completed by the latest token lies there), or the token limit
    is reached. Every backend uses this rule, so they stop at the same token.
    """
    stopped = tokens[-1] in eos_ids or any(s in tokenizer.decode(tokens[-8:]) for s in stops)
    if stopped or len(tokens) >= sampling.max_new_tokens:
        return _finish(tokens, logprobs, tokenizer, stops, stopped)
    return None


@dataclass
class Phases:
    """Wall time and tokens of the prefill and the decode calls of a generation, summed.

    prefill_tokens counts prompt tokens run through the model (padding excluded),
    decode_tokens the tokens that decode steps produced. Benchmarks pass one to a backend
    to split its time; the stages do not.
    """

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0


@contextlib.contextmanager
def timed(phases: Phases | None, phase: str, tokens: int) -> Iterator[None]:
    """Add the block's wall time and `tokens` to `phases` ("prefill" or "decode"), if given."""
    start = time.perf_counter()
    yield
    if phases is not None:
        setattr(phases, f"{phase}_s", getattr(phases, f"{phase}_s") + time.perf_counter() - start)
        setattr(phases, f"{phase}_tokens", getattr(phases, f"{phase}_tokens") + tokens)


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The running rows: their KV cache, attention mask, next positions and tokens."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor = None  # type: ignore[assignment]  # [B, L], set by the first `add`
        self.rows: list[int] = []  # prompt index of each row
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []  # T=1 log-prob of each generated token
        self.next_pos: torch.Tensor = None  # type: ignore[assignment]  # [B], set by the first `add`

    def add(self, cache, mask: torch.Tensor, rows: list[int], first: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Merge freshly prefilled rows (with their first tokens) into the batch."""
        pos = mask.sum(-1)
        if self.cache is None:
            self.cache, self.mask, self.next_pos = cache, mask, pos
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            old_pad, new_pad = width - self.mask.shape[1], width - mask.shape[1]
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, old_pad, 2), _left_pad(new.keys, new_pad, 2)])
                old.values = torch.cat([_left_pad(old.values, old_pad, 2), _left_pad(new.values, new_pad, 2)])
            self.mask = torch.cat([_left_pad(self.mask, old_pad, 1), _left_pad(mask, new_pad, 1)])
            self.next_pos = torch.cat([self.next_pos, pos])
        self.rows += rows
        self.tokens += [[t] for t in first[0].tolist()]
        self.logprobs += [[lp] for lp in first[1].tolist()]

    def append(self, picked: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Each running row's next token and its log-prob."""
        for tokens, logprobs, t, lp in zip(self.tokens, self.logprobs, *(x.tolist() for x in picked)):
            tokens.append(t)
            logprobs.append(lp)

    def keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.rows = [self.rows[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self.logprobs = [self.logprobs[i] for i in keep]
        dead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if dead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, dead:], layer.values[:, :, dead:]
            self.mask = self.mask[:, dead:]


def _decode_step(model, batch: _Batch, sampling: Sampling, gen: torch.Generator) -> None:
    """One token for every running row: a forward over their last tokens, appended to their cache."""
    last = torch.tensor([t[-1] for t in batch.tokens], device=model.device)[:, None]
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
    logits = model(
        input_ids=last,
        attention_mask=batch.mask,
        position_ids=batch.next_pos[:, None],
        cache=batch.cache,
        use_cache=True,
    ).logits[:, -1]
    batch.next_pos = batch.next_pos + 1
    batch.append(_pick(logits, sampling, gen))


def _continuous(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int,
    stops: list[str],
    progress: Progress,
    phases: Phases | None = None,
) -> list[Completion]:
    from transformers import DynamicCache

    eos_ids, pad_id, device = _eos_ids(model, tokenizer), tokenizer.pad_token_id, model.device
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
    queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    batch = _Batch()
    while queue or batch.rows:
        if len(batch.rows) < batch_size and queue:  # refill free slots
            admit, queue = queue[: batch_size - len(batch.rows)], queue[batch_size - len(batch.rows) :]
            with timed(phases, "prefill", sum(len(prompts[i]) for i in admit)):
                ids, mask = pad_left([prompts[i] for i in admit], pad_id, device)
                cache = DynamicCache()
                logits = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                batch.add(cache, mask, admit, _pick(logits, sampling, gen))
        else:  # one decoding step for every running row
            with timed(phases, "decode", len(batch.rows)):
                _decode_step(model, batch, sampling, gen)
        keep = []
        for row, (tokens, logprobs) in enumerate(zip(batch.tokens, batch.logprobs)):
            if (done := _check(tokens, logprobs, tokenizer, eos_ids, stops, sampling)) is not None:
                out[batch.rows[row]] = done
                progress.update(1, tokens=len(tokens))
            else:
                keep.append(row)
        if len(keep) < len(batch.rows):
            if keep:
                batch.keep(keep)
            else:
                batch = _Batch()
    return out  # type: ignore[return-value]


def _plain(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int,
    stops: list[str],
    progress: Progress,
    phases: Phases | None = None,
) -> list[Completion]:
    """`model.generate` in length-sorted batches (the fallback, and the reference path).
    `model.generate` does not split its time: `phases` is left as it is."""
    eos_ids, pad_id = _eos_ids(model, tokenizer), tokenizer.pad_token_id
    knobs = (
        {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        if sampling.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    for b, first in enumerate(range(0, len(order), batch_size)):
        idx = order[first : first + batch_size]
        ids, mask = pad_left([prompts[i] for i in idx], pad_id, model.device)
        if sampling.do_sample:
            torch.manual_seed(sampling.seed * 100_003 + b)
        res = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=list(eos_ids),
            stop_strings=stops or None,
            tokenizer=tokenizer if stops else None,
            output_logits=True,
            return_dict_in_generate=True,
            **knobs,
        )
        new = res.sequences[:, ids.shape[1] :]
        logps = torch.stack([_token_logprobs(step, new[:, k]) for k, step in enumerate(res.logits)], dim=1)
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            cut = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
            tokens = tokens[: cut + 1] if cut is not None else tokens
            out[i] = _finish(tokens, logps[row, : len(tokens)].tolist(), tokenizer, stops, cut is not None)
            progress.update(1, tokens=len(tokens))
    return out  # type: ignore[return-value]


def supports_continuous(model) -> bool:
    """Continuous batching needs a plain full-attention KV cache in every layer."""
    layer_types = getattr(model.config, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


class Backend(Protocol):
    """A generation backend: completions of `prompts` (token ids), in input order.

    `batch_size` is the number of sequences decoded together, `bf16` asks for bf16
    matmuls, `phases` (optional) collects the prefill/decode split of the wall time.
    """

    def __call__(
        self,
        model,
        tokenizer,
        prompts: list[list[int]],
        sampling: Sampling,
        batch_size: int = 16,
        stop_strings: list[str] | None = None,
        bf16: bool = False,
        desc: str = "generate",
        phases: Phases | None = None,
    ) -> list[Completion]: ...


@torch.inference_mode()
def hf_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int = 16,
    stop_strings: list[str] | None = None,
    bf16: bool = False,
    desc: str = "generate",
    phases: Phases | None = None,
    continuous: bool | None = None,
) -> list[Completion]:
    """The "hf" backend: continuous batching over HF forwards (or `model.generate` in
    sorted batches when `continuous` is False or the model's cache is not plain)."""
    progress = Progress(desc, len(prompts), "sequences")
    use_continuous = supports_continuous(model) if continuous is None else continuous
    run = _continuous if use_continuous else _plain
    with inference_autocast(model, bf16):
        out = (
            run(model, tokenizer, prompts, sampling, batch_size, list(stop_strings or []), progress, phases)
            if prompts
            else []
        )
    progress.close()
    return out


def get_backend(name: str) -> Backend:
    """The backend called `name`: "hf" (the reference), "fast" (`unisd.fast_decode`,
    which itself falls back to "hf" for models it cannot run) or "vllm"
    (`unisd.vllm_backend`: one error line where vLLM or a GPU is missing)."""
    if name == "hf":
        return hf_generate
    if name == "fast":
        from unisd.fast_decode import fast_generate

        return fast_generate
    if name == "vllm":
        from unisd.vllm_backend import vllm_generate

        return vllm_generate
    raise ValueError(f"unknown generation backend {name!r}: expected 'hf', 'fast' or 'vllm'")


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int = 16,
    stop_strings: list[str] | None = None,
    bf16: bool = False,
    desc: str = "generate",
    continuous: bool | None = None,
    backend: str = "hf",
    phases: Phases | None = None,
) -> list[Completion]:
    """Completions of `prompts` (token ids), in input order, by the named backend.
    `continuous` (True/False: force the HF path's mode) applies to the "hf" backend only."""
    if backend == "hf":
        return hf_generate(
            model, tokenizer, prompts, sampling, batch_size, stop_strings, bf16, desc, phases, continuous
        )
    if continuous is not None:
        raise ValueError(f"continuous={continuous} applies to the 'hf' backend only, not {backend!r}")
    return get_backend(backend)(model, tokenizer, prompts, sampling, batch_size, stop_strings, bf16, desc, phases)
