"""The paper suite's loaders, on small fixture files written in the public hub schemas.

Expected values come from the fixture files (tests/fixtures/paper), read by hand.
"""

import json
from pathlib import Path

import pytest

from unisd.data import DataError, Example, load_benchmark
from unisd.data.convert import balance_letters, rotate_options
from unisd.sandbox import Limits, run_many
from unisd.scoring import code_program

FIXTURES = Path(__file__).parent / "fixtures"
PAPER = FIXTURES / "paper"
BAD = FIXTURES / "bad"


def load(name: str, seed: int = 0, folder: Path | None = None) -> dict[str, list[Example]]:
    return load_benchmark("paper", name, seed, source=str(folder or PAPER / name))


def by_id(splits: dict[str, list[Example]]) -> dict[str, Example]:
    return {ex.id: ex for exs in splits.values() for ex in exs}


def gold_text(ex: Example) -> str:
    return ex.choices[ex.gold_index]


# ------------------------------------------------------------------ ScienceQA


def test_scienceqa_splits_skip_image_rows():
    splits = load("scienceqa")
    assert {k: sorted(e.id for e in v) for k, v in splits.items()} == {
        "train": ["scienceqa-train-00001", "scienceqa-train-00003", "scienceqa-train-00004", "scienceqa-train-00005"],
        "validation": ["scienceqa-validation-00001", "scienceqa-validation-00002", "scienceqa-validation-00003"],
        "test": ["scienceqa-test-00001", "scienceqa-test-00003", "scienceqa-test-00004"],
    }
    questions = " ".join(e.question for e in by_id(splits).values())
    assert "Tom and Justin" not in questions and "walking on snow" not in questions


def test_scienceqa_gold_letters_point_at_the_gold_option():
    ex = by_id(load("scienceqa"))
    expected = {
        "scienceqa-train-00001": ("West Virginia", {"West Virginia", "Louisiana", "Arizona", "Oklahoma"}),
        "scienceqa-train-00003": ("future tense", {"present tense", "future tense", "past tense"}),
        "scienceqa-train-00004": ("a good", {"a good", "a service"}),
        "scienceqa-train-00005": ("little", {"lamb", "little"}),
        "scienceqa-validation-00001": ("Mr. Hammond was having a bad day.", None),
        "scienceqa-validation-00003": ("7 liters", {"7 liters", "7 milliliters"}),
        "scienceqa-test-00001": ("simile", {"simile", "metaphor", "onomatopoeia"}),
        "scienceqa-test-00003": ("physical change", {"physical change", "chemical change"}),
        "scienceqa-test-00004": ("Dear Aunt Sue,", None),
    }
    for ex_id, (gold, options) in expected.items():
        assert gold_text(ex[ex_id]) == gold, ex_id
        if options:
            assert sorted(ex[ex_id].choices) == sorted(options) and len(ex[ex_id].choices) == len(options)


def test_scienceqa_context_and_rationale():
    ex = by_id(load("scienceqa"))
    first = ex["scienceqa-train-00001"]
    assert first.context.startswith("Maps have four cardinal directions")  # lecture only: the hint is empty
    assert first.rationale.endswith("West Virginia is farthest north.")
    guide = ex["scienceqa-train-00005"]
    assert guide.context.split("\n")[0] == "Use alphabetical order."  # the hint, then the lecture
    assert guide.context.split("\n")[1].startswith("Guide words appear on each page")
    assert guide.question == (
        "Which word would you find on a dictionary page with the following guide words?\nlever - loose"
    )
    assert guide.task == "mcq" and guide.benchmark == "scienceqa"


# ------------------------------------------------------------------ GPQA


def test_gpqa_options_are_shuffled_and_stripped():
    splits = load("gpqa")
    assert list(splits) == ["test"] and len(splits["test"]) == 4
    ex = by_id(splits)
    assert sorted(ex) == [
        "gpqa-recFx1Spin00001",
        "gpqa-recFx2Pcc000002",
        "gpqa-recFx3Pol000003",
        "gpqa-recFx4Par000004",
    ]
    assert gold_text(ex["gpqa-recFx1Spin00001"]) == "4/5"
    assert gold_text(ex["gpqa-recFx2Pcc000002"]) == "Pyridinium chlorochromate (PCC) in dichloromethane"
    assert gold_text(ex["gpqa-recFx3Pol000003"]) == "DNA polymerase I"
    parallax = ex["gpqa-recFx4Par000004"]
    assert gold_text(parallax) == "20 parsecs"
    assert sorted(parallax.choices) == ["0.05 parsecs", "20 parsecs", "200 parsecs", "5 parsecs"]
    assert parallax.rationale == "d = 1/p = 1/0.05 = 20 pc."
    # The hub lists the correct answer first: after shuffling it must not always be A.
    assert len({e.answer for e in ex.values()}) > 1


