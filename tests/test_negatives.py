"""Negatives for the contrastive loss are in the gold format and really wrong (docs/method.md §2.3)."""

import ast
import difflib
import json

import pytest

from unisd.code_mutants import BUG_TYPES, code_mutants
from unisd.data.schema import Example
from unisd.negatives import Negative, clean_self_generated, negative_request, programmatic_negatives, verify_negatives
from unisd.prompts import gold_response
from unisd.sandbox import Limits, run_many
from unisd.scoring import code_program, parse_mcq, tool_scores

FAST = Limits(timeout_s=3, memory_mb=256)

MCQ_PLAIN = Example(
    id="q1",
    benchmark="t",
    task="mcq",
    question="Which gas do plants give off?",
    choices=["nitrogen", "oxygen", "helium", "argon"],
    answer="B",
)
MCQ_RATIONALE = Example(
    id="q2",
    benchmark="t",
    task="mcq",
    question="Which gas do plants give off?",
    choices=["carbon dioxide", "oxygen", "helium"],
    answer="B",
    rationale="Photosynthesis releases Oxygen as a by-product.",
)

COUNT_EVEN = """def count_even(nums):
    # an empty list has no even numbers
    if not nums:
        return 0
    count = 0
    for n in nums:
        if n % 2 == 0:
            count += 1
    return count
"""
MBPP = Example(
    id="mbpp-1",
    benchmark="mbpp",
    task="code",
    question="Count the even numbers in a list.",
    answer=COUNT_EVEN,
    tests=[
        "assert count_even([1, 2, 4]) == 2",
        "assert count_even([]) == 0",
        "assert count_even([3, 5, 6, 8, 10]) == 3",
    ],
)
# Dropping the guard is an equivalent mutant: the loop already gives 0 for an empty list.
EQUIVALENT = COUNT_EVEN.replace("    if not nums:\n        return 0\n", "")

HE_PROMPT = '''def _bump(x):
    return x + 1


def add_above(xs: list, k: int = 1) -> int:
    """Sum of the elements greater than k."""
'''
HUMANEVAL = Example(
    id="HumanEval-0",
    benchmark="humaneval",
    task="code",
    question=HE_PROMPT,
    code_prompt=HE_PROMPT,
    answer=HE_PROMPT + "    total = 0\n    for x in xs:\n        if x > k:\n            total += x\n    return total\n",
    entry_point="add_above",
    tests=[
        "def check(candidate):\n    assert candidate([1, 2, 3], 1) == 5\n"
        "    assert candidate([5], 5) == 0\n    assert candidate([-1, 0], -1) == 0\n"
        "    assert candidate([2, 2]) == 4\n"
    ],
)

TOOLS = (
    "WeatherAPI: Weather data.\n"
    "getCurrent: Current weather of a city.\n"
    'Parameters: {"city": "Required. string.", "units": "string."}\n'
    "Output: The weather.\n - Format: application/json\n"
    "getForecast: Forecast for a city.\n"
    'Parameters: {"city": "Required. string.", "days": "integer."}\n'
    "Output: The forecast.\n"
)
TOOL = Example(
    id="tool-1",
    benchmark="toolalpaca",
    task="tool",
    question="What's the weather in New York now?",
    tools=TOOLS,
    answer="getCurrent",
    action_input=json.dumps({"city": "New York", "units": "metric"}, sort_keys=True),
)


def norm(code: str) -> str:
    return ast.unparse(ast.parse(code))


def passes(ex: Example, texts: list[str]) -> list[bool]:
    return [r.passed for r in run_many([code_program(ex, t) for t in texts], FAST)]


# ------------------------------------------------------------------------------- MCQ


