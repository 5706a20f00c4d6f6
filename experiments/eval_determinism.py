"""Does the evaluation of the real model depend on batch size or thread count?

Greedy answers and letter log-probs of the embedded SmolLM2-135M on the first N SciQ
validation prompts, in fp32 and in bf16 autocast, for batch sizes and thread counts;
each setting is compared with (batch 1, 1 thread) of the same precision. The result
decided the precision of published numbers (docs/lineage.md).

    .venv/bin/python experiments/eval_determinism.py [N] [MAX_NEW_TOKENS]
"""

from __future__ import annotations

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


def main(n: int = 8, max_new_tokens: int = 24) -> None:
    model_dir = Path(tempfile.mkdtemp(prefix="unisd-det-"))
    materialize_model("smollm2-135m-instruct", None, model_dir)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    builder = PromptBuilder.for_tokenizer(tok, max_prompt_tokens=1024)
    examples = load_benchmark("embedded", "sciq", 42)["validation"][:n]
    prompts = [builder.encode(task_text(ex, "answer_first")) for ex in examples]
    letters = [tok.encode(f" {c}")[-1] for c in "ABCD"]
    print(f"CPU threads available: {torch.get_num_threads()}; {n} prompts, {max_new_tokens} new tokens")
    for bf16 in (False, True):
        ref = None
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for batch in (1, 3, n):
                outs = generate(model, tok, prompts, Sampling(max_new_tokens), batch, builder.stop_strings, bf16)
                lps = torch.stack(next_token_logprobs(model, prompts, [letters] * n, tok.pad_token_id, batch, bf16))
                ids = [c.ids for c in outs]
                ref = ref or (ids, lps)
                print(
                    f"{'bf16' if bf16 else 'fp32'} threads={threads} batch={batch}: answers differing "
                    f"{sum(a != b for a, b in zip(ref[0], ids))}/{n}, max |Δ letter log-prob| "
                    f"{(lps - ref[1]).abs().max().item():.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