# ------------------------------------------------------------------ CoS-E

COS_E_TRAIN_GOLD = {
    "cos_e-4b1a27f9e1b8c0d2a3f4e5d6c7b8a901": "sink",
    "cos_e-5c2b38a0f2c9d1e3b4a5f6e7d8c9b012": "sleep",
    "cos_e-6d3c49b1a3dae2f4c5b6a7f8e9dac123": "refrigerator",
    "cos_e-7e4d5ac2b4ebf3a5d6c7b8a9faebd234": "chalk",
    "cos_e-8f5e6bd3c5fca4b6e7d8c9bafbfce345": "library",
    "cos_e-9a6f7ce4d6adb5c7f8e9dacbacadf456": "it becomes ice",
}


def test_cos_e_splits_gold_and_explanations():
    splits = load("cos_e")
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "validation": 1, "test": 3}
    ex = by_id(splits)
    for ex_id, gold in COS_E_TRAIN_GOLD.items():
        assert gold_text(ex[ex_id]) == gold and len(ex[ex_id].choices) == 5
    assert gold_text(ex["cos_e-a17a8df5e7bec6d8a9fadbdcbdbea567"]) == "car"
    assert gold_text(ex["cos_e-b28b9ea6f8cfd7e9bafbecedcecfb678"]) == "license"
    assert gold_text(ex["cos_e-c39cafb7a9dae8facbacfdfedfdac789"]) == "cash"
    assert ex["cos_e-4b1a27f9e1b8c0d2a3f4e5d6c7b8a901"].rationale == "dirty plates are washed in the sink"
    assert sorted(ex["cos_e-9a6f7ce4d6adb5c7f8e9dacbacadf456"].choices) == sorted(
        ["it boils", "it becomes ice", "it evaporates", "it burns", "it melts"]
    )


@pytest.mark.parametrize(
    "name, train_ids",
    [
        ("cos_e", set(COS_E_TRAIN_GOLD)),
        (
            "toolalpaca",
            {
                "toolalpaca-train-0001-01",
                "toolalpaca-train-0001-02",
                "toolalpaca-train-0002-01",
                "toolalpaca-train-0002-02",
                "toolalpaca-train-0002-03",
            },
        ),
    ],
)
def test_validation_is_carved_from_train_deterministically(name, train_ids):
    picks = []
    for seed in range(6):
        splits = load(name, seed)
        train, val = {e.id for e in splits["train"]}, {e.id for e in splits["validation"]}
        assert len(val) == 1 and not train & val and train | val == train_ids  # 5 or 6 rows: max(n // 10, 1)
        assert {e.id for e in load(name, seed)["validation"]} == val  # same seed, same carve
        picks.append(val)
    assert len({frozenset(v) for v in picks}) > 1  # the carve follows the seed


def test_option_order_is_per_example_and_deterministic():
    a, b, other = by_id(load("cos_e", 3)), by_id(load("cos_e", 3)), by_id(load("cos_e", 4))
    assert {k: (v.choices, v.answer) for k, v in a.items()} == {k: (v.choices, v.answer) for k, v in b.items()}
    # The cyclic option order belongs to the example; the split seed only rotates it (balanced letters).
    for k, ex in a.items():
        assert is_rotation(other[k].choices, ex.choices) and gold_text(other[k]) == gold_text(ex), k
    # It differs between examples: the gold is not always at the same place, and the orders are not all
    # the hub's order (gold first or wherever the hub put it).
    assert len({e.answer for e in a.values()}) > 1
    moved = [e for e in a.values() if e.answer != "ABCDE"[_hub_gold_index(e)]]
    assert moved


def _hub_gold_index(ex: Example) -> int:
    rows = [json.loads(line) for path in (PAPER / "cos_e").glob("*.jsonl") for line in path.read_text().splitlines()]
    row = next(r for r in rows if f"cos_e-{r['id']}" == ex.id)
    return row["choices"].index(row["answer"])


def test_example_order_follows_the_seed():
    a, b, c = load("scienceqa", 0), load("scienceqa", 0), load("scienceqa", 1)
    assert [[e.model_dump() for e in v] for v in a.values()] == [[e.model_dump() for e in v] for v in b.values()]
    assert [[e.id for e in v] for v in a.values()] != [[e.id for e in v] for v in c.values()]
    assert {k: sorted(e.id for e in v) for k, v in a.items()} == {k: sorted(e.id for e in v) for k, v in c.items()}


