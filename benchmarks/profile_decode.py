"""Where one decode step's time goes: the HF path against the fast path, batch 32 and 128.

Each path decodes from a prepared state: every row has `--context` cached positions
(random keys and values, of the dtypes the path's own prefill stores) and generates one
token, greedy, in bf16 (the stages' setting: for HF, `inference_autocast` with the
weights cast once; for fast, its bf16 weights). `--fp32`: the evaluation's setting
instead, fp32 throughout at batch 16 (`eval.batch_size`). The step is the path's own decode step
(`unisd.generation._decode_step`, `unisd.fast_decode._Decoder.step`) followed by the
per-row stop checks of its loop (`_check`, with the prompt builder's stop strings).

Timing: the median wall time of `--steps` unprofiled steps after a warm-up step; then the
same steps under `torch.profiler` (CPU). Functions wrapped in a `record_function`
while profiling (cache update, attention mask, RoPE, norms, sampling, stop checks) are
charged their whole time, their Python included; every other top-level op, aten or mkldnn
(one not called by another op), is charged by its name to matmuls (linear/mm/addmm/bmm and
the fast path's packed `_linear_pointwise`), attention
(SDPA; the fast path's compiled kernel, `unisd.decode_attention`, is a scope), cache
write (index_put_), casts (to/_to_copy) or other ops. "Python and dispatch" is the rest of the profiled step's wall time: the interpreter, HF's module
calls and argument handling, the layer loops, and op dispatch outside kernels. The profiler itself slows
small ops, so the shares are the point; the unprofiled row is the speed.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator

import _common as C

FULL = {"batches": [32, 128], "context": 256, "steps": 5}
FP32 = {"batches": [16], "context": 256, "steps": 5}  # the evaluation's greedy answers
QUICK = {"batches": [4], "context": 16, "steps": 2}
OP_PREFIXES = ("aten::", "mkldnn::")  # the fast backend's packed bf16 products are mkldnn ops
OPS = {
    "matmuls": ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::scaled_dot_product_attention",),
    "cache write": ("aten::index_put_",),
    "casts": ("aten::to", "aten::_to_copy"),
}
CATEGORIES = [
    "matmuls",
    "attention",
    "cache update (HF: cat)",
    "cache write",
    "attention mask",
    "RoPE",
    "norms",
    "casts",
    "sampling",
    "stop checks",
    "other ops",
    "Python and dispatch",
]


@contextlib.contextmanager
def scopes(targets: list[tuple[object, str, str]]) -> Iterator[None]:
    """Wrap each `owner.attr` in a `record_function("scope:NAME")` while in the block."""
    from torch.profiler import record_function

    def wrap(fn: Callable, name: str) -> Callable:
        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with record_function(f"scope:{name}"):
                return fn(*args, **kwargs)

        return scoped

    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in targets]
    for (owner, attr, name), (_, _, fn) in zip(targets, saved):
        setattr(owner, attr, wrap(fn, name))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def charge(events) -> tuple[dict[str, float], int]:
    """Milliseconds per category among profiler `events`, and the number of top-level ops.

    An outermost scope is charged its whole time (its ops and its Python); an op (aten or
    mkldnn) in no scope and called by no other op is charged by its name.
    """
    out = dict.fromkeys(CATEGORIES, 0.0)
    count = 0
    for e in events:
        is_scope, is_op = e.name.startswith("scope:"), e.name.startswith(OP_PREFIXES)
        ancestors = []
        parent = e.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        in_op, in_scope = (any(a.startswith(p) for a in ancestors) for p in (OP_PREFIXES, "scope:"))
        count += is_op and not in_op
        if (is_scope and not in_scope) or (is_op and not in_op and not in_scope):
            name = e.name[6:] if is_scope else next((cat for cat, ops in OPS.items() if e.name in ops), "other ops")
            out[name] += e.cpu_time_total / 1e3
    return out, count


def hf_step(model, tok, builder, batch: int, context: int):
    """A decode step of the HF path from `batch` rows of `context` random cached positions."""
    import torch
    import transformers.cache_utils as cu
    import transformers.models.llama.modeling_llama as ml
    from transformers import DynamicCache

    import unisd.generation as g
    from unisd.generation import Sampling, _Batch, _decode_step, _eos_ids

    probe = DynamicCache()  # the dtypes HF's own prefill stores (under autocast: fp32 keys, bf16 values)
    model(input_ids=torch.tensor([[1, 2]]), cache=probe, use_cache=True)
    cache = DynamicCache()
    for i, layer in enumerate(probe.layers):
        shape = (batch, layer.keys.shape[1], context, layer.keys.shape[3])
        cache.update(torch.randn(shape).to(layer.keys.dtype), torch.randn(shape).to(layer.values.dtype), i)
    state = _Batch()
    state.add(
        cache,
        torch.ones(batch, context, dtype=torch.long),
        list(range(batch)),
        (torch.randint(3, len(tok), (batch,)), torch.zeros(batch)),
    )
    sampling, gen, eos, stops = (
        Sampling(10**6),
        torch.Generator().manual_seed(0),
        _eos_ids(model, tok),
        builder.stop_strings,
    )

    def step():
        _decode_step(model, state, sampling, gen)
        for tokens, logprobs in zip(state.tokens, state.logprobs):
            g._check(tokens, logprobs, tok, eos, stops, sampling)

    targets = [
        (cu.DynamicLayer, "update", "cache update (HF: cat)"),
        (ml, "create_causal_mask", "attention mask"),
        (ml, "apply_rotary_pos_emb", "RoPE"),
        (ml.LlamaRotaryEmbedding, "forward", "RoPE"),
        (ml.LlamaRMSNorm, "forward", "norms"),
        (g, "_pick", "sampling"),
        (g, "_check", "stop checks"),
    ]
    return step, targets


def fast_step(model, tok, builder, batch: int, context: int, bf16: bool = True):
    """A decode step of the fast path from `batch` slots of `context` random cached positions."""
    import torch

    import unisd.fast_decode as fd
    import unisd.generation as g

    sampling = g.Sampling(10**6)
    decoder = fd._Decoder(fd._Llama(model, torch.bfloat16 if bf16 else None), batch, context + 64, sampling)
    decoder.cache.keys.normal_()
    decoder.cache.values.normal_()
    decoder.cache.lens[:] = context
    decoder.rows, decoder.tokens = list(range(batch)), [[int(t)] for t in torch.randint(3, len(tok), (batch,))]
    decoder.logprobs = [[0.0] for _ in range(batch)]
    eos, stops = g._eos_ids(model, tok), builder.stop_strings

    def step():
        decoder.step()
        for tokens, logprobs in zip(decoder.tokens, decoder.logprobs):
            fd._check(tokens, logprobs, tok, eos, stops, sampling)
        decoder.cache.lens[:] = context  # every step decodes at the same length

    targets = [
        (fd, "_rope", "RoPE"),
        (fd._Llama, "_norm", "norms"),
        (fd._Decoder, "_bucket_masks", "attention mask"),
        (fd, "_pick", "sampling"),
        (fd, "_check", "stop checks"),
    ]
    if decoder.kernel is not None:
        targets.append((decoder, "kernel", "attention"))
    return step, targets


def measure(step, targets, steps: int) -> dict:
    """Unprofiled median step time, then per-category profiled milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    with scopes(targets), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        profiled = (time.perf_counter() - start) / steps * 1e3
    ms, count = charge(prof.events())
    ms = {k: v / steps for k, v in ms.items()}
    ms["Python and dispatch"] = profiled - sum(ms.values())
    return {"wall_ms": 1e3 * statistics.median(walls), "profiled_ms": profiled, "ms": ms, "ops": count / steps}


