"""Trajectories: the sequences a round trains on, their agreement scores, and what the
round's teacher makes of them.

`sample_trajectories` draws the student's own answers y ~ π_θ(·|x) (or takes gold
completions, per the recipe's `data` setting, plus the `gold_mix` share of gold SFT
items); `score_agreement` re-scores the same tokens under the teacher with K auxiliary
contexts (docs/method.md §2.1) and marks trajectories whose sequence-level disagreement is above
the filter quantile; `teacher_diagnostics` measures whether the privileged teacher fits
the student's answers: its end-of-turn log-prob, and its accuracy against the student's.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict

from unisd.agreement import keep_by_disagreement, sequence_disagreement
from unisd.choice_scores import AnswerEncoder
from unisd.config import Config
from unisd.contexts import context_texts
from unisd.data.schema import LETTERS, Example
from unisd.generation import Sampling, generate
from unisd.logprobs import completion_logprobs, next_token_logprobs
from unisd.prompts import (
    ANSWER_PREFIX,
    McqFormat,
    Message,
    PromptBuilder,
    gold_completion,
    gold_response,
    response_prefix,
    response_text,
    task_text,
    teacher_messages,
)
from unisd.scoring import parse_answer

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
    sft: bool = False  # a gold_mix item: cross-entropy on the gold completion, whatever the recipe's loss


def round_examples(examples: list[Example], per_round: int, seed: int, round_idx: int) -> list[Example]:
    """The prompts of one round: all, or a seeded subset that differs between rounds."""
    if not per_round or per_round >= len(examples):
        return list(examples)
    return random.Random(f"{seed}:round:{round_idx}").sample(examples, per_round)


def privileged_messages(cfg: Config, ex: Example, demonstration: str | None = None) -> list[Message]:
    """The teacher's prompt of `ex` under `prompts:` (template, MCQ format), with the gold
    demonstration or the given one (a contrastive negative)."""
    fmt = cfg.prompts.mcq_format
    demo = gold_response(ex, fmt) if demonstration is None else demonstration
    return teacher_messages(ex, demo, cfg.prompts.teacher_template, fmt)


def teacher_prompt(
    cfg: Config, builder: PromptBuilder, ex: Example, demonstration: str | None = None
) -> list[int] | None:
    """Token ids of `privileged_messages`, opened as the student's prompt is (the format's
    prefilled response start), so both score the same completion tokens; None: over budget."""
    prefix = response_prefix(ex.task, cfg.prompts.mcq_format)
    return builder.encode_messages(privileged_messages(cfg, ex, demonstration), prefix)


def gold_mix_picks(n: int, fraction: float, seed: int) -> list[int]:
    """The round(fraction · n) of n prompts (indices, ascending) that also get their gold
    response as an SFT item (`gold_mix`), a seeded choice."""
    return sorted(random.Random(f"{seed}:gold_mix").sample(range(n), round(fraction * n)))


def _gold(builder: PromptBuilder, ex: Example, ids: list[int], fmt: McqFormat, sft: bool) -> Trajectory:
    text = gold_completion(ex, fmt)
    return Trajectory(
        id=f"{ex.id}#gold" if sft else ex.id,
        example_id=ex.id,
        benchmark=ex.benchmark,
        source="gold",
        prompt_ids=ids,
        completion_ids=builder.encode_response(text),
        text=text,
        sft=sft,
    )


def sample_trajectories(
    cfg: Config, model, tok, builder: PromptBuilder, examples: list[Example], seed: int
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Student samples (or gold completions) for `examples`, and the `gold_mix` share of
    them again as gold SFT items; returns them and counts."""
    method, gen, fmt = cfg.method, cfg.generation, cfg.prompts.mcq_format
    encoded = [(ex, builder.encode_task(ex, fmt)) for ex in examples]
    fitting = [(ex, ids) for ex, ids in encoded if ids is not None]
    rng = random.Random(f"{seed}:mix")
    sampled: list[tuple[Example, list[int]]] = []
    gold: list[tuple[Example, list[int]]] = []
    for ex, ids in fitting:
        if method.data == "gold" or (method.data == "mixed" and rng.random() >= method.on_policy_fraction):
            gold.append((ex, ids))
        else:
            sampled.extend((ex, ids) for _ in range(gen.samples_per_prompt))
    mixed_in = [fitting[i] for i in gold_mix_picks(len(fitting), method.gold_mix, seed)]
    out = [_gold(builder, ex, ids, fmt, sft=False) for ex, ids in gold] + [
        _gold(builder, ex, ids, fmt, sft=True) for ex, ids in mixed_in
    ]
    by_task: dict[str, list[tuple[int, Example, list[int]]]] = {}
    for n, (ex, ids) in enumerate(sampled):
        by_task.setdefault(ex.task, []).append((n, ex, ids))
    for task, group in sorted(by_task.items()):
        sampling = Sampling(
            getattr(gen.max_new_tokens, task),
            do_sample=True,
            temperature=method.sample_temperature or gen.temperature,
            top_p=method.sample_top_p or gen.top_p,
            seed=seed,
        )
        outs = generate(
            model,
            tok,
            [ids for _, _, ids in group],
            sampling,
            gen.batch_size,
            builder.stop_strings,
            gen.bf16_autocast,
            desc=f"sample {task}",
            backend=gen.backend,
        )
        for (n, ex, ids), c in zip(group, outs):
            if not c.ids:
                continue
            out.append(
                Trajectory(
                    id=f"{ex.id}#{n}",
                    example_id=ex.id,
                    benchmark=ex.benchmark,
                    source="sampled",
                    prompt_ids=ids,
                    completion_ids=c.ids,
                    text=c.text,
                    finished=c.finished,
                    student_logprobs=c.logprobs,
                )
            )
    # samples carry their log-probs from decoding; gold completions are scored in one pass
    unscored = [t for t in out if not t.student_logprobs]
    lps = completion_logprobs(
        model,
        [(t.prompt_ids, t.completion_ids) for t in unscored],
        tok.pad_token_id,
        gen.batch_size,
        gen.bf16_autocast,
        desc="student log-probs",
        max_tokens=gen.score_tokens,
    )
    for t, lp in zip(unscored, lps):
        t.student_logprobs = lp.tolist()
    return out, {
        "dropped_over_budget": len(encoded) - len(fitting),
        "sampled": len(sampled),
        "gold": len(gold),
        "gold_mix": len(mixed_in),
    }


