"""The "fast" generation backend: decoding for llama-architecture models with its own
forward over the model's weights.

Why: at 135M parameters a decode step is a few hundred small ops, and HF's forward adds
per-step work of its own on top: a 4D attention mask rebuilt from the [B, L] mask, a
DynamicCache that grows by concatenation (every step copies the whole cache), and the
merge of a refill's cache into the running one (left-padded, copied again). Here:

* Weights. q/k/v fused into one [(H + 2·KV)·D, hidden] matrix and gate/up into one
  [2·I, hidden] matrix, built once per call; with bf16 they, o/down and the LM head are
  the one bf16 copy (the model itself is not touched). Embedding and norms stay as they are.
  On the CPU the matrices are then packed once into oneDNN's layout (`_pack`, what
  inductor's weight freezing does): at a decode step's few rows `F.linear` costs more than
  the arithmetic — a bf16 weight is re-laid out at every call, and fp32 goes to a GEMM
  slow at few rows (the LM head at 16 rows: bf16 2.8× faster packed, the same bits; fp32
  4.6×, other roundings of the sums: benchmarks/README.md).
* KV cache. Keys and values [layers, slots, KV, max_len, D], allocated once per call for
  the workload (slots = batch size, max_len = longest prompt + max_new_tokens). A
  sequence lives in one slot from position 0; prefill writes its prompt's keys, a decode
  step writes one position per slot in place.
* Attention. In a decode step the G = H / KV query heads sharing a KV head become G query
  rows of that head ([n, KV, G, D] against [n, KV, T, D]), so grouped-query attention
  repeats no keys, and each slot attends over its own length. On the CPU (bf16 or fp32)
  that is the compiled kernel of `unisd.decode_attention` (each slot's keys and values
  read once); otherwise `scaled_dot_product_attention` with a per-slot length mask, the
  running slots in buckets of neighbouring slots, each over its own longest prefix rather
  than the batch's (`_buckets`: admission is longest-first, so slots lie roughly in descending
  length, and a bucket of short sequences reads no long spans). Prefill uses SDPA.
* Continuous batching. Running sequences occupy slots 0..n-1. Free slots are refilled
  from the queue (longest prompts first, as in the HF path), several prompts per prefill
  up to `PREFILL_TOKENS` padded tokens; a finished sequence's slot is taken by the last
  running one, so a decode step runs over exactly the running rows.
* Prefill. Prompts right-padded to the longest admitted one, at positions 0..T-1, with
  causal attention over their own keys: padding only writes keys past a row's end, which
  the length mask hides and decoding overwrites.

Stopping, sampling and `Completion` are the HF path's (`unisd.generation`): on the same
fp32 model greedy decoding gives the HF path's tokens (tested here, and on the published
evaluation's answers by tests/test_eval_determinism.py; measured on the validation answers
of two models: docs/lineage.md). With bf16 the numerics follow HF under autocast: the
residual stream, norms and logits' softmax stay in the model's dtype, matmuls, RoPE,
attention and the cache are bf16.

Models it cannot run (`unsupported`) go to the HF path, with a log line.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from unisd import decode_attention
from unisd.generation import Completion, Phases, Sampling, _check, _eos_ids, _pick, hf_generate, timed
from unisd.progress import Progress

log = logging.getLogger(__name__)

# RoPE types whose frequencies are fixed when the model loads; "dynamic" and "longrope"
# change them with the sequence length, so a batch's positions would not be independent.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward: large GEMMs, bounded activations
# Decode attention buckets (`_buckets`): boundaries every BUCKET_ROWS slots, and the cost of
# one more attention call, in slot-positions read (one call of a layer ~ 700 positions of one
# slot's keys and values at 135M, 2-core CPU: benchmarks/README.md, "Decode attention buckets").
BUCKET_ROWS = 8
CALL_COST = 700
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def unsupported(model) -> str | None:
    """Why the fast path cannot run `model` (a sentence), or None when it can."""
    config: Any = getattr(model, "config", None)
    if hasattr(model, "peft_config"):
        return "the model is peft-wrapped: merge its adapter first (merge_and_unload)"
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not a llama"
    if config.attention_bias or config.mlp_bias or config.hidden_act != "silu":
        return "biased projections or an activation other than SiLU"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE:
        return f"RoPE type {rope_type!r} changes its frequencies with the length (supported: {STATIC_ROPE})"
    plain = all(
        type(layer.get_submodule(name)) is torch.nn.Linear for layer in model.model.layers for name in PROJECTIONS
    )
    return None if plain else "projections that are not plain nn.Linear (adapters, quantisation): merge them first"


@dataclass
class _Layer:
    """One decoder layer's weights, in the layout of `_Llama.layers_forward`."""

    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2·KV)·D, hidden]: q, k, v stacked
    o: torch.Tensor  # [hidden, H·D]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2·I, hidden]: gate, up stacked
    down: torch.Tensor  # [hidden, I]

    @classmethod
    def of(cls, layer, cast: Callable[[torch.Tensor], torch.Tensor]) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm.weight,
            torch.cat([cast(attn.q_proj.weight), cast(attn.k_proj.weight), cast(attn.v_proj.weight)]),
            cast(attn.o_proj.weight),
            layer.post_attention_layernorm.weight,
            torch.cat([cast(mlp.gate_proj.weight), cast(mlp.up_proj.weight)]),
            cast(mlp.down_proj.weight),
        )

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> _Layer:
        """The same layer with `f` applied to its four matrices."""
        return dataclasses.replace(self, qkv=f(self.qkv), o=f(self.o), gate_up=f(self.gate_up), down=f(self.down))


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PACK_ROWS = 128  # the row count oneDNN's packed layout is chosen for (any count runs on it)


