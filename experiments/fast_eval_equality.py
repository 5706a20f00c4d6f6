"""May the published evaluation decode with the fast backend? Only if its greedy fp32
answers are the reference's, token for token (issue #11; docs/lineage.md, "Published numbers").

For every benchmark of the config that has a validation split (HumanEval has none: MBPP
stands for the code answers), the evaluation's own prompts (`eval.limit` validation
items, built as `unisd.evaluate` builds them) are decoded greedily in fp32:
by the HF path at `eval.batch_size` on all threads (the reference, today's evaluation),
by the HF path at batch 3 on one thread (how far the reference moves with another
batching: fp32 rounding can flip a near-tie), by the fast backend at `eval.batch_size`,
and by the fast backend at batch 3 on one thread. Prints the completions that differ from the
reference per benchmark and per variant, and the seconds of each; exit status 1 when
any differs.

    .venv/bin/python experiments/fast_eval_equality.py [--model DIR] [--set key=value ...] [--json OUT]

Needs `unisd model` and `unisd prepare` outputs (artifacts/model, artifacts/data); --model
decodes another model on them (a trained one: its merged `train/model` folder).
Validation only: test is not decoded here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from unisd.config import load_config
from unisd.evaluate import eval_examples
from unisd.generation import Sampling, generate
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    p.add_argument("--model", type=Path, help="the model to decode (default: the base, artifacts/model)")
    p.add_argument("--json", type=Path, help="also write the counts and times here")
    args = p.parse_args()
    with_validation = "data.benchmarks=[sciq, arc_challenge, commonsense_qa, mbpp]"
    cfg = load_config("params.yaml", ["eval.split=validation", with_validation, *args.set])
    model_dir, data_dir = args.model or Path(cfg.paths.artifacts) / "model", Path(cfg.paths.artifacts) / "data"
    tok, model = load_tokenizer(model_dir), load_model(model_dir, "float32", "cpu")
    builder = PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)
    threads = torch.get_num_threads()
    variants = {  # name: (backend, batch size, threads)
        "hf": ("hf", cfg.eval.batch_size, threads),
        "hf, batch 3, 1 thread": ("hf", 3, 1),  # the reference's own floor: another batching
        "fast": ("fast", cfg.eval.batch_size, threads),
        "fast, batch 3, 1 thread": ("fast", 3, 1),
    }
    report: dict[str, dict] = {}
    for bench in cfg.data.benchmarks:
        examples = eval_examples(cfg, data_dir, bench)
        prompts = [ids for ex in examples if (ids := builder.encode_task(ex, cfg.prompts.mcq_format)) is not None]
        budget = Sampling(getattr(cfg.eval.max_new_tokens, examples[0].task))
        ids, seconds = {}, {}
        for name, (backend, batch, n_threads) in variants.items():
            torch.set_num_threads(n_threads)
            start = time.perf_counter()
            outs = generate(model, tok, prompts, budget, batch, builder.stop_strings, False, backend=backend)
            seconds[name] = round(time.perf_counter() - start, 1)
            ids[name] = [c.ids for c in outs]
        torch.set_num_threads(threads)
        differ = {name: sum(a != b for a, b in zip(ids["hf"], ids[name])) for name in variants if name != "hf"}
        report[bench] = {"prompts": len(prompts), "differ": differ, "seconds": seconds}
        print(f"{bench}: {len(prompts)} prompts; differing from hf: {differ}; seconds {seconds}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(n for r in report.values() for n in r["differ"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
