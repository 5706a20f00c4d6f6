"""Evaluation: greedy answers scored per task, plus fit and drift perplexities.

* mcq: accuracy of the final answer line (unparseable = wrong, counted; `score`, the
  paper's metric), with what it is made of (parse and finish rates, the predicted and
  gold letter histograms, the best one-letter score on the same items) and, with
  eval.choice_scores, the teacher-forced scores that do not depend on where the gold
  stands (unisd.choice_scores: rot_acc, rot_gold_prob, circular_acc, ll_acc, ll_norm_acc);
* code: pass@1, the benchmark's tests run in the sandbox;
* tool: action / argument / full accuracy (full is the score);
* gold PPL: the model's perplexity on the gold responses;
* PPLret: the *base* model's perplexity on this model's greedy responses (docs/method.md §5);
  for the base model itself this is its own retention baseline;
* jsd_to_base: the mean per-token JSD between the base model's and this model's
  next-token distributions along this model's greedy responses (0 for the base).

Per-example predictions are written beside the aggregate metrics.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unisd.choice_scores import AnswerEncoder, Scoring, loglik_pairs, loglik_records, rotation_scores
from unisd.config import Config
from unisd.data.schema import LETTERS, Example, read_examples, write_jsonl
from unisd.data.suites import SUITES
from unisd.generation import Sampling, generate
from unisd.logprobs import perplexity, retention, shared_prompt_logprobs
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, gold_completion, response_text
from unisd.sandbox import Limits, run_many
from unisd.scoring import code_program, parse_answer, tool_scores

log = logging.getLogger(__name__)


@dataclass
class Item:
    example: Example
    prompt: list[int]
    record: dict[str, Any]


def eval_examples(cfg: Config, data_dir: Path, benchmark: str) -> list[Example]:
    path = data_dir / benchmark / f"{cfg.eval.split}.jsonl"
    examples = read_examples(path)
    limit = cfg.eval.limit_of(benchmark)
    return examples[:limit] if limit else examples


def score_items(cfg: Config, items: list[Item]) -> None:
    """Fill each record's `correct` (and task-specific fields) from its completion."""
    code_items = [it for it in items if it.example.task == "code"]
    if code_items:
        limits = Limits(
            timeout_s=cfg.eval.code_timeout_s, memory_mb=cfg.eval.code_memory_mb, isolation=cfg.eval.code_isolation
        )
        results = run_many(
            [code_program(it.example, it.record["completion"]) for it in code_items],
            limits,
            workers=cfg.eval.code_workers,
            desc=f"tests {code_items[0].record['benchmark']}",
        )
        for it, res in zip(code_items, results):
            it.record.update(
                correct=res.passed,
                sandbox_status=res.status,
                sandbox_stderr=res.stderr[-500:],
                sandbox_reason=res.reason,
                sandbox_isolation=res.isolation["level"],
            )
    for it in items:
        ex, rec = it.example, it.record
        if ex.task == "mcq":
            fmt = cfg.prompts.mcq_format
            rec["parsed"] = parse_answer(response_text(ex, rec["completion"], fmt), ex.choices, fmt)
            rec["correct"] = rec["parsed"] == ex.answer
        elif ex.task == "tool":
            rec.update(tool_scores(ex, rec["completion"]))
            rec["correct"] = rec["full"]


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else float("nan")


# summary key (percent) -> per-item record field of unisd.choice_scores
CHOICE_METRICS = {
    "rot_acc": "rot_correct",
    "rot_gold_prob": "rot_gold_prob",
    "circular_acc": "circular_correct",
    "ll_acc": "ll_correct",
    "ll_norm_acc": "ll_norm_correct",
}


