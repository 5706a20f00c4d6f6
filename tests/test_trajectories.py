"""Trajectories of a round: gold_mix items, and the teacher diagnostics against plain,
unpadded model forwards and hand-worked counts."""

import pytest
import torch
from project import tiny_params

from unisd.config import build_config
from unisd.data import Example
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, gold_response, task_text, teacher_messages, user
from unisd.trajectories import (
    Trajectory,
    eos_calibration,
    gold_mix_picks,
    letter_accuracy,
    sample_accuracy,
    sample_trajectories,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICES = ["oxygen", "carbon dioxide", "nitrogen", "helium"]
MCQS = [
    Example(
        id=f"q{i}",
        benchmark="sciq",
        task="mcq",
        question=f"Which gas is number {i}?",
        choices=CHOICES,
        answer="ABCD"[i % 4],
    )
    for i in range(6)
]
CODE = Example(
    id="c0",
    benchmark="mbpp",
    task="code",
    question="Add two numbers.",
    answer="def add(a, b):\n    return a + b",
    tests=["assert add(1, 2) == 3"],
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "float32", "cpu")


@pytest.fixture(scope="module")
def builder(tok):
    return PromptBuilder.for_tokenizer(tok, max_prompt_tokens=4096)


def make_cfg(tmp_path, model_dir, recipe="sd", components=None, **prompts):
    params = tiny_params(model_dir, prompts=prompts)
    params.update(recipe=recipe, components=components or {})
    return build_config(params, root=tmp_path)


def last_token_logits(model, ids):
    """Logits [V] after a plain, unpadded forward of `ids`."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


# --- gold_mix --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, want", [(10, 0.25, 2), (10, 0.3, 3), (7, 0.5, 4), (3, 0.1, 0), (8, 0.0, 0)])
def test_gold_mix_picks_that_share_of_the_prompts(n, fraction, want):
    picks = gold_mix_picks(n, fraction, seed=3)
    assert len(picks) == want and len(set(picks)) == want and all(0 <= i < n for i in picks)
    assert picks == gold_mix_picks(n, fraction, seed=3)  # seeded
    assert picks == sorted(picks)


def test_gold_mix_choice_depends_on_the_seed():
    assert len({tuple(gold_mix_picks(20, 0.25, seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize("recipe, gold, sampled", [("sd", 0, 6), ("sft", 6, 0)])
def test_gold_mix_adds_gold_sft_trajectories(tmp_path, tiny_model_dir, model, tok, builder, recipe, gold, sampled):
    cfg = make_cfg(tmp_path, tiny_model_dir, recipe, {"gold_mix": 0.5})
    trajs, stats = sample_trajectories(cfg, model, tok, builder, MCQS, seed=11)
    assert stats == {"dropped_over_budget": 0, "sampled": sampled, "gold": gold, "gold_mix": 3}
    extra = [t for t in trajs if t.sft]
    assert len(extra) == 3 and len(trajs) == sampled + gold + 3
    assert {t.example_id for t in extra} == {MCQS[i].id for i in gold_mix_picks(6, 0.5, 11)}
    for t in extra:
        ex = next(e for e in MCQS if e.id == t.example_id)
        option = CHOICES["ABCD".index(ex.answer)]
        assert (t.source, t.finished, t.id) == ("gold", True, f"{ex.id}#gold")
        assert t.text == f"Reasoning: The correct option is {ex.answer}: {option}.\nAnswer: {ex.answer}"
        assert tok.decode(t.completion_ids) == t.text + "<|im_end|>"
        assert len(t.student_logprobs) == len(t.completion_ids)
    assert not any(
        t.sft
        for t in sample_trajectories(make_cfg(tmp_path, tiny_model_dir, recipe), model, tok, builder, MCQS, seed=11)[0]
    )


# --- end-of-turn calibration -------------------------------------------------------------------


def traj(tok, ex, text, source="sampled", finished=True, eos=True, last=-0.5):
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    return Trajectory(
        id=f"{ex.id}#{text[:5]}",
        example_id=ex.id,
        benchmark=ex.benchmark,
        source=source,
        prompt_ids=[1, 2],
        completion_ids=ids,
        text=text,
        finished=finished,
        student_logprobs=[-0.1] * (len(ids) - 1) + [last],
    )


def test_eos_calibration_against_plain_forwards(tmp_path, tiny_model_dir, model, tok, builder):
    cfg = make_cfg(tmp_path, tiny_model_dir, teacher_template="assistant_turn")
    by_id = {ex.id: ex for ex in MCQS}
    counted = [traj(tok, MCQS[0], "Answer: B", last=-0.5), traj(tok, MCQS[1], "Reasoning: gas.\nAnswer: A", last=-1.5)]
    ignored = [
        traj(tok, MCQS[2], "Reasoning: and so on", finished=False, eos=False),  # truncated
        traj(tok, MCQS[3], "Answer: D", source="gold"),  # not the student's
        traj(tok, MCQS[4], "Answer: A\n", eos=False),
    ]  # stopped by a stop string, no EOS to score
    got = eos_calibration(cfg, model, tok, builder, counted + ignored, by_id)
    want = []
    for t in counted:
        ex = by_id[t.example_id]
        prompt = builder.encode_messages(teacher_messages(ex, gold_response(ex), "assistant_turn"))
        logits = last_token_logits(model, prompt + t.completion_ids[:-1])
        want.append(torch.log_softmax(logits, -1)[tok.eos_token_id].item())
    assert got["eos_trajectories"] == 2
    assert got["teacher_eos_logp"] == pytest.approx(sum(want) / 2, abs=1e-5)
    assert got["student_eos_logp"] == pytest.approx(-1.0)
    assert eos_calibration(cfg, model, tok, builder, ignored, by_id) == {
        "eos_trajectories": 0,
        "teacher_eos_logp": None,
        "student_eos_logp": None,
    }


# --- option letters ------------------------------------------------------------------------------


def first_tokens(tok, choices: list[str]) -> list[int]:
    """The token that follows "Answer:" when " <option>" does, per option."""
    n = len(tok("Answer:", add_special_tokens=False)["input_ids"])
    return [tok(f"Answer: {c}", add_special_tokens=False)["input_ids"][n] for c in choices]


@pytest.mark.parametrize(
    "template, fmt",
    [("assistant_turn", "reason_first"), ("worked_example", "reason_first"), ("worked_example", "open_answer")],
)
def test_letter_accuracy_against_brute_force(tmp_path, tiny_model_dir, model, tok, builder, template, fmt):
    """The letter after "Answer:" under both prompts; under open_answer the first token of
    " <option>" stands for the option's letter."""
    cfg = make_cfg(tmp_path, tiny_model_dir, teacher_template=template, mcq_format=fmt)
    letters = tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    right = {"teacher": 0, "student": 0}
    for ex in MCQS:
        candidates = first_tokens(tok, ex.choices) if fmt == "open_answer" else letters
        assert len(set(candidates)) == len(candidates)
        prompts = {
            "teacher": builder.encode_messages(teacher_messages(ex, gold_response(ex, fmt), template, fmt), "Answer:"),
            "student": builder.encode_messages([user(task_text(ex, fmt))], "Answer:"),
        }
        for side, ids in prompts.items():
            assert tok.decode(ids).endswith("<|im_start|>assistant\nAnswer:")
            right[side] += "ABCD"[int(last_token_logits(model, ids)[candidates].argmax())] == ex.answer
    got = letter_accuracy(cfg, model, tok, builder, MCQS + [CODE])
    assert got == {
        "letter_items": 6,
        "teacher_letter_acc": pytest.approx(100 * right["teacher"] / 6),
        "student_letter_acc": pytest.approx(100 * right["student"] / 6),
    }


def test_sample_accuracy_parses_like_the_evaluation(tok):
    by_id = {ex.id: ex for ex in MCQS + [CODE]}  # gold letters: q0 A, q1 B, q2 C, q3 D
    trajs = [
        traj(tok, MCQS[0], "Reasoning: it is oxygen.\nAnswer: A"),  # right
        traj(tok, MCQS[1], "Answer: B\nReason: carbon dioxide, not answer C."),  # right (answer first)
        traj(tok, MCQS[2], "Answer: A"),  # wrong
        traj(tok, MCQS[3], "I am not sure about this one", finished=False),  # unparseable: wrong
        traj(tok, MCQS[2], "Answer: C", source="gold"),  # not a sample
        traj(tok, CODE, "def add(a, b): return a + b"),
    ]  # not MCQ
    assert sample_accuracy(trajs, by_id, "reason_first") == {"sampled_mcq": 4, "student_sample_acc": 50.0}
    assert sample_accuracy(trajs[4:], by_id, "reason_first") == {"sampled_mcq": 0, "student_sample_acc": None}
    # answer_prefilled samples are what follows "Answer:": " D" is D, " C" after it is still D
    prefilled = [traj(tok, MCQS[3], " D\nReason: not C"), traj(tok, MCQS[2], " B")]
    assert sample_accuracy(prefilled, by_id, "answer_prefilled") == {"sampled_mcq": 2, "student_sample_acc": 50.0}
