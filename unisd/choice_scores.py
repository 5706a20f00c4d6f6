"""MCQ scores that do not depend on where the gold option stands, beside generative accuracy.

A small model's generative MCQ accuracy partly measures a letter habit (SmolLM2-135M
opens most answers with "A."). Two teacher-forced scores read the model's preference
between the options' *contents* instead:

* rotation (CircularEval / PriDe-style debiasing): for each of the n cyclic rotations r
  of an item's options, the student prompt followed by `ANSWER_PREFIX` inside the
  assistant turn; the next-token distribution restricted to the n letter tokens
  (" A", " B", …) and renormalised, p_r(letter); mapped back to the options, p_r(option);
  averaged, p̄(option) = (1/n) Σ_r p_r(option). Over a full cycle every option stands
  at every letter once, so a prior over letters adds the same to every option and p̄
  ranks options by content (a model that only ever says "A" gets p̄ = 1/n everywhere).
  rot_correct: gold is the argmax of p̄ (a credit in [0, 1], see ties below);
  circular_correct: gold is the top letter in every rotation (CircularEval's strict
  criterion, a bool).
* option log-likelihood (lm-eval-harness's zero-shot cloze): log p(" <option text>" |
  context and question without the listed options, then `ANSWER_PREFIX`), summed over
  the option's tokens; ll_correct on the sum, ll_norm_correct on the sum divided by the
  option's characters (acc_norm), which removes the bias toward short options. Under
  `mcq_format: open_answer` the student's own prompt (the cloze text with its format
  instruction) is the context, and there are no rotations: no letters are shown.

Ties share the credit: k options tied for the top, the gold among them, give 1/k (the
expected score of breaking the tie at random), so a model with no preference at all
scores exactly chance rather than whatever a tie-break rule favours.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from unisd.data.convert import rotate_options
from unisd.data.schema import LETTERS, Example
from unisd.logprobs import shared_prefix_next_token_logprobs
from unisd.prompts import ANSWER_PREFIX, McqFormat, PromptBuilder, problem_text, task_text, user

TIE_TOL = 1e-9  # relative: scores this close to the top are tied (rounding of equal sums in another order)


class AnswerEncoder:
    """Token ids of a one-turn prompt continued inside the assistant turn after ANSWER_PREFIX.

    Texts are tokenized as one string (rendered prompt + prefix + continuation), as the
    model reads them, and split where the prefix ends. No length budget: an item scored
    here already fits in its original order, and its rotations differ by a few tokens.
    """

    def __init__(self, builder: PromptBuilder) -> None:
        self.builder = replace(builder, max_prompt_tokens=sys.maxsize)

    def _ids(self, text: str, answer: str = "") -> list[int]:
        return self.builder.encode_messages([user(text)], ANSWER_PREFIX + answer)  # type: ignore[return-value]

    def split(self, text: str, tail: str) -> tuple[list[int], list[int]]:
        """(ids of the prompt ending in ANSWER_PREFIX, ids of `tail`) from one tokenization
        of the whole, cut where the prompt's own tokenization ends (lm-eval-harness's split)."""
        whole, n = self._ids(text, tail), len(self._ids(text))
        return whole[:n], whole[n:]

    def letters(self, text: str, n: int) -> tuple[list[int], list[int]]:
        """(prompt ids ending in ANSWER_PREFIX, the token of " A", " B", … for n letters).

        Each letter is read off the prompt continued by " X", beyond the prompt's own
        tokens, and must be exactly one token; otherwise its probability is not a single
        next-token probability after that prompt, and this raises.
        """
        prompt, ids = self._ids(text), []
        for letter in LETTERS[:n]:
            whole = self._ids(text, f" {letter}")
            if len(whole) != len(prompt) + 1 or whole[:-1] != prompt:
                raise ValueError(
                    f"{ANSWER_PREFIX!r} followed by {' ' + letter!r} is not one token after the prompt "
                    f"under this tokenizer (tokens {whole[len(prompt) - 1 :]}); the rotation score needs "
                    "single-token letters (eval.choice_scores: false skips it)"
                )
            ids.append(whole[-1])
        return prompt, ids

    def first_tokens(self, text: str, options: list[str]) -> tuple[list[int], list[int]] | None:
        """(prompt ids ending in ANSWER_PREFIX, the first token of " <option>" for each
        option): the open answer's counterpart of `letters`. None when two options share
        their first token (the next token then does not tell them apart)."""
        prompt = self._ids(text)
        firsts = [self._ids(text, f" {o.strip()}")[len(prompt)] for o in options]  # as `split` cuts
        return (prompt, firsts) if len(set(firsts)) == len(firsts) else None


def tie_credit(scores: torch.Tensor, gold: int) -> float:
    """1/k when the gold is among the k options tied for the top of `scores` [n], else 0."""
    scores = scores.double()
    top = scores.max()
    tied = (top - scores) <= TIE_TOL * max(1.0, float(top.abs()))
    return 1.0 / int(tied.sum()) if tied[gold] else 0.0


def aggregate_rotations(letter_logprobs: list[torch.Tensor], gold: int) -> dict[str, Any]:
    """Per-item rotation scores from the letter log-probs [n] of each rotation r = 0..n-1.

    Rotation r shows option (i + r) mod n at letter i (`rotate_options(ex, r)`), so
    p_r(option) = roll(softmax(letter log-probs), r); p̄ = mean over r. rot_probs: p̄ in
    the original option order; rot_correct: `tie_credit(p̄, gold)`; rot_gold_prob: p̄(gold);
    circular_correct: the gold alone on top in every rotation.
    """
    per_rotation = torch.stack(
        [torch.roll(torch.softmax(lp.double(), -1), r) for r, lp in enumerate(letter_logprobs)]
    )  # [n rotations, n options]
    mean = per_rotation.mean(0)
    return {
        "rot_probs": mean.tolist(),
        "rot_correct": tie_credit(mean, gold),
        "rot_gold_prob": float(mean[gold]),
        "circular_correct": all(tie_credit(p, gold) == 1.0 for p in per_rotation),
    }


def aggregate_loglik(sums: list[float], chars: list[int], gold: int) -> dict[str, Any]:
    """Per-item option log-likelihood scores: ll (the sums, option order), ll_correct on
    the sums, ll_norm_correct on sum / characters (an empty option counts one)."""
    sums_t = torch.tensor(sums, dtype=torch.float64)
    norm = sums_t / torch.tensor([max(c, 1) for c in chars], dtype=torch.float64)
    return {"ll": sums, "ll_correct": tie_credit(sums_t, gold), "ll_norm_correct": tie_credit(norm, gold)}


def cloze_text(ex: Example, mcq_format: McqFormat = "reason_first") -> str:
    """The context of the option log-likelihoods: the problem without its listed options
    (context, if any, and question), or under open_answer the student's whole task text."""
    return task_text(ex, mcq_format) if mcq_format == "open_answer" else problem_text(ex, mcq_format="open_answer")