def test_mcq_negatives_cover_the_wrong_letters_round_robin_in_the_gold_format():
    negs = programmatic_negatives([MCQ_PLAIN, MCQ_RATIONALE], per_example=5, seed=3)
    letters = [n.kind.split(":")[1] for n in negs["q1"]]
    assert sorted(letters) == ["A", "C", "D"]  # every wrong letter once, never the gold one
    start = "ACD".index(letters[0])
    assert letters == [("ACD" * 2)[start + i] for i in range(3)]
    for n in negs["q1"]:
        letter = n.kind[-1]
        assert n.verified and n.source == "programmatic"
        assert n.text == gold_response(MCQ_PLAIN.model_copy(update={"answer": letter}))  # same template
        assert parse_mcq(n.text, MCQ_PLAIN.choices) == letter
    assert len(programmatic_negatives([MCQ_PLAIN], per_example=2, seed=3)["q1"]) == 2


def test_mcq_negative_keeps_the_rationale_but_points_at_the_wrong_option():
    negs = {n.kind: n.text for n in programmatic_negatives([MCQ_RATIONALE], per_example=2)["q2"]}
    assert negs["wrong_option:A"] == "Reasoning: Photosynthesis releases carbon dioxide as a by-product.\nAnswer: A"
    assert negs["wrong_option:C"] == "Reasoning: Photosynthesis releases helium as a by-product.\nAnswer: C"
    no_mention = MCQ_RATIONALE.model_copy(update={"rationale": "Plants photosynthesise."})
    text = programmatic_negatives([no_mention], per_example=2)["q2"][0].text
    assert text.startswith("Reasoning: Plants photosynthesise. So the answer is ")


def test_mcq_requests_and_self_generated_cleaning():
    assert "option A (nitrogen)" in negative_request(MCQ_PLAIN, 0)
    assert "option D (argon)" in negative_request(MCQ_PLAIN, 2) and "'Answer: A'" in negative_request(MCQ_PLAIN, 3)
    reply = "**Reasoning:** Nitrogen makes up most\nof the air plants breathe out.\n\n**Answer:** A"
    neg = clean_self_generated(MCQ_PLAIN, 0, reply)
    assert neg == Negative(
        "Reasoning: Nitrogen makes up most of the air plants breathe out.\nAnswer: A", "wrong_option:A", True, "self"
    )
    assert clean_self_generated(MCQ_PLAIN, 0, "Reasoning: Plants release oxygen.\nAnswer: B") is None  # gold
    assert clean_self_generated(MCQ_PLAIN, 1, reply) is None  # asked for C, argued for A
    assert clean_self_generated(MCQ_PLAIN, 0, "Answer: A") is None  # no argument at all


# ------------------------------------------------------------------------------- code mutations


def mutants(src: str, kind: str) -> set[str]:
    return {norm(m) for m in code_mutants(src, kind)}


def test_off_by_one_moves_range_bounds_indices_and_compared_constants():
    src = "def f(xs):\n    for i in range(len(xs) - 1):\n        if xs[i] > 2:\n            return xs[0]\n"
    got = mutants(src, "off_by_one")
    assert norm(src.replace("range(len(xs) - 1)", "range(len(xs))")) in got  # folded, not `- 1 + 1`
    assert norm(src.replace("range(len(xs) - 1)", "range(len(xs) - 2)")) in got
    assert norm(src.replace("> 2", "> 3")) in got and norm(src.replace("> 2", "> 1")) in got
    assert norm(src.replace("xs[0]", "xs[1]")) in got and norm(src.replace("xs[0]", "xs[-1]")) in got
    assert len(got) == 6  # `xs[i]` is not an obvious count, so it is left alone


def test_wrong_operator_swaps_one_operator():
    src = "def f(a, b):\n    if a < b and a != 0:\n        return a + b\n    return a * b\n"
    assert mutants(src, "wrong_operator") == {
        norm(src.replace(old, new, 1))
        for old, new in [("<", "<="), ("!=", "=="), (" and ", " or "), ("a + b", "a - b"), ("a * b", "a // b")]
    }
    assert code_mutants("def g(s):\n    return s + '!'\n", "wrong_operator") == []  # would only crash