def _onednn(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's products in `dtype` (for `_pack`)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _pack(w: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] (bf16 or fp32) in oneDNN's packed layout, for `_packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)


def _packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ wᵀ for a `_pack`ed w: in bf16 `F.linear`'s very bits, in fp32 the same
    sums in another order (relative differences ~1e-6)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class _Llama:
    """A llama model's forward over its own weights, fused for decoding.

    `dtype` (e.g. bf16) is the matmuls' dtype, None for the model's own. Activations
    flow as [b, t, hidden] in the embedding's dtype (the residual stream).
    """

    def __init__(self, model, dtype: torch.dtype | None) -> None:
        config, base = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps, self.device = config.rms_norm_eps, model.device
        cast = (lambda w: w.to(dtype)) if dtype is not None else (lambda w: w)
        self.embed, self.norm = base.embed_tokens.weight, base.norm.weight
        self.layers = [_Layer.of(layer, cast) for layer in base.layers]
        self.lm_head = cast(model.lm_head.weight)
        self.dtype = self.lm_head.dtype
        self.rotary = base.rotary_emb
        self.linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
        if self.device.type == "cpu" and _onednn(self.dtype):
            self.layers = [layer.map(_pack) for layer in self.layers]
            self.lm_head, self.linear = _pack(self.lm_head), _packed_linear

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] of positions 0..length-1, by the model's own rotary
        embedding (its frequencies and scaling come from the config's rope_parameters)."""
        positions = torch.arange(length, device=self.device)[None]
        cos, sin = self.rotary(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        return cos[0], sin[0]

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in the residual dtype, cast to the matmul dtype (as autocast does)."""
        return F.rms_norm(h, (h.shape[-1],), weight, self.eps).to(self.dtype)

    def layers_forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Hidden states [b, t, hidden] of token ids [b, t] after every layer (before the final norm).

        cos, sin broadcast to [b, t, 1, D]. `attend(layer, q [b, t, H, D], k, v [b, t, KV, D])`
        stores k, v where it keeps them and returns the attention output [b, t, H·D].
        """
        b, t = ids.shape
        h = F.embedding(ids, self.embed)
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            qkv = self.linear(self._norm(h, layer.attn_norm), layer.qkv).view(b, t, H + 2 * KV, D)
            qk = _rope(qkv[:, :, : H + KV], cos, sin)
            h = h + self.linear(attend(i, qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]), layer.o)
            gate, up = self.linear(self._norm(h, layer.mlp_norm), layer.gate_up).chunk(2, dim=-1)
            h = h + self.linear(F.silu(gate) * up, layer.down)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits [b, V] (fp32) of last hidden states [b, hidden]."""
        return self.linear(self._norm(h, self.norm), self.lm_head).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, t, heads, D] rotated by position: HF's x·cos + rotate_half(x)·sin, so the
    same numbers in fp32."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class KVCache:
    """Keys and values [layers, slots, KV, max_len, D] of the running sequences, allocated
    once; `lens` [slots] is how many positions of each slot hold a sequence's keys."""

    def __init__(self, llama: _Llama, slots: int, max_len: int) -> None:
        shape = (len(llama.layers), slots, llama.kv_heads, max_len, llama.head_dim)
        self.keys = torch.zeros(shape, dtype=llama.dtype, device=llama.device)
        self.values = torch.zeros_like(self.keys)
        self.lens = torch.zeros(slots, dtype=torch.long, device=llama.device)

    def move(self, dst: list[int], src: list[int]) -> None:
        """Slots `src` take the places of slots `dst` (their keys' valid prefix and lengths)."""
        dst_t, src_t = (torch.tensor(s, device=self.lens.device) for s in (dst, src))
        valid = int(self.lens[src_t].max())
        for kv in (self.keys, self.values):
            kv[:, dst_t, :, :valid] = kv[:, src_t, :, :valid]
        self.lens[dst_t] = self.lens[src_t]


class _Decoder:
    """Continuous batching over a `KVCache`: the running sequences are slots 0..n-1,
    with their prompt indices (`rows`) and generated tokens (`tokens`)."""

    def __init__(self, llama: _Llama, slots: int, max_len: int, sampling: Sampling) -> None:
        self.llama, self.sampling = llama, sampling
        self.cache = KVCache(llama, slots, max_len)
        self.cos, self.sin = llama.rope_tables(max_len)
        self.last = torch.zeros(slots, dtype=torch.long, device=llama.device)  # each slot's latest token
        self.gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        on_cpu = llama.dtype in (torch.bfloat16, torch.float32) and llama.device.type == "cpu"
        self.kernel = decode_attention.kernel() if on_cpu else None  # None: SDPA in length buckets
        self.rows: list[int] = []
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []  # T=1 log-prob of each generated token

    def _take(self, first: int, picked: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Record the tokens [n] picked for slots first..first+n-1, and their log-probs [n]."""
        self.last[first : first + len(picked[0])] = picked[0]
        for tokens, logprobs, t, lp in zip(self.tokens[first:], self.logprobs[first:], *(x.tolist() for x in picked)):
            tokens.append(t)
            logprobs.append(lp)

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Admit `prompts` (prompt indices `rows`) into the next free slots: their keys and first tokens."""
        first, b, t = len(self.rows), len(prompts), max(map(len, prompts))
        ids = torch.zeros((b, t), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        lens = torch.tensor([len(p) for p in prompts], device=self.llama.device)
        slots = slice(first, first + b)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, KV, t, D]
            self.cache.keys[layer, slots, :, :t] = k
            self.cache.values[layer, slots, :, :t] = v
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).reshape(b, t, -1)

        h = self.llama.layers_forward(
            ids.to(self.llama.device), self.cos[None, :t, None], self.sin[None, :t, None], attend
        )
        self.cache.lens[slots] = lens
        self.rows += rows
        self.tokens += [[] for _ in rows]
        self.logprobs += [[] for _ in rows]
        last = h[torch.arange(b, device=h.device), lens - 1]  # each prompt's last position
        self._take(first, _pick(self.llama.logits(last), self.sampling, self.gen))

    def _bucket_masks(self, lens: torch.Tensor) -> list[tuple[slice, int, torch.Tensor]]:
        """For SDPA over the running slots in a decode step, given their valid lengths `lens`
        [n]: each bucket's slots, key span (its longest valid prefix) and length mask
        [rows, 1, 1, span]."""
        spans = lens.tolist()
        buckets = []
        for a, b in _buckets(spans):
            span = max(spans[a:b])
            mask = (torch.arange(span, device=lens.device) < lens[a:b, None])[:, None, None]
            buckets.append((slice(a, b), span, mask))
        return buckets

    def step(self) -> None:
        """One decode step: every running slot's latest token goes in, its next token comes out."""
        n, llama, kernel = len(self.rows), self.llama, self.kernel
        G = llama.heads // llama.kv_heads
        pos = self.cache.lens[:n]  # where each slot's latest token goes
        new = (
            torch.arange(n, device=pos.device)[:, None],
            torch.arange(llama.kv_heads, device=pos.device),
            pos[:, None],
        )
        lens = pos + 1  # each slot's valid positions once this step's key is in
        buckets = self._bucket_masks(lens) if kernel is None else []

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            keys.index_put_(new, k[:, 0])
            values.index_put_(new, v[:, 0])
            q = q.view(n, llama.kv_heads, G, -1)
            if kernel is not None:
                return kernel(q, keys, values, lens, llama.head_dim**-0.5).view(n, 1, -1)
            out = [
                F.scaled_dot_product_attention(q[rows], keys[rows, :, :span], values[rows, :, :span], attn_mask=mask)
                for rows, span, mask in buckets
            ]
            return (out[0] if len(out) == 1 else torch.cat(out)).view(n, 1, -1)

        h = llama.layers_forward(
            self.last[:n, None], self.cos[pos][:, None, None], self.sin[pos][:, None, None], attend
        )
        self.cache.lens[:n] += 1
        self._take(0, _pick(llama.logits(h[:, -1]), self.sampling, self.gen))

    def drop(self, finished: list[int]) -> None:
        """Free the `finished` slots (ascending); the last running slots move into the holes."""
        n, done = len(self.rows) - len(finished), set(finished)
        holes = [s for s in finished if s < n]
        movers = [s for s in range(n, len(self.rows)) if s not in done]
        if holes:
            self.cache.move(holes, movers)
            self.last[holes] = self.last[movers]
            for hole, mover in zip(holes, movers):
                self.rows[hole], self.tokens[hole] = self.rows[mover], self.tokens[mover]
                self.logprobs[hole] = self.logprobs[mover]
        del self.rows[n:], self.tokens[n:], self.logprobs[n:]


def _buckets(spans: list[int], rows: int = BUCKET_ROWS, call: int = CALL_COST) -> list[tuple[int, int]]:
    """Slot ranges [a, b) that cover 0..n-1 at multiples of `rows`, chosen to minimise the
    positions read, Σ (b - a) · max(spans[a:b]), plus `call` per range (exact, by dynamic
    programming over the n / rows boundaries)."""
    n = len(spans)
    cuts = [*range(0, n, rows), n]
    best = [0.0] + [float("inf")] * (len(cuts) - 1)  # best[j]: cheapest cover of slots 0..cuts[j]
    back = [0] * len(cuts)
    for j in range(1, len(cuts)):
        longest = 0
        for i in range(j - 1, -1, -1):  # the last range is cuts[i]..cuts[j]
            longest = max(longest, *spans[cuts[i] : cuts[i + 1]])
            cost = best[i] + (cuts[j] - cuts[i]) * longest + call
            if cost < best[j]:
                best[j], back[j] = cost, i
    out, j = [], len(cuts) - 1
    while j:
        out.append((cuts[back[j]], cuts[j]))
        j = back[j]
    return out[::-1]


def _admit(queue: list[int], prompts: list[list[int]], free: int) -> int:
    """How many prompts from the head of the (longest-first) queue one prefill takes: at
    most `free`, and at most `PREFILL_TOKENS` padded tokens (but at least one)."""
    return max(1, min(free, len(queue), PREFILL_TOKENS // len(prompts[queue[0]])))


def _run(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int,
    stops: list[str],
    bf16: bool,
    progress: Progress,
    phases: Phases | None,
) -> list[Completion]:
    eos_ids = _eos_ids(model, tokenizer)
    slots = min(batch_size, len(prompts))
    decoder = _Decoder(
        _Llama(model, torch.bfloat16 if bf16 else None),
        slots,
        max(map(len, prompts)) + sampling.max_new_tokens,
        sampling,
    )
    queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    while queue or decoder.rows:
        if len(decoder.rows) < slots and queue:
            k = _admit(queue, prompts, slots - len(decoder.rows))
            admit, queue = queue[:k], queue[k:]
            with timed(phases, "prefill", sum(len(prompts[i]) for i in admit)):
                decoder.prefill(admit, [prompts[i] for i in admit])
        else:
            with timed(phases, "decode", len(decoder.rows)):
                decoder.step()
        finished = []
        for slot, (tokens, logprobs) in enumerate(zip(decoder.tokens, decoder.logprobs)):
            if (done := _check(tokens, logprobs, tokenizer, eos_ids, stops, sampling)) is not None:
                out[decoder.rows[slot]] = done
                progress.update(1, tokens=len(tokens))
                finished.append(slot)
        if finished:
            decoder.drop(finished)
    return out  # type: ignore[return-value]


@torch.inference_mode()
def fast_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int = 16,
    stop_strings: list[str] | None = None,
    bf16: bool = False,
    desc: str = "generate",
    phases: Phases | None = None,
) -> list[Completion]:
    """The "fast" backend (`unisd.generation.Backend`); models it cannot run go to `hf_generate`."""
    if (reason := unsupported(model)) is not None:
        log.info("fast decoding is not available (%s): using the HF path", reason)
        return hf_generate(model, tokenizer, prompts, sampling, batch_size, stop_strings, bf16, desc, phases)
    progress = Progress(desc, len(prompts), "sequences")
    out = (
        _run(model, tokenizer, prompts, sampling, batch_size, list(stop_strings or []), bf16, progress, phases)
        if prompts
        else []
    )
    progress.close()
    return out