# ------------------------------------------------------------------ balanced gold letters


def is_rotation(choices: list[str], source: list[str]) -> bool:
    """Brute force: some cyclic shift of `source` is `choices`."""
    return any(source[s:] + source[:s] == choices for s in range(len(source)))


def mcq(ex_id: str, choices: str, answer: str) -> Example:
    return Example(id=ex_id, benchmark="t", task="mcq", question="q?", choices=list(choices), answer=answer)


def test_rotate_options_hand_worked():
    ex = mcq("x", "abcd", "B")
    assert (rotate_options(ex, 1).choices, rotate_options(ex, 1).answer) == (list("bcda"), "A")
    assert (rotate_options(ex, -1).choices, rotate_options(ex, -1).answer) == (list("dabc"), "C")
    assert rotate_options(ex, 4) == ex and rotate_options(ex, 0) == ex
    assert rotate_options(ex, 2).id == "x"


def test_balance_letters_follows_permutation_blocks_per_option_count():
    # 8 three-option items (gold always A) and 9 four-option items (gold always D), interleaved, and a code item.
    items = [mcq(f"t{i}", "pqr", "A") if i % 2 else mcq(f"f{i}", "wxyz", "D") for i in range(17)]
    code = Example(id="c", benchmark="t", task="code", question="q", answer="pass", tests=["assert True"])
    out = balance_letters(items[:5] + [code] + items[5:], "key")
    assert out[5] == code and [e.id for e in out] == [e.id for e in items[:5]] + ["c"] + [e.id for e in items[5:]]
    for n, source in ((3, "pqr"), (4, "wxyz")):
        group = [e for e in out if e.task == "mcq" and len(e.choices) == n]
        letters = [e.answer for e in group]
        for start in range(0, len(letters) - n + 1, n):  # each aligned block is a permutation of the letters
            assert sorted(letters[start : start + n]) == list("ABCD"[:n]), (n, letters)
        for e in group:
            assert is_rotation(e.choices, list(source)) and e.choices[e.gold_index] == source[0 if n == 3 else 3]
    assert balance_letters(items, "key") == [e for e in out if e.task == "mcq"]  # deterministic
    assert [e.answer for e in balance_letters(items, "other")] != [e.answer for e in out if e.task == "mcq"]


def test_paper_splits_have_balanced_gold_letters():
    # One complete block each: GPQA's 4 four-option test items, CoS-E's 5 five-option train items.
    assert sorted(e.answer for e in load("gpqa")["test"]) == list("ABCD")
    for seed in range(4):
        assert sorted(e.answer for e in load("cos_e", seed)["train"]) == list("ABCDE")


# ------------------------------------------------------------------ MBPP


def test_mbpp_full_and_sanitized_schemas():
    splits = load("mbpp")
    assert {k: sorted(int(e.id.split("-")[1]) for e in v) for k, v in splits.items()} == {
        "train": [601, 602, 603, 604],
        "validation": [511, 512, 513],
        "test": [11, 12, 139],
    }
    ex = by_id(splits)
    first = ex["mbpp-601"]
    assert first.question == "Write a function to return the sum of the squares of the first n natural numbers."
    assert first.answer == "def square_sum(n):\n  return sum(i * i for i in range(1, n + 1))\n"  # CRLF cleaned
    assert first.tests == ["assert square_sum(2) == 5", "assert square_sum(3) == 14", "assert square_sum(4) == 30"]
    assert first.test_setup == "" and first.task == "code"
    assert ex["mbpp-604"].test_setup == "import math"
    sanitized = ex["mbpp-139"]  # "prompt" instead of "text", "test_imports" instead of "test_setup_code"
    assert sanitized.question == "Write a function to find the circumference of a circle."
    assert sanitized.test_setup == "import math"
    assert sanitized.tests[0].startswith("assert math.isclose(circle_circumference(10)")
    assert ex["mbpp-11"].tests[2] == 'assert remove_Occ("PHP","P") == "H"'


def test_mbpp_and_humaneval_references_pass_their_tests():
    examples = [*by_id(load("mbpp")).values(), *by_id(load("humaneval")).values()]
    results = run_many([code_program(e, e.answer) for e in examples], Limits(timeout_s=10, memory_mb=512), workers=4)
    assert [(e.id, r.status) for e, r in zip(examples, results)] == [(e.id, "passed") for e in examples]


# ------------------------------------------------------------------ HumanEval