def mcq_summary(items: list[Item]) -> dict[str, Any]:
    """What a generative MCQ score is made of, and the scores that do not depend on letters.

    parse_rate / finish_rate: fractions of answers with a readable letter / that stopped
    before the token limit; letter_hist: predicted letters ("none": unparseable);
    gold_hist: gold letters; one_letter_baseline: max over letters L of the share of
    items whose gold is L, in percent, i.e. the score of always answering the best single
    letter (with balanced letters: about 100/n); then, when the records hold them, the
    mean of each `CHOICE_METRICS` field in percent.
    """
    recs = [it.record for it in items]
    n = len(recs)
    letters = LETTERS[: max(len(it.example.choices) for it in items)]
    predicted, gold = Counter(r["parsed"] or "none" for r in recs), Counter(r["gold"] for r in recs)
    out: dict[str, Any] = {
        "parse_rate": sum(r["parsed"] is not None for r in recs) / n,
        "finish_rate": sum(r["finished"] for r in recs) / n,
        "letter_hist": {**{k: predicted[k] for k in letters}, "none": predicted["none"]},
        "gold_hist": {k: gold[k] for k in letters},
        "one_letter_baseline": 100.0 * max(gold.values()) / n,
    }
    for key, field in CHOICE_METRICS.items():
        if field in recs[0]:
            out[key] = 100.0 * statistics.fmean(float(r[field]) for r in recs)
    return out


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
        summary.update(mcq_summary(items))
    if recs and "action" in recs[0]:
        for k in ("action", "arguments", "full"):
            summary[f"{k}_accuracy"] = 100.0 * sum(r[k] for r in recs) / n
    for k in ("gold_ppl", "ppl_ret", "jsd_to_base"):
        if recs and k in recs[0]:
            summary[k] = _mean([r[k] for r in recs])
    return summary


def overall_metrics(benchmarks: dict[str, dict[str, Any]], tasks: Mapping[str, str], headline: str) -> dict[str, Any]:
    """Top-level means over benchmark summaries: overall (every `score`, the paper's
    metric), mcq_overall and mcq_rot_overall (`score` and `rot_acc` over MCQ benchmarks),
    code_overall (`score` over code benchmarks), each only when its group has a number;
    and headline: the `headline` benchmark's rot_acc, or its ll_acc where no letters were
    shown (open_answer), when it was evaluated with one."""

    def mean_of(task: str | None, key: str) -> float:
        return _mean([m.get(key, math.nan) for b, m in benchmarks.items() if task in (None, tasks[b])])

    out: dict[str, Any] = {"overall": mean_of(None, "score")}
    for name, task, key in (
        ("mcq_overall", "mcq", "score"),
        ("mcq_rot_overall", "mcq", "rot_acc"),
        ("code_overall", "code", "score"),
    ):
        if not math.isnan(value := mean_of(task, key)):
            out[name] = value
    for metric in ("rot_acc", "ll_acc"):  # ll_acc where no letters are shown (open_answer)
        if metric in benchmarks.get(headline, {}):
            out["headline"] = {"benchmark": headline, "metric": metric, "value": benchmarks[headline][metric]}
            break
    return out


def score_after_prompts(
    cfg: Config, model, pad_id: int, builder: PromptBuilder, items: list[Item], bench: str, own: bool
) -> None:
    """Fill the records' teacher-forced scores read after each item's own prompt, all in
    one `shared_prompt_logprobs` pass (each prompt runs once, whatever is scored after it):
    the gold response (gold_ppl); for the base model itself (`own`) its greedy answer
    (ppl_ret, its own retention baseline, and jsd_to_base 0); and with eval.choice_scores
    on MCQ, every option (ll_correct, ll_norm_correct), plus the rotations where letters are
    shown (their prompts differ: a pass of their own)."""
    fmt, examples = cfg.prompts.mcq_format, [it.example for it in items]
    run = Scoring(model, pad_id, cfg.eval.batch_size, cfg.eval.bf16_autocast, cfg.eval.score_tokens)
    enc = AnswerEncoder(builder)
    answers: list[tuple[list[int], list[int]]] = []  # scored whole: the gold response, the model's own answer
    if cfg.eval.ppl:
        answers += [(it.prompt, builder.encode_response(gold_completion(it.example, fmt))) for it in items]
        if own:
            answers += [(it.prompt, it.record["completion_ids"]) for it in items]
    mcq = cfg.eval.choice_scores and items[0].example.task == "mcq"
    options = loglik_pairs(enc, examples, fmt, anchors=[it.prompt for it in items]) if mcq else []
    if not answers + options:
        return
    lps = iter(
        shared_prompt_logprobs(
            model,
            answers + [(prompt, cont) for prompt, cont, _ in options],
            pad_id,
            run.batch_size,
            run.bf16,
            desc=f"score {bench}",
            max_tokens=run.max_tokens,
        )
    )
    if cfg.eval.ppl:
        for it in items:
            it.record["gold_ppl"] = perplexity(next(lps))
        if own:
            for it in items:
                it.record.update(ppl_ret=perplexity(next(lps)), jsd_to_base=0.0)
    if mcq:
        if fmt != "open_answer":
            for it, rot in zip(items, rotation_scores(run, enc, examples, fmt, f"choices {bench} rotations")):
                it.record.update(rot)
        for it, ll in zip(items, loglik_records(examples, list(lps), options)):
            it.record.update(ll)