def score_agreement(
    cfg: Config,
    teacher,
    tok,
    builder: PromptBuilder,
    trajectories: list[Trajectory],
    records: dict[str, dict],
    by_id: dict[str, Example],
) -> tuple[list[Trajectory], dict[str, float]]:
    """Teacher log-probs of each sampled token under the K contexts; keep the agreeing ones.

    Returns the kept trajectories (with `agreement_scores` and `disagreement`) and stats.
    Trajectories whose context prompts exceed the budget are dropped and counted.
    """
    agreement = cfg.method.agreement
    scored: list[Trajectory] = []
    pairs: list[tuple[list[int], list[int]]] = []
    dropped = 0
    for t in trajectories:
        ex, fmt = by_id[t.example_id], cfg.prompts.mcq_format
        prompts = [
            builder.encode(text, response_prefix(ex.task, fmt))
            for text in context_texts(ex, records[ex.id], by_id, fmt)
        ]
        if len(prompts) < agreement.k or any(p is None for p in prompts):
            dropped += 1
            continue
        scored.append(t)
        pairs.extend((cast(list[int], p), t.completion_ids) for p in prompts[: agreement.k])
    lps = completion_logprobs(
        teacher,
        pairs,
        tok.pad_token_id,
        cfg.generation.batch_size,
        cfg.generation.bf16_autocast,
        desc="agreement scores",
        max_tokens=cfg.generation.score_tokens,
    )
    k = agreement.k
    for i, t in enumerate(scored):
        scores = torch.stack(lps[i * k : (i + 1) * k])  # [K, T]
        t.agreement_scores = scores.tolist()
        t.disagreement = float(
            sequence_disagreement(scores[:, None, :], torch.ones(1, scores.shape[1], dtype=torch.bool))
        )
    if not scored:
        return [], {"dropped_over_budget": dropped, "filtered_out": 0, "kept": 0}
    keep = keep_by_disagreement(torch.tensor([t.disagreement for t in scored]), agreement.filter_quantile).tolist()
    kept = [t for t, k_ in zip(scored, keep) if k_]
    stats = {
        "dropped_over_budget": dropped,
        "filtered_out": len(scored) - len(kept),
        "kept": len(kept),
        "filtered_fraction": (len(scored) - len(kept)) / len(scored),
        "disagreement_mean": float(torch.tensor([t.disagreement for t in scored]).mean()),
    }
    return kept, stats


# --------------------------------------------------------------------------- teacher diagnostics


