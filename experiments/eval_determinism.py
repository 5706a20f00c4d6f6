"""Does the evaluation of the real model depend on batch size, thread count or CPU?

Greedy answers and letter log-probs of the embedded SmolLM2-135M on the first N SciQ
validation prompts. Three uses:

    .venv/bin/python experiments/eval_determinism.py [N] [MAX_NEW_TOKENS]
        fp32 and bf16 autocast, batch sizes 1, 3, N on 1 and 2 threads, each compared
        with (batch 1, 1 thread) of its precision: decided the precision of published
        numbers (docs/lineage.md).
    .venv/bin/python experiments/eval_determinism.py record OUT.json [N] [MAX_NEW_TOKENS]
        this CPU's answers and letter log-probs (fp32 and bf16, batch N, 2 threads) with
        the CPU's name and bf16 instruction sets, for a comparison across machines.
    .venv/bin/python experiments/eval_determinism.py compare A.json B.json
        two records: answers differing, max |Δ letter log-prob|, per precision.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from unisd.assets import materialize_model
from unisd.data import load_benchmark
from unisd.generation import Sampling, generate
from unisd.logprobs import next_token_logprobs
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, task_text


def _probe(n: int):
    """`run(threads, batch, bf16) -> (answer token ids per prompt, letter log-probs [n, 4])`."""
    model_dir = Path(tempfile.mkdtemp(prefix="unisd-det-"))
    materialize_model("smollm2-135m-instruct", None, model_dir)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    builder = PromptBuilder.for_tokenizer(tok, max_prompt_tokens=1024)
    examples = load_benchmark("embedded", "sciq", 42)["validation"][:n]
    prompts = [builder.encode(task_text(ex, "answer_first")) for ex in examples]
    letters = [tok.encode(f" {c}")[-1] for c in "ABCD"]

    def run(threads: int, batch: int, bf16: bool, max_new_tokens: int):
        torch.set_num_threads(threads)
        outs = generate(model, tok, prompts, Sampling(max_new_tokens), batch, builder.stop_strings, bf16)
        lps = torch.stack(next_token_logprobs(model, prompts, [letters] * n, tok.pad_token_id, batch, bf16))
        return [c.ids for c in outs], lps

    return run


def _differences(ref, other) -> str:
    answers = sum(a != b for a, b in zip(ref[0], other[0]))
    return f"answers differing {answers}/{len(ref[0])}, max |Δ letter log-prob| {(other[1] - ref[1]).abs().max().item():.2e}"


def sweep(n: int = 8, max_new_tokens: int = 24) -> None:
    run = _probe(n)
    print(f"CPU threads available: {torch.get_num_threads()}; {n} prompts, {max_new_tokens} new tokens")
    for bf16 in (False, True):
        ref = None
        for threads in (1, 2):
            for batch in (1, 3, n):
                result = run(threads, batch, bf16, max_new_tokens)
                ref = ref or result
                print(
                    f"{'bf16' if bf16 else 'fp32'} threads={threads} batch={batch}: {_differences(ref, result)}",
                    flush=True,
                )


# Environment variables that restrict the kernels ATen, MKL and oneDNN pick below what the
# CPU offers: set, they make one machine round like an older one (a proxy for another CPU).
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _cpu() -> dict[str, object]:
    """The CPU's name, bf16 instruction sets (they decide how bf16 matmuls round) and any
    kernel restriction in effect."""
    cpuinfo = Path("/proc/cpuinfo")
    fields = (
        dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line) if cpuinfo.exists() else {}
    )
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    bf16 = sorted(f for f in fields.get("flags", "").split() if "bf16" in f)
    limits = {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}
    return {
        "name": fields.get("model name", platform.processor()),
        "bf16": bf16,
        "torch": torch.__version__,
        **({"isa_limits": limits} if limits else {}),
    }


def record(out: str, n: int = 40, max_new_tokens: int = 32) -> None:
    run = _probe(n)
    result = {"cpu": _cpu(), "n": n, "max_new_tokens": max_new_tokens}
    for precision in ("fp32", "bf16"):
        ids, lps = run(2, n, precision == "bf16", max_new_tokens)
        result[precision] = {"answers": ids, "letter_logprobs": lps.tolist()}
    Path(out).write_text(json.dumps(result) + "\n")
    print(f"{out}: {result['cpu']}")


def compare(a: str, b: str) -> None:
    ra, rb = (json.loads(Path(p).read_text()) for p in (a, b))
    print(f"A {ra['cpu']}\nB {rb['cpu']}")
    for precision in ("fp32", "bf16"):
        pa, pb = ((r[precision]["answers"], torch.tensor(r[precision]["letter_logprobs"])) for r in (ra, rb))
        print(f"{precision}: {_differences(pa, pb)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["record"]:
        record(args[1], *map(int, args[2:]))
    elif args[:1] == ["compare"]:
        compare(args[1], args[2])
    else:
        sweep(*map(int, args))