@dataclass
class Scoring:
    """What every forward shares: the model, its padding id, batching and autocast."""

    model: Any
    pad_id: int
    batch_size: int = 8
    bf16: bool = False
    max_tokens: int = 0


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of `seqs`, short of the shortest one by a token
    at least (every sequence keeps a suffix: the position its next token is read at)."""
    shortest = min(map(len, seqs))
    n = 0
    while n < shortest - 1 and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def rotation_scores(
    run: Scoring, enc: AnswerEncoder, examples: list[Example], mcq_format: McqFormat, desc: str
) -> list[dict[str, Any]]:
    """`aggregate_rotations` per example: the student's task text in `mcq_format`, once per
    rotation; an item's rotations share the tokens before its options, which run once
    (`shared_prefix_next_token_logprobs`)."""
    pairs, letters = [], []
    for ex in examples:
        rotations = [
            enc.letters(task_text(rotate_options(ex, r), mcq_format), len(ex.choices)) for r in range(len(ex.choices))
        ]
        prefix = common_prefix([p for p, _ in rotations])
        pairs += [(p[:prefix], p[prefix:]) for p, _ in rotations]
        letters += [c for _, c in rotations]
    lps = iter(
        shared_prefix_next_token_logprobs(
            run.model,
            pairs,
            letters,
            run.pad_id,
            run.batch_size,
            run.bf16,
            desc=desc,
            max_tokens=run.max_tokens,
        )
    )
    return [aggregate_rotations([next(lps) for _ in ex.choices], ex.gold_index) for ex in examples]


Scored = tuple[list[int], list[int], int]  # (prompt, continuation, how many of its last tokens are scored)


def loglik_pairs(
    enc: AnswerEncoder, examples: list[Example], mcq_format: McqFormat, anchors: list[list[int]] | None = None
) -> list[Scored]:
    """Every option of every example, in order: its cloze prompt and " <option>" tokens.

    With `anchors` (each example's student prompt), a cloze prompt that extends its anchor
    (open_answer: the same task, then `ANSWER_PREFIX`) is cut at the anchor: the tokens
    between go into the continuation, unscored, so the options share one forward of the
    anchor with whatever else is scored after it (the evaluation's gold response and own
    answer)."""
    out: list[Scored] = []
    for k, ex in enumerate(examples):
        for c in ex.choices:
            prompt, option = enc.split(cloze_text(ex, mcq_format), f" {c.strip()}")
            anchor = anchors[k] if anchors is not None else prompt
            if prompt[: len(anchor)] == anchor:
                out.append((anchor, prompt[len(anchor) :] + option, len(option)))
            else:
                out.append((prompt, option, len(option)))
    return out


def loglik_records(examples: list[Example], logprobs: list[torch.Tensor], pairs: list[Scored]) -> list[dict[str, Any]]:
    """`aggregate_loglik` per example from the log-probs of its `loglik_pairs`."""
    sums = iter(float(lp[len(lp) - scored :].sum()) for lp, (_, _, scored) in zip(logprobs, pairs))
    return [
        aggregate_loglik([next(sums) for _ in ex.choices], [len(c.strip()) for c in ex.choices], ex.gold_index)
        for ex in examples
    ]