def teacher_diagnostics(
    cfg: Config, teacher, tok, builder: PromptBuilder, trajectories: list[Trajectory], by_id: dict[str, Example]
) -> dict[str, float | int | None]:
    """Whether the round's teacher (privileged prompt) fits the student's answers.

    End of turn (`eos_calibration`), the option-letter accuracy of the teacher's and the
    student's prompt under the same model (`letter_accuracy`), and the accuracy of the
    student's own samples (`sample_accuracy`). A mean over nothing is None.
    """
    examples = [by_id[i] for i in dict.fromkeys(t.example_id for t in trajectories)]
    return {
        **eos_calibration(cfg, teacher, tok, builder, trajectories, by_id),
        **letter_accuracy(cfg, teacher, tok, builder, examples),
        **sample_accuracy(trajectories, by_id, cfg.prompts.mcq_format),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def eos_calibration(
    cfg: Config, teacher, tok, builder: PromptBuilder, trajectories: list[Trajectory], by_id: dict[str, Example]
) -> dict[str, float | int | None]:
    """Mean log-prob of the final EOS over the finished sampled trajectories that end with it:

        teacher_eos_logp = mean_i log p_T(EOS | teacher prompt of x_i, y_i,<T)
        student_eos_logp = mean_i log π_θ(EOS | x_i, y_i,<T)   (stored at sampling, T=1)

    A teacher far below the student teaches it, token by token, not to stop. Trajectories
    whose teacher prompt exceeds the budget are left out of both means.
    """
    ended = [
        t for t in trajectories if t.source == "sampled" and t.finished and t.completion_ids[-1] == tok.eos_token_id
    ]
    prompts = {i: teacher_prompt(cfg, builder, by_id[i]) for i in {t.example_id for t in ended}}
    scored = [t for t in ended if prompts[t.example_id] is not None]
    gen = cfg.generation
    lps = completion_logprobs(
        teacher,
        [(cast(list[int], prompts[t.example_id]), t.completion_ids) for t in scored],
        tok.pad_token_id,
        gen.batch_size,
        gen.bf16_autocast,
        desc="teacher end of turn",
        max_tokens=gen.score_tokens,
    )
    return {
        "eos_trajectories": len(scored),
        "teacher_eos_logp": _mean([float(lp[-1]) for lp in lps]),
        "student_eos_logp": _mean([t.student_logprobs[-1] for t in scored]),
    }


def letter_accuracy(
    cfg: Config, model, tok, builder: PromptBuilder, examples: list[Example]
) -> dict[str, float | int | None]:
    """Accuracy (%) of the option letter chosen right after an assistant prefix "Answer:",
    over the MCQ examples whose two prompts fit the budget, under the teacher's privileged
    prompt and under the student's prompt, with the same model (the round's teacher):
    the gap is what the demonstration gives the teacher to teach. Under open_answer an
    option's first token stands for its letter (items whose options share one are left out)."""
    fmt, enc, rows = cfg.prompts.mcq_format, AnswerEncoder(builder), []
    for ex in (ex for ex in examples if ex.task == "mcq"):
        teacher = builder.encode_messages(privileged_messages(cfg, ex), ANSWER_PREFIX)
        text = task_text(ex, fmt)
        read = enc.first_tokens(text, ex.choices) if fmt == "open_answer" else enc.letters(text, len(ex.choices))
        if teacher is not None and read is not None and len(read[0]) <= builder.max_prompt_tokens:
            rows.append((ex, teacher, *read))
    gen = cfg.generation
    lps = next_token_logprobs(
        model,
        [r[1] for r in rows] + [r[2] for r in rows],
        [r[3] for r in rows] * 2,
        tok.pad_token_id,
        gen.batch_size,
        gen.bf16_autocast,
        desc="letter accuracy",
        max_tokens=gen.score_tokens,
    )
    right = [LETTERS[int(lp.argmax())] == ex.answer for lp, ex in zip(lps, [r[0] for r in rows] * 2)]
    n = len(rows)
    return {
        "letter_items": n,
        "teacher_letter_acc": _mean([100.0 * r for r in right[:n]]),
        "student_letter_acc": _mean([100.0 * r for r in right[n:]]),
    }


def sample_accuracy(
    trajectories: list[Trajectory], by_id: dict[str, Example], fmt: McqFormat
) -> dict[str, float | int | None]:
    """Accuracy (%) of the student's sampled MCQ answers, as evaluation parses them."""
    sampled = [(t, by_id[t.example_id]) for t in trajectories if t.source == "sampled"]
    mcq = [(t, ex) for t, ex in sampled if ex.task == "mcq"]
    right = [parse_answer(response_text(ex, t.text, fmt), ex.choices, fmt) == ex.answer for t, ex in mcq]
    return {"sampled_mcq": len(mcq), "student_sample_acc": _mean([100.0 * r for r in right])}
