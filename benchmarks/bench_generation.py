"""Generation throughput: the fast backend, the HF backend (continuous batching) and
`model.generate`, greedy, on two workloads.

mixed:  32 prompts, a seeded shuffle of short MCQ prompts (SciQ) and long code prompts
        (MBPP, HumanEval) from the embedded test splits, rendered with the model's chat
        template by `unisd.prompts`; 128 new tokens at most, stopping at EOS. Such a mix
        is where plain batching wastes most: a batch runs until its longest member stops,
        and its short prompts are left-padded to its longest prompt.
decode: 128 prompts of the same kind, every one decoding exactly 256 tokens (EOS is not
        a stop here, so the work does not depend on where the model stops): dominated by
        decode steps. Each path runs once (minutes for the HF path).

fast:           `unisd.generation.generate(..., backend="fast")` (`unisd.fast_decode`):
                its own forward over the model's weights, a KV cache preallocated for the
                workload, continuous batching over `batch` slots. In bf16 it uses one bf16
                copy of the weights and decode attention by the compiled kernel of
                `unisd.decode_attention` ("sdpa": by SDPA in length buckets instead).
hf:             the "hf" backend, today's default: continuous batching over HF forwards
                with a DynamicCache, `batch_size` rows. In bf16 its linear weights are cast
                once per call (`unisd.modeling.inference_autocast`).
hf, per-call casts: the same under a plain `torch.autocast`, which under inference mode
                casts every weight again at every forward (the path before the one-time
                cast); it must give exactly hf-bf16's tokens.
plain (sorted): `generate(..., continuous=False)`: `model.generate` on length-sorted
                batches of `batch_size`, the reference path.
hf default:     what a user writes by default: one `model.generate` call per batch of 32
                prompts in input order, left-padded by the tokenizer, fp32.

bf16 rows run under the stages' default (`bf16_autocast: true`). In fp32 the hf and fast
paths must produce exactly the plain path's tokens (asserted after the tables); the
"same" column counts completions equal to the hf path's of the same precision (other
batchings round bf16 differently, which may flip a near-tie). tokens/s counts each
completion's tokens up to and including its EOS, not padding.

Split: the continuous paths time their prefill forwards (prompt tokens/s) and their
decode steps with sampling (generated tokens/s) separately (`unisd.generation.Phases`);
stop checks and bookkeeping are in neither. Share of peak: model FLOPs, 2·N per token
run through the model (prompt tokens and generated tokens but the last, N the
non-embedding parameters, as in bench_utilisation), over the wall time, as a share of the
matmul peak of the same precision measured in this run (`bench_utilisation.matmul_peak`).
Peak memory: each path once more in a fresh process (`_common.peak_memory`: whole
process, model included); `--no-memory` skips it.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from unittest import mock

import _common as C
import bench_utilisation as U

FULL = {
    "mcq": 16,
    "code": 16,
    "max_new_tokens": 128,
    "batch_size": 16,
    "fast_batch_size": 32,
    "reps": 3,
    "matmul": 4096,
    "matmul_reps": 5,
    "decode": {"mcq": 64, "code": 64, "max_new_tokens": 256, "batch_size": 16, "fast_batch_size": 128},
}
QUICK = {
    "mcq": 4,
    "code": 4,
    "max_new_tokens": 12,
    "batch_size": 4,
    "fast_batch_size": 8,
    "reps": 1,
    "matmul": 512,
    "matmul_reps": 2,
    "decode": {"mcq": 4, "code": 4, "max_new_tokens": 16, "batch_size": 4, "fast_batch_size": 8},
}
HF_BATCH = 32


def variants(workload: str, cfg: dict) -> dict[str, tuple[str | None, bool, int]]:
    """The workload's paths: name → (backend, or None for `model.generate`; bf16; batch size).
    "hf default", "per-call casts" and "sdpa" (the fast backend's decode attention by SDPA in
    length buckets, as before the compiled kernel of `unisd.decode_attention`) are
    special-cased in `run`."""
    if workload == "decode":
        b, f = cfg["decode"]["batch_size"], cfg["decode"]["fast_batch_size"]
        return {
            "hf, bf16": ("hf", True, b),
            "fast, bf16": ("fast", True, b),
            f"fast, bf16, batch {f}": ("fast", True, f),
            f"fast, bf16, batch {f}, sdpa": ("fast", True, f),
        }
    b, f = cfg["batch_size"], cfg["fast_batch_size"]
    return {
        "fast, bf16": ("fast", True, b),
        "fast, bf16, sdpa": ("fast", True, b),
        f"fast, bf16, batch {f}": ("fast", True, f),
        "fast, fp32": ("fast", False, b),
        "hf, bf16": ("hf", True, b),
        "hf, bf16, per-call casts": ("hf", True, b),
        "hf, fp32": ("hf", False, b),
        "plain (sorted), bf16": (None, True, b),
        "plain (sorted), fp32": (None, False, b),
        "hf default, fp32": (None, False, HF_BATCH),
    }


def selected(names: list[str], paths: list[str] | None) -> list[str]:
    """The paths `--paths` keeps, with the hf reference of each kept precision (every ratio
    and token comparison is against it)."""
    if paths is None:
        return names
    kept = [n for n in names if any(p in n for p in paths)]
    refs = {"hf, bf16"} | ({"hf, fp32"} if any("fp32" in n for n in kept) else set())
    return [n for n in names if n in kept or n in refs]


def prompts_of(workload: str, cfg: dict, quick: bool, builder) -> list[list[int]]:
    from unisd.prompts import task_text

    sizes = cfg if workload == "mixed" else cfg["decode"]
    return [builder.encode(task_text(ex)) for ex in C.mixed_examples(sizes["mcq"], sizes["code"], quick)]


@contextlib.contextmanager
def without_eos(model):
    """No token ends a sequence (the decode workload's completions all reach the limit)."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = []
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def run(name: str, workload: str, cfg: dict, model, tok, prompts: list[list[int]]) -> dict:
    """One call of the named path: its completions' tokens and (continuous paths) phases."""
    import torch

    from unisd.generation import Phases, Sampling, generate

    backend, bf16, batch = variants(workload, cfg)[name]
    sizes = cfg if workload == "mixed" else cfg["decode"]
    sampling, phases = Sampling(sizes["max_new_tokens"]), Phases()
    if name == "hf default, fp32":
        return {"ids": hf_default(model, tok, prompts, sampling.max_new_tokens), "phases": None}
    with contextlib.ExitStack() as stack:
        if workload == "decode":
            stack.enter_context(without_eos(model))
        if name.endswith("sdpa"):
            from unisd import decode_attention

            stack.enter_context(mock.patch.object(decode_attention, "kernel", lambda: None))
        if name.endswith("per-call casts"):  # autocast casting at every forward, the weights not cast once
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            bf16 = False
        kwargs = {"backend": backend, "phases": phases} if backend else {"continuous": False}
        out = generate(model, tok, prompts, sampling, batch, bf16=bf16, **kwargs)
    return {"ids": [c.ids for c in out], "phases": asdict(phases) if backend else None}


def hf_default(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One default `model.generate` call per `HF_BATCH` prompts in input order, cut at EOS."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = []
    with torch.inference_mode():
        for first in range(0, len(prompts), HF_BATCH):
            batch = tok.pad({"input_ids": prompts[first : first + HF_BATCH]}, padding=True, return_tensors="pt")
            seqs = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            for row in seqs[:, batch["input_ids"].shape[1] :].tolist():
                cut = next((k for k, t in enumerate(row) if t in eos), None)
                ids.append(row if cut is None else row[: cut + 1])
    return ids


def memory_call(quick: bool, workload: str, name: str):
    """Factory for `_common.peak_memory`: the model and prompts, then one call of `name`."""
    cfg = QUICK if quick else FULL
    model, tok, builder = C.lm(quick, max_prompt_tokens=4096)
    prompts = prompts_of(workload, cfg, quick, builder)
    return lambda: run(name, workload, cfg, model, tok, prompts)


def measure(
    workload: str, names: list[str], cfg: dict, reps: int, quick: bool, memory: bool, model, tok, prompts
) -> dict:
    """Per path: seconds and results of each timed call (interleaved, after a warm-up call
    when reps > 1) and the peak memory of one more call in a fresh process."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    calls = {
        name: (lambda name=name: results[name].append(run(name, workload, cfg, model, tok, prompts))) for name in names
    }
    times = C.interleaved(calls, reps, warmup=1 if reps > 1 else 0)
    peaks = {
        name: C.peak_memory(__file__, "memory_call", quick=quick, workload=workload, name=name)["peak_mb"]
        if memory
        else None
        for name in names
    }
    return {name: {"seconds": times[name], "results": results[name][-reps:], "peak_mb": peaks[name]} for name in names}


def table(measured: dict, n_params: int, peaks: dict[str, float], prompts) -> tuple[list[list], dict[str, int]]:
    """Rows of a workload's table, and how many completions of each path equal the hf
    path's of the same precision."""
    rows, same = [], {}
    prompt_tokens = sum(map(len, prompts))
    speed = {name: [len_sum(r) / t for r, t in zip(m["results"], m["seconds"])] for name, m in measured.items()}
    decode = {name: phase_rates(m, "decode") for name, m in measured.items()}
    for name, m in measured.items():
        ref = measured["hf, bf16" if "bf16" in name else "hf, fp32"]["results"][-1]["ids"]
        same[name] = sum(a == b for a, b in zip(m["results"][-1]["ids"], ref))
        generated = len_sum(m["results"][-1])
        flops = 2 * n_params * (prompt_tokens + generated - len(prompts))  # the last token never goes in
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        rows.append(
            [
                name,
                C.spread(speed[name]),
                C.spread(C.ratios(speed[name], speed["hf, bf16"]), "{:.2f}×"),
                rates(phase_rates(m, "prefill")),
                rates(decode[name]),
                rates(decode[name] and C.ratios(decode[name], decode["hf, bf16"]), "{:.2f}×"),
                C.spread([100 * flops / t / peak for t in m["seconds"]], "{:.1f}%"),
                "—" if m["peak_mb"] is None else f"{m['peak_mb']:.0f}",
                generated,
                f"{same[name]}/{len(prompts)}",
            ]
        )
    return rows, same


def len_sum(result: dict) -> int:
    return sum(map(len, result["ids"]))


def phase_rates(m: dict, phase: str) -> list[float]:
    """tokens/s of a phase in each timed call; empty for `model.generate`, which does not split."""
    return (
        []
        if m["results"][-1]["phases"] is None
        else [r["phases"][f"{phase}_tokens"] / r["phases"][f"{phase}_s"] for r in m["results"]]
    )


def rates(values: list[float], fmt: str = "{:.1f}") -> str:
    return C.spread(values, fmt) if values else "—"


def main() -> None:
    import torch

    p = C.parser(__doc__)
    p.add_argument("--workload", choices=["mixed", "decode", "both"], default="both")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (one fresh process per path)")
    p.add_argument(
        "--paths",
        nargs="+",
        metavar="NAME",
        help="only the paths whose names contain one of these (the hf references of their precisions always run)",
    )
    args = C.parse(p)
    cfg = QUICK if args.quick else FULL
    reps = args.reps or cfg["reps"]
    model_dir = C.model_dir(args.quick)
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=4096)
    n_params = U.non_embedding_params(model)
    peaks = {
        name: U.matmul_peak(cfg["matmul"], dtype, cfg["matmul_reps"])
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    headers = [
        "path",
        "tokens/s",
        "× hf bf16",
        "prefill tok/s",
        "decode tok/s",
        "decode × hf bf16",
        "share of peak",
        "peak MiB",
        "tokens",
        "same as hf (same precision)",
    ]
    results, same = {}, {}
    for workload, runs in (("mixed", reps), ("decode", 1)):
        if args.workload not in (workload, "both"):
            continue
        sizes = cfg if workload == "mixed" else cfg["decode"]
        prompts = prompts_of(workload, cfg, args.quick, builder)
        names = selected(list(variants(workload, cfg)), args.paths)
        results[workload] = measure(workload, names, cfg, runs, args.quick, not args.no_memory, model, tok, prompts)
        rows, same[workload] = table(results[workload], n_params, peaks, prompts)
        lengths = sorted(map(len, prompts))
        C.report(
            f"Generation throughput, {workload} workload (greedy)",
            headers,
            rows,
            {
                "config": cfg | {"reps": reps, "model": str(model_dir)},
                "peak_flops": peaks,
                "non_embedding_params": n_params,
                "results": results,
                "same_as_hf": same,
            },
            args.json,
            [
                f"{len(prompts)} prompts of {lengths[0]}–{lengths[-1]} tokens (median "
                f"{lengths[len(lengths) // 2]}), max_new_tokens {sizes['max_new_tokens']}"
                f"{' (no EOS)' if workload == 'decode' else ''}; model {model_dir.name}; median "
                f"(min–max) over {runs} interleaved runs; share of the {peaks['bf16'] / 1e9:.0f} (bf16) "
                f"/ {peaks['fp32'] / 1e9:.0f} (fp32) GFLOP/s matmul peak, N = {n_params / 1e6:.1f}M; "
                f"{torch.get_num_threads()} threads. Targets: fast bf16 ≥ 35% of the bf16 peak "
                f"(mixed), decode ≥ 5× hf bf16's (decode)."
            ],
        )
    checks = {
        "plain (sorted), fp32": "continuous batching changed the greedy completions",
        "fast, fp32": "the fast backend changed the greedy fp32 completions",
        "hf, bf16, per-call casts": "casting the weights once changed the bf16 completions",
    }
    for name, message in checks.items():
        if name in same.get("mixed", {}):
            assert same["mixed"][name] == len(prompts_of("mixed", cfg, args.quick, builder)), message


if __name__ == "__main__":
    main()
