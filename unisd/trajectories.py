"""Trajectories: the sequences a round trains on, and their agreement scores.

`sample_trajectories` draws the student's own answers y ~ π_θ(·|x) (or takes gold
completions, per the recipe's `data` setting); `score_agreement` re-scores the same
tokens under the teacher with K auxiliary contexts (SPEC §2.1) and marks trajectories
whose sequence-level disagreement is above the filter quantile.
"""

from __future__ import annotations

import logging
import random
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from unisd.agreement import keep_by_disagreement, sequence_disagreement
from unisd.config import Config
from unisd.contexts import context_texts
from unisd.data.schema import Example
from unisd.generation import Sampling, generate
from unisd.logprobs import completion_logprobs
from unisd.prompts import PromptBuilder, gold_response, task_text

log = logging.getLogger(__name__)


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    example_id: str
    benchmark: str
    source: Literal["sampled", "gold"]
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool = True
    student_logprobs: list[float] = []  # log π_θ(y_t | x, y_<t) at T=1 under the sampling model
    agreement_scores: list[list[float]] | None = None  # [K][T] teacher log-probs under the K contexts
    disagreement: float | None = None  # D = Var_k(mean_t s_{k,t})


def round_examples(examples: list[Example], per_round: int, seed: int, round_idx: int) -> list[Example]:
    """The prompts of one round: all, or a seeded subset that differs between rounds."""
    if not per_round or per_round >= len(examples):
        return list(examples)
    return random.Random(f"{seed}:round:{round_idx}").sample(examples, per_round)


def sample_trajectories(cfg: Config, model, tok, builder: PromptBuilder, examples: list[Example],
                        seed: int) -> tuple[list[Trajectory], dict[str, int]]:
    """Student samples (or gold completions) for `examples`; returns them and drop counts."""
    method, gen = cfg.method, cfg.generation
    rng = random.Random(f"{seed}:mix")
    sampled, gold, dropped = [], [], 0
    for ex in examples:
        ids = builder.encode(task_text(ex))
        if ids is None:
            dropped += 1
        elif method.data == "gold" or (method.data == "mixed" and rng.random() >= method.on_policy_fraction):
            gold.append((ex, ids))
        else:
            sampled.extend((ex, ids) for _ in range(gen.samples_per_prompt))
    out = [Trajectory(id=ex.id, example_id=ex.id, benchmark=ex.benchmark, source="gold", prompt_ids=ids,
                      completion_ids=builder.encode_response(gold_response(ex)), text=gold_response(ex))
           for ex, ids in gold]
    by_task: dict[str, list[tuple[int, Example, list[int]]]] = {}
    for n, (ex, ids) in enumerate(sampled):
        by_task.setdefault(ex.task, []).append((n, ex, ids))
    for task, group in sorted(by_task.items()):
        sampling = Sampling(getattr(gen.max_new_tokens, task), do_sample=True,
                            temperature=method.sample_temperature or gen.temperature,
                            top_p=method.sample_top_p or gen.top_p, seed=seed)
        outs = generate(model, tok, [ids for _, _, ids in group], sampling, gen.batch_size, builder.stop_strings,
                        gen.bf16_autocast, desc=f"sample {task}")
        for (n, ex, ids), c in zip(group, outs):
            if not c.ids:
                continue
            out.append(Trajectory(id=f"{ex.id}#{n}", example_id=ex.id, benchmark=ex.benchmark, source="sampled",
                                  prompt_ids=ids, completion_ids=c.ids, text=c.text, finished=c.finished))
    lps = completion_logprobs(model, [(t.prompt_ids, t.completion_ids) for t in out], tok.pad_token_id,
                              gen.batch_size, gen.bf16_autocast, desc="student log-probs", max_tokens=gen.score_tokens)
    for t, lp in zip(out, lps):
        t.student_logprobs = lp.tolist()
    return out, {"dropped_over_budget": dropped, "sampled": len(sampled), "gold": len(gold)}


def score_agreement(cfg: Config, teacher, tok, builder: PromptBuilder, trajectories: list[Trajectory],
                    records: dict[str, dict], by_id: dict[str, Example]) -> tuple[list[Trajectory], dict[str, float]]:
    """Teacher log-probs of each sampled token under the K contexts; keep the agreeing ones.

    Returns the kept trajectories (with `agreement_scores` and `disagreement`) and stats.
    Trajectories whose context prompts exceed the budget are dropped and counted.
    """
    agreement = cfg.method.agreement
    scored, pairs, dropped = [], [], 0
    for t in trajectories:
        prompts = [builder.encode(text) for text in context_texts(by_id[t.example_id], records[t.example_id], by_id)]
        if len(prompts) < agreement.k or any(p is None for p in prompts):
            dropped += 1
            continue
        scored.append(t)
        pairs.extend((p, t.completion_ids) for p in prompts[: agreement.k])
    lps = completion_logprobs(teacher, pairs, tok.pad_token_id, cfg.generation.batch_size,
                              cfg.generation.bf16_autocast, desc="agreement scores",
                              max_tokens=cfg.generation.score_tokens)
    k = agreement.k
    for i, t in enumerate(scored):
        scores = torch.stack(lps[i * k : (i + 1) * k])  # [K, T]
        t.agreement_scores = scores.tolist()
        t.disagreement = float(sequence_disagreement(scores[:, None, :], torch.ones(1, scores.shape[1], dtype=torch.bool)))
    if not scored:
        return [], {"dropped_over_budget": dropped, "filtered_out": 0, "kept": 0}
    keep = keep_by_disagreement(torch.tensor([t.disagreement for t in scored]), agreement.filter_quantile).tolist()
    kept = [t for t, k_ in zip(scored, keep) if k_]
    stats = {"dropped_over_budget": dropped, "filtered_out": len(scored) - len(kept), "kept": len(kept),
             "filtered_fraction": (len(scored) - len(kept)) / len(scored),
             "disagreement_mean": float(torch.tensor([t.disagreement for t in scored]).mean())}
    return kept, stats
