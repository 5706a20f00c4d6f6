"""Evaluation: greedy answers scored per task, plus fit and drift perplexities.

* mcq: accuracy of the final answer line (unparseable = wrong, counted);
* code: pass@1, the benchmark's tests run in the sandbox;
* tool: action / argument / full accuracy (full is the score);
* gold PPL: the model's perplexity on the gold responses;
* PPLret: the *base* model's perplexity on this model's greedy responses (SPEC §5);
  for the base model itself this is its own retention baseline;
* jsd_to_base: the mean per-token JSD between the base model's and this model's
  next-token distributions along this model's greedy responses (0 for the base).

Per-example predictions are written beside the aggregate metrics.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unisd.config import Config
from unisd.data.schema import Example, read_examples, write_jsonl
from unisd.generation import Sampling, generate
from unisd.logprobs import completion_logprobs, perplexity, retention
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, gold_response, task_text
from unisd.sandbox import Limits, run_many
from unisd.scoring import code_program, parse_mcq, tool_scores

log = logging.getLogger(__name__)


@dataclass
class Item:
    example: Example
    prompt: list[int]
    record: dict[str, Any]


def eval_examples(cfg: Config, data_dir: Path, benchmark: str) -> list[Example]:
    path = data_dir / benchmark / f"{cfg.eval.split}.jsonl"
    examples = read_examples(path)
    return examples[: cfg.eval.limit] if cfg.eval.limit else examples


def score_items(cfg: Config, items: list[Item]) -> None:
    """Fill each record's `correct` (and task-specific fields) from its completion."""
    code_items = [it for it in items if it.example.task == "code"]
    if code_items:
        limits = Limits(timeout_s=cfg.eval.code_timeout_s, memory_mb=cfg.eval.code_memory_mb)
        results = run_many([code_program(it.example, it.record["completion"]) for it in code_items], limits,
                           workers=cfg.eval.code_workers, desc=f"tests {code_items[0].record['benchmark']}")
        for it, res in zip(code_items, results):
            it.record.update(correct=res.passed, sandbox_status=res.status, sandbox_stderr=res.stderr[-500:])
    for it in items:
        ex, rec = it.example, it.record
        if ex.task == "mcq":
            rec["parsed"] = parse_mcq(rec["completion"], ex.choices)
            rec["correct"] = rec["parsed"] == ex.answer
        elif ex.task == "tool":
            rec.update(tool_scores(ex, rec["completion"]))
            rec["correct"] = rec["full"]


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else float("nan")


def summarize(items: list[Item], n_dropped: int) -> dict[str, Any]:
    recs = [it.record for it in items]
    n = len(recs)
    summary: dict[str, Any] = {
        "n": n,
        "dropped_over_budget": n_dropped,
        "score": 100.0 * sum(r["correct"] for r in recs) / n if n else float("nan"),
        "truncated_frac": sum(not r["finished"] for r in recs) / n if n else float("nan"),
        "mean_completion_tokens": _mean([r["completion_tokens"] for r in recs]),
    }
    if recs and "parsed" in recs[0]:
        summary["unparseable"] = sum(r["parsed"] is None for r in recs)
    if recs and "action" in recs[0]:
        for k in ("action", "arguments", "full"):
            summary[f"{k}_accuracy"] = 100.0 * sum(r[k] for r in recs) / n
    for k in ("gold_ppl", "ppl_ret", "jsd_to_base"):
        if recs and k in recs[0]:
            summary[k] = _mean([r[k] for r in recs])
    return summary


def evaluate_model(cfg: Config, model_dir: Path, data_dir: Path, out_dir: Path,
                   base_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate `model_dir` on every configured benchmark; write predictions and metrics."""
    tok = load_tokenizer(model_dir)
    builder = PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.device)
    bf16 = cfg.eval.bf16_autocast
    per_bench: dict[str, tuple[list[Item], int]] = {}
    for bench in cfg.data.benchmarks:
        examples = eval_examples(cfg, data_dir, bench)
        items, dropped = [], 0
        for ex in examples:
            ids = builder.encode(task_text(ex))
            if ids is None:
                dropped += 1
                continue
            items.append(Item(ex, ids, {"id": ex.id, "benchmark": bench, "gold": ex.answer}))
        if dropped:
            log.warning("%s: %d of %d prompts exceed %d tokens and are dropped", bench, dropped, len(examples),
                        cfg.prompts.max_prompt_tokens)
        if items:
            budget = getattr(cfg.eval.max_new_tokens, items[0].example.task)
            outs = generate(model, tok, [it.prompt for it in items], Sampling(budget), cfg.eval.batch_size,
                            builder.stop_strings, bf16, desc=f"eval {bench}")
            for it, c in zip(items, outs):
                it.record.update(completion=c.text, completion_ids=c.ids, completion_tokens=len(c.ids),
                                 finished=c.finished)
            score_items(cfg, items)
            if cfg.eval.ppl:
                golds = completion_logprobs(
                    model, [(it.prompt, builder.encode_response(gold_response(it.example))) for it in items],
                    tok.pad_token_id, cfg.eval.batch_size, bf16, desc=f"gold ppl {bench}",
                    max_tokens=cfg.eval.score_tokens)
                for it, lp in zip(items, golds):
                    it.record["gold_ppl"] = perplexity(lp)
        per_bench[bench] = (items, dropped)

    if cfg.eval.ppl:  # this model's answers under the base model: PPLret, and JSD(base ‖ this) on them
        base = load_model(base_dir, cfg.model.dtype, cfg.model.device) if base_dir is not None else None
        for bench, (items, _) in per_bench.items():
            pairs = [(it.prompt, it.record["completion_ids"]) for it in items]
            if base is None:  # the base model itself: its own retention baseline, no drift
                rets = [(lp, 0.0) for lp in completion_logprobs(model, pairs, tok.pad_token_id, cfg.eval.batch_size,
                                                                 bf16, desc=f"ppl_ret {bench}",
                                                                 max_tokens=cfg.eval.score_tokens)]
            else:
                rets = retention(model, base, pairs, tok.pad_token_id, cfg.eval.batch_size, bf16,
                                 desc=f"ppl_ret {bench}", max_tokens=cfg.eval.score_tokens)
            for it, (lp, jsd) in zip(items, rets):
                it.record.update(ppl_ret=perplexity(lp), jsd_to_base=jsd)

    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"benchmarks": {}, "split": cfg.eval.split}
    for bench, (items, dropped) in per_bench.items():
        write_jsonl(out_dir / "predictions" / f"{bench}.jsonl", [it.record for it in items])
        metrics["benchmarks"][bench] = summarize(items, dropped)
    scores = [m["score"] for m in metrics["benchmarks"].values()]
    metrics["overall"] = _mean(scores)
    return metrics