def evaluate_model(
    cfg: Config, model_dir: Path, data_dir: Path, out_dir: Path, base_dir: Path | None = None
) -> dict[str, Any]:
    """Evaluate `model_dir` on every configured benchmark; write predictions and metrics."""
    tok = load_tokenizer(model_dir)
    builder = PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.device)
    bf16, fmt = cfg.eval.bf16_autocast, cfg.prompts.mcq_format
    per_bench: dict[str, tuple[list[Item], int]] = {}
    for bench in cfg.data.benchmarks:
        examples = eval_examples(cfg, data_dir, bench)
        items, dropped = [], 0
        for ex in examples:
            ids = builder.encode_task(ex, fmt)
            if ids is None:
                dropped += 1
                continue
            items.append(Item(ex, ids, {"id": ex.id, "benchmark": bench, "gold": ex.answer}))
        if dropped:
            log.warning(
                "%s: %d of %d prompts exceed %d tokens and are dropped",
                bench,
                dropped,
                len(examples),
                cfg.prompts.max_prompt_tokens,
            )
        if items:
            budget = getattr(cfg.eval.max_new_tokens, items[0].example.task)
            outs = generate(
                model,
                tok,
                [it.prompt for it in items],
                Sampling(budget),
                cfg.eval.batch_size,
                builder.stop_strings,
                bf16,
                desc=f"eval {bench}",
                backend=cfg.eval.backend,
            )
            for it, c in zip(items, outs):
                it.record.update(
                    completion=c.text, completion_ids=c.ids, completion_tokens=len(c.ids), finished=c.finished
                )
            score_items(cfg, items)
            score_after_prompts(cfg, model, tok.pad_token_id, builder, items, bench, own=base_dir is None)
        per_bench[bench] = (items, dropped)

    if cfg.eval.ppl and base_dir is not None:  # this model's answers under the base model: PPLret, JSD(base ‖ this)
        base = load_model(base_dir, cfg.model.dtype, cfg.model.device)
        for bench, (items, _) in per_bench.items():
            rets = retention(
                model,
                base,
                [(it.prompt, it.record["completion_ids"]) for it in items],
                tok.pad_token_id,
                cfg.eval.batch_size,
                bf16,
                desc=f"ppl_ret {bench}",
                max_tokens=cfg.eval.score_tokens,
            )
            for it, (lp, jsd) in zip(items, rets):
                it.record.update(ppl_ret=perplexity(lp), jsd_to_base=jsd)

    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"benchmarks": {}, "split": cfg.eval.split}
    for bench, (items, dropped) in per_bench.items():
        write_jsonl(out_dir / "predictions" / f"{bench}.jsonl", [it.record for it in items])
        metrics["benchmarks"][bench] = summarize(items, dropped)
    tasks = {b: SUITES[cfg.data.suite][b].task for b in metrics["benchmarks"]}
    metrics.update(overall_metrics(metrics["benchmarks"], tasks, cfg.eval.headline))
    return metrics