def test_humaneval_entry_points_and_tests():
    splits = load("humaneval")
    assert list(splits) == ["test"]
    ex = by_id(splits)
    assert {k: v.entry_point for k, v in ex.items()} == {
        "HumanEval-0": "has_close_elements",
        "HumanEval-2": "truncate_number",
        "HumanEval-10": "make_palindrome",
    }
    zero = ex["HumanEval-0"]
    assert zero.code_prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert zero.question == zero.code_prompt
    assert zero.answer.startswith(zero.code_prompt) and "return False" in zero.answer
    assert len(zero.tests) == 1 and "def check(candidate):" in zero.tests[0]
    assert "def is_palindrome" in ex["HumanEval-10"].code_prompt  # the helper stays in the prompt


# ------------------------------------------------------------------ ToolAlpaca


def test_toolalpaca_train_format():
    splits = load("toolalpaca")
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 1, "test": 3}
    ex = {e.question: e for e in splits["train"] + splits["validation"]}
    assert sorted(ex) == sorted(
        [
            "What's the weather in Paris right now?",
            "Will it rain in Tokyo in the next three days?",  # the "Hint:" line is cut
            "Find books by Jane Austen.",
            "Give me details on the book with ISBN 9780141439518.",
            "Find 5 science fiction books published after 2010.",
        ]
    )  # the run without steps and the run starting with getDetails are skipped
    paris = ex["What's the weather in Paris right now?"]
    assert paris.answer == "getCurrentWeather"
    assert json.loads(paris.action_input) == {"city": "Paris", "units": "metric"}
    assert paris.tools.startswith("WeatherNow: Current weather and forecasts for any city\ngetCurrentWeather:")
    assert "getForecast: Get the daily forecast for a city." in paris.tools
    assert paris.meta == {"api": "WeatherNow"} and paris.task == "tool"
    tokyo = ex["Will it rain in Tokyo in the next three days?"]
    assert tokyo.answer == "getForecast" and tokyo.action_input == '{"city": "Tokyo", "days": 3}'  # keys sorted
    scifi = ex["Find 5 science fiction books published after 2010."]  # the first call, not the retry
    assert scifi.answer == "searchBooks"
    assert json.loads(scifi.action_input) == {"genre": "science fiction", "published_after": 2010, "limit": 5}
    assert ex["Find books by Jane Austen."].tools.startswith("BookFinder: Search books and get book details\n")


def test_toolalpaca_eval_format():
    test = {e.question: e for e in load("toolalpaca")["test"]}
    assert len(test) == 3
    usd = test["How much is 100 US dollars in euros?"]
    assert usd.answer == "convertCurrency"
    assert json.loads(usd.action_input) == {"from": "USD", "to": "EUR", "amount": 100}
    assert test["Show me today's exchange rates for the Japanese yen."].action_input == '{"base": "JPY"}'
    two_calls = test["I have 50 pounds and 20 euros; how many dollars is that in total?"]
    assert json.loads(two_calls.action_input) == {"from": "GBP", "to": "USD", "amount": 50}  # the first gold action
    assert "getRates: Latest exchange rates for a base currency." in usd.tools


def test_ids_are_unique_across_splits():
    for name in ("scienceqa", "cos_e", "mbpp", "toolalpaca"):
        ids = [e.id for v in load(name).values() for e in v]
        assert len(ids) == len(set(ids)), name


# ------------------------------------------------------------------ malformed files


@pytest.mark.parametrize(
    "name, case, file, words",
    [
        ("cos_e", "cos_e_answer_not_in_choices", "train.jsonl", ["row 3", "'freezer'", "not one of the choices"]),
        ("cos_e", "cos_e_no_test", "", ["no test.jsonl"]),
        ("scienceqa", "scienceqa_not_json", "train.jsonl", ["row 2", "not valid JSON"]),
        ("scienceqa", "scienceqa_answer_out_of_range", "train.jsonl", ["row 3", "IndexError"]),
        ("gpqa", "gpqa_missing_field", "test.jsonl", ["row 2", "missing field", "Incorrect Answer 3"]),
        ("mbpp", "mbpp_missing_tests", "train.jsonl", ["row 2", "missing field", "test_list"]),
        ("toolalpaca", "toolalpaca_missing_doc", "train.json", ["row 2", "missing field", "NLDocumentation"]),
        ("toolalpaca", "toolalpaca_not_json", "train.json", ["not valid JSON"]),
        ("toolalpaca", "toolalpaca_gold_mismatch", "train.json", ["row 1", "ValueError"]),
    ],
)
def test_malformed_rows_name_file_and_row(name, case, file, words):
    with pytest.raises(DataError) as err:
        load(name, folder=BAD / case)
    message = str(err.value)
    assert str(BAD / case / file) in message, message
    for word in words:
        assert word in message, message
