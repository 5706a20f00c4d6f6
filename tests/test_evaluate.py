"""The evaluation summary: MCQ statistics and top-level means, against hand-counted records."""

import pytest

from unisd.data.schema import Example
from unisd.evaluate import Item, overall_metrics, summarize


def item(n_choices: int, gold: str, parsed: str | None, finished: bool, **choice_fields) -> Item:
    ex = Example(
        id=f"q{gold}{parsed}",
        benchmark="sciq",
        task="mcq",
        question="q?",
        choices=[f"option {i}" for i in range(n_choices)],
        answer=gold,
    )
    record = {
        "gold": gold,
        "parsed": parsed,
        "correct": parsed == gold,
        "finished": finished,
        "completion_tokens": 10,
        **choice_fields,
    }
    return Item(ex, [1, 2, 3], record)


def choice(rot: float, gold_prob: float, circular: bool, ll: float, ll_norm: float) -> dict:
    return {
        "rot_correct": rot,
        "rot_gold_prob": gold_prob,
        "circular_correct": circular,
        "ll_correct": ll,
        "ll_norm_correct": ll_norm,
    }


ITEMS = [
    item(4, "A", "A", True, **choice(1.0, 0.7, True, 1.0, 0.0)),
    item(4, "B", "A", True, **choice(0.5, 0.4, False, 0.0, 1.0)),
    item(4, "B", None, False, **choice(0.0, 0.1, False, 0.0, 0.0)),
    item(4, "C", "A", True, **choice(1.0, 0.5, True, 1.0, 1.0)),
    item(3, "B", "C", True, **choice(0.0, 0.3, False, 0.0, 1.0)),
]


def test_mcq_summary_hand_counted():
    s = summarize(ITEMS, n_dropped=0)
    assert s["score"] == pytest.approx(20.0) and s["unparseable"] == 1
    assert s["parse_rate"] == pytest.approx(0.8) and s["finish_rate"] == pytest.approx(0.8)
    assert s["letter_hist"] == {"A": 3, "B": 0, "C": 1, "D": 0, "none": 1}
    assert s["gold_hist"] == {"A": 1, "B": 3, "C": 1, "D": 0}
    assert s["one_letter_baseline"] == pytest.approx(60.0)  # always "B": 3 of 5
    # percent means: rot (1 + .5 + 0 + 1 + 0) / 5, gold prob (.7 + .4 + .1 + .5 + .3) / 5, ...
    assert s["rot_acc"] == pytest.approx(50.0) and s["rot_gold_prob"] == pytest.approx(40.0)
    assert s["circular_acc"] == pytest.approx(40.0)
    assert s["ll_acc"] == pytest.approx(40.0) and s["ll_norm_acc"] == pytest.approx(60.0)


def test_mcq_summary_without_choice_scores_has_only_the_generative_statistics():
    plain = [item(4, "D", "D", True), item(4, "D", None, True)]
    s = summarize(plain, n_dropped=0)
    assert s["letter_hist"] == {"A": 0, "B": 0, "C": 0, "D": 1, "none": 1} and s["one_letter_baseline"] == 100.0
    assert not {"rot_acc", "rot_gold_prob", "circular_acc", "ll_acc", "ll_norm_acc"} & set(s)


TASKS = {"sciq": "mcq", "arc_challenge": "mcq", "mbpp": "code", "humaneval": "code"}


def test_overall_metrics_group_means_and_headline():
    benchmarks = {
        "sciq": {"score": 20.0, "rot_acc": 50.0},
        "arc_challenge": {"score": 40.0, "rot_acc": 30.0},
        "mbpp": {"score": 10.0},
        "humaneval": {"score": 0.0},
    }
    assert overall_metrics(benchmarks, TASKS, "sciq") == {
        "overall": pytest.approx(17.5),
        "mcq_overall": pytest.approx(30.0),
        "mcq_rot_overall": pytest.approx(40.0),
        "code_overall": pytest.approx(5.0),
        "headline": {"benchmark": "sciq", "metric": "rot_acc", "value": 50.0},
    }


def test_overall_metrics_leave_out_groups_without_numbers():
    code_only = {"mbpp": {"score": 10.0}, "humaneval": {"score": 0.0}}
    assert overall_metrics(code_only, TASKS, "sciq") == {
        "overall": pytest.approx(5.0),
        "code_overall": pytest.approx(5.0),
    }
    no_rot = {"sciq": {"score": 20.0}}  # eval.choice_scores off: no rot_acc, no headline
    assert overall_metrics(no_rot, TASKS, "sciq") == {"overall": 20.0, "mcq_overall": 20.0}
    open_answer = {"sciq": {"score": 20.0, "ll_acc": 85.0}}  # no letters shown: no rot_acc
    assert overall_metrics(open_answer, TASKS, "sciq")["headline"] == {
        "benchmark": "sciq",
        "metric": "ll_acc",
        "value": 85.0,
    }