def test_missing_edge_case_drops_guards_or_inverts_conditions():
    src = "def f(xs):\n    if not xs:\n        return 0\n    if len(xs) > 3:\n        xs = xs[:3]\n    return sum(xs)\n"
    assert mutants(src, "missing_edge_case") == {
        norm("def f(xs):\n    if len(xs) > 3:\n        xs = xs[:3]\n    return sum(xs)\n"),  # guard dropped
        norm(src.replace("if not xs", "if xs")),
        norm(src.replace("if len(xs) > 3", "if not len(xs) > 3")),
    }
    head, tail = "def g(x):\n    if x > 0:\n        y = 1\n", "    else:\n        y = 3\n    return y\n"
    chain = head + "    elif x < -5:\n        return 2\n" + tail
    assert norm(head + tail) in mutants(chain, "missing_edge_case")  # an `elif` guard drops to its `else`


def test_wrong_return_negates_booleans_or_returns_the_argument_or_none():
    src = "def f(n, m):\n    if n < 0:\n        return False\n    return n % m == 0\n"
    assert mutants(src, "wrong_return") == {
        norm(src.replace("return False", "return True")),
        norm(src.replace("return n % m == 0", "return not n % m == 0")),
    }
    assert mutants("def g(x, y):\n    return x + y\n", "wrong_return") == {
        norm("def g(x, y):\n    return x\n"),
        norm("def g(x, y):\n    return None\n"),
    }


def test_mutants_keep_the_reference_text_outside_the_bug():
    for kind in BUG_TYPES:
        for m in code_mutants(COUNT_EVEN, kind):
            assert "# an empty list has no even numbers" in m
            diff = difflib.ndiff(COUNT_EVEN.splitlines(), m.splitlines())
            assert 1 <= sum(line.startswith("- ") for line in diff) <= 2


def test_humaneval_mutates_only_the_entry_point_body():
    found = [m for kind in BUG_TYPES for m in code_mutants(HUMANEVAL.answer, kind, HUMANEVAL.entry_point)]
    assert found and all(m.startswith(HE_PROMPT) for m in found)  # helper, signature, docstring kept


# ------------------------------------------------------------------------------- verified code negatives


def test_code_negatives_fail_a_test_the_reference_passes_and_equivalent_mutants_are_dropped():
    negs = programmatic_negatives([MBPP, HUMANEVAL], per_example=20, seed=0, limits=FAST)
    assert passes(MBPP, [gold_response(MBPP)]) == [True] and passes(HUMANEVAL, [gold_response(HUMANEVAL)]) == [True]
    for ex in (MBPP, HUMANEVAL):
        texts = [n.text for n in negs[ex.id]]
        assert all(n.verified and n.kind in BUG_TYPES for n in negs[ex.id])
        assert not any(passes(ex, texts))
        assert all(t.startswith("```python\n") and t.endswith("\n```") for t in texts)
    mbpp_codes = {norm(n.text.removeprefix("```python\n").removesuffix("```")) for n in negs["mbpp-1"]}
    assert norm(EQUIVALENT) in mutants(COUNT_EVEN, "missing_edge_case")  # it was a candidate ...
    assert norm(EQUIVALENT) not in mbpp_codes  # ... but passes every test, so it is no negative
    assert {n.kind for n in negs["mbpp-1"]} == set(BUG_TYPES)


def test_programmatic_negatives_are_deterministic_and_diverse_for_a_seed():
    first = programmatic_negatives([MBPP, TOOL, MCQ_PLAIN], per_example=4, seed=7, limits=FAST)
    assert first == programmatic_negatives([MBPP, TOOL, MCQ_PLAIN], per_example=4, seed=7, limits=FAST)
    assert {n.kind for n in first["mbpp-1"]} == set(BUG_TYPES)  # the first four span the bug types


def test_a_reference_that_fails_its_own_tests_gets_no_negatives():
    broken = MBPP.model_copy(update={"id": "mbpp-broken", "tests": ["assert count_even([2]) == 5"]})
    assert "mbpp-broken" not in programmatic_negatives([broken], per_example=2, limits=FAST)