def main() -> None:
    import torch

    from unisd.modeling import inference_autocast

    p = C.parser(__doc__)
    p.add_argument("--fp32", action="store_true", help="the evaluation's setting: fp32, batch 16")
    args = C.parse(p)
    cfg = QUICK if args.quick else FP32 if args.fp32 else FULL
    bf16, steps = not args.fp32, args.reps or cfg["steps"]
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=4096)
    results = {}
    with torch.inference_mode(), inference_autocast(model, bf16):
        for batch in cfg["batches"]:
            hf = measure(*hf_step(model, tok, builder, batch, cfg["context"]), steps)
            fast = measure(*fast_step(model, tok, builder, batch, cfg["context"], bf16), steps)
            results |= {f"hf, batch {batch}": hf, f"fast, batch {batch}": fast}
    names = list(results)
    rows = [
        [cat]
        + [
            f"{results[n]['ms'][cat]:.1f} ({100 * results[n]['ms'][cat] / results[n]['profiled_ms']:.0f}%)"
            for n in names
        ]
        for cat in CATEGORIES
    ]
    rows += [
        ["step, profiled"] + [f"{results[n]['profiled_ms']:.1f}" for n in names],
        ["top-level ops per step"] + [f"{results[n]['ops']:.0f}" for n in names],
        ["**step, not profiled**"] + [f"{results[n]['wall_ms']:.1f}" for n in names],
        ["tokens/s, not profiled"] + [f"{1e3 * int(n.split()[-1]) / results[n]['wall_ms']:.0f}" for n in names],
    ]
    C.report(
        f"One decode step, {'bf16' if bf16 else 'fp32'} (ms per step, share of the profiled step)",
        ["", *names],
        rows,
        {"config": cfg | {"steps": steps}, "results": results},
        args.json,
        [
            f"context {cfg['context']} cached positions per row; median of {steps} steps; "
            f"{torch.get_num_threads()} threads; model {C.model_dir(args.quick).name}."
        ],
    )


if __name__ == "__main__":
    main()
