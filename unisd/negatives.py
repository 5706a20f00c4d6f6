"""Wrong demonstrations c⁻ for the token-level contrastive loss (docs/method.md §2.3).

A negative takes the gold demonstration's place in the privileged template
(`prompts.teacher_messages`), so it is written in exactly the gold response's format: the
two teacher contexts should differ only in what is wrong.

* Programmatic negatives, verified wrong (our addition: small models write poor
  negatives): MCQ argues for a wrong option in the gold rationale's form; code is an AST
  mutation of the reference of one named bug type (`unisd.code_mutants`) that fails a
  test the reference passes; tool use calls a wrong function or passes wrong arguments.
* Self-generated negatives (the reference's method): `negative_request` is what the
  model is asked, `clean_self_generated` normalises its reply and keeps it only when it
  is wrong in the requested way; code replies are then run by `verify_negatives`. The
  model calls live in the pipeline, not here.

Examples without a verified negative are absent from the returned mappings; the caller
drops them from the contrastive loss and counts them.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Literal

from unisd.code_mutants import BUG_TYPES, code_mutants, parse_dump
from unisd.data.schema import LETTERS, Example
from unisd.prompts import McqFormat, gold_response, mcq_response, task_text
from unisd.sandbox import Limits, run_many
from unisd.scoring import code_program, extract_code, parse_answer, parse_react, tool_scores

log = logging.getLogger(__name__)

TASKS = ("mcq", "code", "tool")
TOOL_MISTAKES = ("wrong_action", "wrong_arguments")


@dataclass(frozen=True)
class Negative:
    """A wrong demonstration in the student's output format.

    `kind` says what is wrong ("wrong_option:C", "off_by_one", "wrong_action:getForecast",
    "dropped_argument:city", ...); `verified` that it was checked to be wrong (code: it
    fails a test that the reference passes).
    """

    text: str
    kind: str
    verified: bool
    source: Literal["programmatic", "self"] = "programmatic"


# --------------------------------------------------------------------------- programmatic


def programmatic_negatives(
    examples: list[Example],
    per_example: int = 4,
    seed: int = 0,
    limits: Limits = Limits(),
    workers: int = 2,
    mcq_format: McqFormat = "reason_first",
) -> dict[str, list[Negative]]:
    """Up to `per_example` verified-wrong negatives per example id (MCQ ones in `mcq_format`).

    Candidates are drawn in a seeded order, spread over wrong letters, bug types or kinds
    of tool mistake; code candidates are checked in sandbox batches across all examples,
    only as many per round as each example still needs.
    """
    pools = {ex.id: _Pool(_candidates(ex, seed, mcq_format)) for ex in examples}
    for ex_id in _failing_references([ex for ex in examples if ex.task == "code"], limits, workers):
        pools[ex_id] = _Pool([])
    while batch := [
        (ex, group, neg) for ex in examples for group, neg in pools[ex.id].draw(per_example - len(pools[ex.id].kept))
    ]:
        flags = _wrong_flags([(ex, neg.text) for ex, _, neg in batch], limits, workers, mcq_format)
        for (ex, group, neg), wrong in zip(batch, flags):
            if wrong:
                pools[ex.id].keep(group, replace(neg, verified=True))
    return {ex_id: pool.kept for ex_id, pool in pools.items() if pool.kept}


class _Pool:
    """One example's untried candidates, grouped by kind of mistake. Drawing prefers the
    groups with the fewest verified negatives so far (seeded order on ties), so that a
    candidate that turns out not to be wrong is replaced by one of the same kind."""

    def __init__(self, groups: list[list[Negative]]) -> None:
        self.groups = [deque(group) for group in groups]
        self.counts = [0] * len(groups)
        self.kept: list[Negative] = []

    def draw(self, n: int) -> list[tuple[int, Negative]]:
        order = sorted(range(len(self.groups)), key=self.counts.__getitem__)
        drawn: list[tuple[int, Negative]] = []
        while len(drawn) < n and any(self.groups):
            drawn += [(g, self.groups[g].popleft()) for g in order if self.groups[g]][: n - len(drawn)]
        return drawn

    def keep(self, group: int, negative: Negative) -> None:
        self.counts[group] += 1
        self.kept.append(negative)


def _candidates(ex: Example, seed: int, mcq_format: McqFormat) -> list[list[Negative]]:
    """Unverified negatives of one example, grouped by kind of mistake, in seeded order."""
    _require_task(ex)
    rng = random.Random(f"{seed}:{ex.id}")
    if ex.task == "mcq":
        return _mcq_candidates(ex, rng, mcq_format)
    if ex.task == "code":
        return _code_candidates(ex, rng)
    return _tool_candidates(ex, rng)


def _require_task(ex: Example) -> None:
    if ex.task not in TASKS:
        raise ValueError(f"{ex.id}: no way to make negatives for task type {ex.task!r} (supported: {', '.join(TASKS)})")


# MCQ


def _mcq_candidates(ex: Example, rng: random.Random, mcq_format: McqFormat) -> list[list[Negative]]:
    """Every wrong option once, round-robin from a seeded start (so one negative per example
    is not always the first wrong letter)."""
    wrong = _wrong_letters(ex)
    start = rng.randrange(len(wrong))
    return [[_mcq_negative(ex, wrong[(start + i) % len(wrong)], mcq_format)] for i in range(len(wrong))]


def _wrong_letters(ex: Example) -> list[str]:
    return [letter for letter in LETTERS[: len(ex.choices)] if letter != ex.answer]


def _wrong_letter(ex: Example, index: int) -> str:
    wrong = _wrong_letters(ex)
    return wrong[index % len(wrong)]


def _mcq_negative(ex: Example, letter: str, mcq_format: McqFormat) -> Negative:
    option = ex.choices[LETTERS.index(letter)]
    if ex.rationale.strip():
        reasoning = _redirect(ex.rationale, ex.choices[ex.gold_index], option)
    else:
        reasoning = f"The correct option is {letter}: {option}."
    return Negative(mcq_response(ex, letter, reasoning, mcq_format), f"wrong_option:{letter}", verified=False)


def _redirect(rationale: str, gold: str, wrong: str) -> str:
    """The gold rationale made to argue for `wrong`: where it names the gold option, it now
    names the wrong one; where it does not, a conclusion for the wrong one is appended."""
    gold, wrong = gold.strip(), wrong.strip()
    if len(gold) >= 2:
        mention = re.compile(rf"(?<!\w){re.escape(gold)}(?!\w)", re.IGNORECASE)
        redirected, n = mention.subn(lambda _: wrong, rationale)
        if n:
            return redirected
    return f"{rationale.strip()} So the answer is {wrong}."


# Code


def _code_candidates(ex: Example, rng: random.Random) -> list[list[Negative]]:
    groups = []
    for kind in BUG_TYPES:
        mutants = code_mutants(ex.answer, kind, ex.entry_point)
        rng.shuffle(mutants)
        groups.append([Negative(_code_text(m), kind, verified=False) for m in mutants])
    rng.shuffle(groups)
    return groups


def _code_text(code: str) -> str:
    """Same layout as `gold_response` for code."""
    return f"```python\n{code.strip()}\n```"


# Tool use

_FUNCTION = re.compile(
    r"^[ \t]*([A-Za-z_]\w*)[ \t]*:[^\n]*?(?:Parameters[ \t]*:|\n[ \t]*Parameters[ \t]*:)", re.MULTILINE
)


def _api_functions(tools: str) -> list[str]:
    """Function names in ToolAlpaca-style documentation: `name: description` lines that
    have a `Parameters:` part (the API's own name line has none)."""
    return list(dict.fromkeys(_FUNCTION.findall(tools)))


def _tool_candidates(ex: Example, rng: random.Random) -> list[list[Negative]]:
    actions = [
        _tool_negative(f"wrong_action:{name}", name, ex.action_input)
        for name in _api_functions(ex.tools)
        if name != ex.answer
    ]
    args = _json_object(ex.action_input)
    arguments = []
    for key in sorted(args):
        rest = {k: v for k, v in args.items() if k != key}
        arguments.append(_tool_negative(f"dropped_argument:{key}", ex.answer, _json(rest)))
        if (altered := _altered(args[key])) != args[key]:
            arguments.append(_tool_negative(f"altered_argument:{key}", ex.answer, _json({**args, key: altered})))
    groups = [actions, arguments]
    for group in groups:
        rng.shuffle(group)
    rng.shuffle(groups)
    return groups


def _tool_negative(
    kind: str,
    action: str,
    action_input: str,
    source: Literal["programmatic", "self"] = "programmatic",
    verified: bool = False,
) -> Negative:
    """Same layout as `gold_response` for tool use."""
    text = f"Thought: I should call {action}.\nAction: {action}\nAction Input: {action_input}"
    return Negative(text, kind, verified, source)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _json(value: Any) -> str:
    """Canonical JSON, as the loaders store `action_input`."""
    return json.dumps(value, sort_keys=True)


def _altered(value: Any) -> Any:
    """A plausible wrong value of the same type; the value itself when there is none."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        words = value.split()
        return " ".join(words[:-1]) if len(words) > 1 else ""
    if isinstance(value, list):
        return value[:-1]
    return value


# --------------------------------------------------------------------------- verification


def verify_negatives(
    examples: list[Example],
    negatives: dict[str, list[Negative]],
    limits: Limits = Limits(),
    workers: int = 2,
    mcq_format: McqFormat = "reason_first",
) -> dict[str, list[Negative]]:
    """The negatives that really are wrong, marked verified; examples left with none are absent.

    MCQ: the parsed letter is a wrong one; tool: not fully correct; code: fails a test in
    the sandbox (one batch for all), counted only where the reference itself passes.
    """
    by_id = {ex.id: ex for ex in examples}
    code_examples = [by_id[ex_id] for ex_id in negatives if by_id[ex_id].task == "code"]
    unsound = set(_failing_references(code_examples, limits, workers))
    pairs = [(by_id[ex_id], neg) for ex_id, negs in negatives.items() if ex_id not in unsound for neg in negs]
    flags = _wrong_flags([(ex, neg.text) for ex, neg in pairs], limits, workers, mcq_format)
    out: dict[str, list[Negative]] = {}
    for (ex, neg), wrong in zip(pairs, flags):
        if wrong:
            out.setdefault(ex.id, []).append(replace(neg, verified=True))
    return out


def _wrong_flags(pairs: list[tuple[Example, str]], limits: Limits, workers: int, mcq_format: McqFormat) -> list[bool]:
    """Whether each demonstration is wrong for its example (code: fails a test)."""
    code = [(ex, text) for ex, text in pairs if ex.task == "code"]
    failed = iter([not ok for ok in _passes(code, limits, workers)])
    return [next(failed) if ex.task == "code" else _wrong_answer(ex, text, mcq_format) for ex, text in pairs]


def _wrong_answer(ex: Example, text: str, mcq_format: McqFormat) -> bool:
    if ex.task == "mcq":
        return parse_answer(text, ex.choices, mcq_format) not in (None, ex.answer)
    return not tool_scores(ex, text)["full"]


def _passes(pairs: list[tuple[Example, str]], limits: Limits, workers: int) -> list[bool]:
    if not pairs:
        return []
    results = run_many([code_program(ex, text) for ex, text in pairs], limits, workers)
    return [r.passed for r in results]


def _failing_references(examples: list[Example], limits: Limits, workers: int) -> list[str]:
    """Ids of code examples whose own reference fails their tests: a negative failing
    them too would prove nothing."""
    passed = _passes([(ex, gold_response(ex)) for ex in examples], limits, workers)
    failing = [ex.id for ex, ok in zip(examples, passed) if not ok]
    if failing:
        log.warning(
            "%d code example(s) get no negatives: the reference fails its own tests (%s)",
            len(failing),
            ", ".join(failing[:5]),
        )
    return failing


# --------------------------------------------------------------------------- self-generated

_BUG_HINTS = {
    "off_by_one": "an off-by-one error (a loop bound, index or limit that is one too large or too small)",
    "wrong_operator": "a wrong operator (for example + instead of -, < instead of <=, == instead of !=, "
    "or `and` instead of `or`)",
    "missing_edge_case": "a missing edge case (for example no check for empty input, zero or a boundary value)",
    "wrong_return": "a wrong return value (for example the wrong variable, None, or the negated result)",
}


def negative_request(ex: Example, index: int, mcq_format: McqFormat = "reason_first") -> str:
    """The text asking the model for its `index`-th wrong demonstration (docs/method.md §2.3):
    round-robin over wrong letters (MCQ), bug types (code) or kinds of mistake (tool)."""
    _require_task(ex)
    if ex.task == "mcq":
        letter = _wrong_letter(ex, index)
        option = ex.choices[LETTERS.index(letter)]
        where = "end" if mcq_format == "reason_first" else "start"
        claim, line = (option, option) if mcq_format == "open_answer" else (f"option {letter} ({option})", letter)
        ask = (
            f"Write a short, convincing response that argues that the answer is {claim}, without hedging. "
            f"Use the format above and {where} with the line 'Answer: {line}'."
        )
    elif ex.task == "code":
        bug = BUG_TYPES[index % len(BUG_TYPES)]
        ask = (
            f"Here is a correct solution:\n{gold_response(ex)}\n\n"
            f"Rewrite it with one subtle bug: {_BUG_HINTS[bug]}. Keep the function name and signature, "
            "do not point out the bug in comments, and reply with the complete function "
            "in a single ```python code block."
        )
    else:
        mistake = (
            f"call a different function than {ex.answer}, one that does not fulfil the request"
            if TOOL_MISTAKES[index % len(TOOL_MISTAKES)] == "wrong_action"
            else f"call {ex.answer} with wrong arguments (one missing, or a wrong value)"
        )
        ask = (
            f"Here is the correct next call:\n{gold_response(ex)}\n\n"
            f"Write a plausible but wrong call instead: {mistake}. Do not say that it is wrong. "
            "Reply in the format above (Thought, Action, Action Input)."
        )
    return f"{task_text(ex, mcq_format)}\n\n{ask}"


def clean_self_generated(
    ex: Example, request_index: int, text: str, mcq_format: McqFormat = "reason_first"
) -> Negative | None:
    """The model's reply to `negative_request(ex, request_index, mcq_format)` in the
    student's output format, or None when it is malformed or not wrong in the requested way.

    MCQ and tool replies come back verified; code comes back unverified (it must fail a
    test in the sandbox): pass it through `verify_negatives`, which batches the runs.
    """
    _require_task(ex)
    if ex.task == "mcq":
        return _clean_mcq(ex, _wrong_letter(ex, request_index), text, mcq_format)
    if ex.task == "code":
        return _clean_code(ex, BUG_TYPES[request_index % len(BUG_TYPES)], text)
    return _clean_tool(ex, text)


_ANSWER_ONLY = re.compile(r"^\W*answer\W*(?:is\W*)?\(?[A-J]\)?\W*$", re.IGNORECASE)
_REASONING_LABEL = re.compile(r"^[*\s]*reason(?:ing)?[*\s]*:[*\s]*", re.IGNORECASE)


def _clean_mcq(ex: Example, letter: str, text: str, mcq_format: McqFormat) -> Negative | None:
    """The reply's reasoning (answer-only lines and the Reasoning/Reason label removed),
    rewritten in `mcq_format` with the requested letter."""
    if parse_answer(text, ex.choices, mcq_format) != letter:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not _ANSWER_ONLY.match(line)]
    reasoning = _REASONING_LABEL.sub("", " ".join(lines)).strip()
    if not reasoning:
        return None
    return Negative(
        mcq_response(ex, letter, reasoning, mcq_format), f"wrong_option:{letter}", verified=True, source="self"
    )


def _clean_code(ex: Example, bug: str, text: str) -> Negative | None:
    code = extract_code(text)
    if ex.entry_point and not re.search(rf"def\s+{re.escape(ex.entry_point)}\s*\(", code):
        code = ex.code_prompt + code  # a body-only reply, completed as scoring does
    dump = parse_dump(code)
    if dump is None or dump == parse_dump(ex.answer):
        return None
    return Negative(_code_text(code), bug, verified=False, source="self")


def _clean_tool(ex: Example, text: str) -> Negative | None:
    name, raw = parse_react(text)
    if not name or not raw:
        return None
    try:
        action_input = _json(json.loads(raw))
    except json.JSONDecodeError:
        action_input = raw.strip()
    kind = "wrong_arguments" if name == ex.answer else f"wrong_action:{name}"
    negative = _tool_negative(kind, name, action_input, source="self", verified=True)
    return None if tool_scores(ex, negative.text)["full"] else negative