# ------------------------------------------------------------------------------- tool use


def test_tool_negatives_use_another_function_or_wrong_arguments():
    negs = programmatic_negatives([TOOL], per_example=10, seed=1)["tool-1"]
    kinds = {n.kind for n in negs}
    assert kinds == {
        "wrong_action:getForecast",
        "dropped_argument:city",
        "dropped_argument:units",
        "altered_argument:city",
        "altered_argument:units",
    }  # the API's own name is no function
    for n in negs:
        assert not tool_scores(TOOL, n.text)["full"]
        assert n.text.startswith("Thought: I should call ") and "\nAction: " in n.text
    altered = next(n for n in negs if n.kind == "altered_argument:city").text
    assert altered.endswith('Action Input: {"city": "New", "units": "metric"}')


def test_tool_requests_and_self_generated_cleaning():
    assert "different function than getCurrent" in negative_request(TOOL, 0)
    assert "getCurrent with wrong arguments" in negative_request(TOOL, 1)
    reply = 'Thought: Forecast it.\nAction: getForecast\nAction Input: {"units": "metric", "city": "New York"}'
    neg = clean_self_generated(TOOL, 0, reply)
    assert neg.kind == "wrong_action:getForecast" and neg.verified
    assert neg.text == gold_response(TOOL).replace("getCurrent", "getForecast")
    correct = 'Thought: ok\nAction: getCurrent\nAction Input: {"units": "metric", "city": "New York"}'
    assert clean_self_generated(TOOL, 1, correct) is None
    assert clean_self_generated(TOOL, 1, "I would rather not.") is None


# ------------------------------------------------------------------------------- self-generated code


def test_code_requests_round_robin_over_bug_types():
    assert ["off-by-one" in negative_request(MBPP, i) for i in (0, 4)] == [True, True]
    assert "wrong operator" in negative_request(MBPP, 1) and "missing edge case" in negative_request(MBPP, 2)
    assert "wrong return value" in negative_request(MBPP, 3) and COUNT_EVEN.strip() in negative_request(MBPP, 3)


def test_self_generated_code_is_kept_only_when_it_fails_a_test():
    buggy = "```python\ndef count_even(nums):\n    return sum(1 for n in nums if n % 2 == 1)\n```"
    correct = "Here:\n```python\ndef count_even(nums):\n    return sum(1 for n in nums if n % 2 == 0)\n```"
    cleaned = [clean_self_generated(MBPP, i, t) for i, t in enumerate([buggy, correct])]
    assert [n.kind for n in cleaned] == ["off_by_one", "wrong_operator"] and not any(n.verified for n in cleaned)
    assert clean_self_generated(MBPP, 0, gold_response(MBPP)) is None  # the reference itself
    assert clean_self_generated(MBPP, 0, "```python\ndef count_even(nums:\n```") is None  # does not parse
    body_only = clean_self_generated(HUMANEVAL, 0, "```python\n    return sum(xs)\n```")
    assert body_only.text.startswith("```python\n" + HE_PROMPT.strip())  # completed like scoring does
    kept = verify_negatives([MBPP, HUMANEVAL], {"mbpp-1": cleaned, "HumanEval-0": [body_only]}, FAST)
    assert kept == {
        "mbpp-1": [Negative(cleaned[0].text, "off_by_one", True, "self")],
        "HumanEval-0": [Negative(body_only.text, "off_by_one", True, "self")],
    }


def test_unsupported_task_type_is_a_clear_error():
    odd = Example.model_construct(id="s1", task="summary", question="Summarise.", answer="x")
    for call in (
        lambda: programmatic_negatives([odd]),
        lambda: negative_request(odd, 0),
        lambda: clean_self_generated(odd, 0, "x"),
    ):
        with pytest.raises(ValueError, match="task type 'summary'"):
            call()
