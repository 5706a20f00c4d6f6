"""Rotation and option log-likelihood MCQ scores: hand-worked stub models, and the batched
rotations against one unpadded forward per prompt on the tiny model."""

import math
import re
from types import SimpleNamespace

import pytest
import torch
from tiny import build_tokenizer

from unisd.choice_scores import (
    ANSWER_PREFIX,
    AnswerEncoder,
    Scoring,
    aggregate_loglik,
    cloze_text,
    common_prefix,
    rotation_scores,
    tie_credit,
)
from unisd.data.schema import Example
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, task_text

pytestmark = pytest.mark.usefixtures("one_thread")

SKY = Example(
    id="sky",
    benchmark="sciq",
    task="mcq",
    question="Which color is the sky?",
    choices=["red", "blue", "green"],
    answer="B",
)


class StubLM:
    """Next-token logits set by hand from the decoded prompt: `logits(shown)` gets the
    options as shown, {letter: text}, and returns {letter: logit} for the letter tokens
    (every other token of the vocabulary: logit 0).

    It speaks the decoder-and-cache interface the scoring uses: the "hidden state" where
    a prompt ends (its prefix kept in a stand-in cache, then its suffix) is those logits,
    and the LM head is the identity."""

    device = torch.device("cpu")
    config = SimpleNamespace(final_logit_softcapping=None)

    def __init__(self, tok, logits):
        self.tok, self.logits = tok, logits

    def get_output_embeddings(self):
        return SimpleNamespace(weight=torch.eye(len(self.tok)), bias=None)

    def get_decoder(self):
        return self.decoder

    def row(self, ids: list[int]) -> torch.Tensor:
        shown = dict(re.findall(r"^([A-J])\. (.*)$", self.tok.decode(ids), re.M))
        row = torch.zeros(len(self.tok))
        for letter, value in self.logits(shown).items():
            row[self.tok.convert_tokens_to_ids("Ġ" + letter)] = value
        return row

    def decoder(self, input_ids, attention_mask, position_ids, use_cache, cache=None):
        """Zeros but where a whole prompt ends: there the logits of its text."""
        hidden = torch.zeros(*input_ids.shape, len(self.tok))
        if cache is None:  # the prefixes, left-padded: nothing is read at them
            cache = Prefixes([ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)])
        else:  # the suffixes, right-padded after the cached prefixes
            for r, (prefix, ids) in enumerate(zip(cache.rows, input_ids)):
                n = int(attention_mask[r, -input_ids.shape[1] :].sum())
                hidden[r, n - 1] = self.row(prefix + ids[:n].tolist())
        return SimpleNamespace(last_hidden_state=hidden, cache=cache)


class Prefixes:
    """The stand-in KV cache: the token ids each row has read."""

    def __init__(self, rows):
        self.rows = rows

    def batch_select_indices(self, indices):
        self.rows = [self.rows[i] for i in indices.tolist()]


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder.for_tokenizer(build_tokenizer())


def rotations(builder, logits, ex=SKY):
    stub = StubLM(builder.tokenizer, logits)
    return rotation_scores(
        Scoring(stub, builder.tokenizer.pad_token_id, batch_size=2),
        AnswerEncoder(builder),
        [ex],
        "reason_first",
        "test",
    )[0]


def gold_letter(shown: dict[str, str]) -> str:
    return next(k for k, v in shown.items() if v == "blue")


def test_a_model_that_always_says_A_gets_uniform_probabilities_and_chance(builder):
    out = rotations(builder, lambda shown: {"A": 5.0})
    # Every option stands at A in exactly one of the 3 rotations: p̄ = (p_A + 2 p_other) / 3 = 1/3.
    assert out["rot_probs"] == pytest.approx([1 / 3] * 3, abs=1e-12)
    assert out["rot_gold_prob"] == pytest.approx(1 / 3, abs=1e-12)
    assert out["rot_correct"] == pytest.approx(1 / 3)  # a three-way tie: the credit of a random tie-break
    assert out["circular_correct"] is False


def test_a_model_that_knows_the_gold_text_gets_it_right(builder):
    out = rotations(builder, lambda shown: {gold_letter(shown): 3.0})
    p = math.exp(3) / (math.exp(3) + 2)  # gold's letter at logit 3, the two others at 0
    assert out["rot_probs"] == pytest.approx([(1 - p) / 2, p, (1 - p) / 2], abs=1e-6)  # original order: blue is B
    assert out["rot_correct"] == 1.0 and out["circular_correct"] is True
    assert out["rot_gold_prob"] == pytest.approx(p, abs=1e-6)


def test_rotation_averaging_recovers_content_under_a_letter_habit(builder):
    # Letter A +2 (habit), the gold's letter +1 (knowledge): greedy answers would always be "A".
    out = rotations(builder, lambda shown: {"A": 2.0, gold_letter(shown): 1.0 + 2.0 * (gold_letter(shown) == "A")})
    e = math.exp
    # Rotations put the gold at A once (logits 3, 0, 0) and at B or C twice (A: 2, gold: 1, other: 0).
    gold = (e(3) / (e(3) + 2) + 2 * e(1) / (e(2) + e(1) + 1)) / 3
    # A distractor: at A beside the gold (2 vs 1, 0), beside a gold at A (0 vs 3, 0), beside one at A (0 vs 2, 1).
    other = (e(2) / (e(2) + e(1) + 1) + 1 / (e(3) + 2) + 1 / (e(2) + e(1) + 1)) / 3
    assert out["rot_probs"] == pytest.approx([other, gold, other], abs=1e-6)
    assert gold + 2 * other == pytest.approx(1.0)
    assert out["rot_correct"] == 1.0
    assert out["circular_correct"] is False  # in two rotations the top letter is a distractor at A


def test_letters_must_be_single_tokens(builder):
    five = Example(id="five", benchmark="t", task="mcq", question="q?", choices=list("vwxyz"), answer="A")
    with pytest.raises(ValueError, match=r"' E' is not one token"):  # the tiny BPE splits " E" into "Ġ", "E"
        AnswerEncoder(builder).letters(task_text(five), 5)
    prompt, letters = AnswerEncoder(builder).letters(task_text(SKY), 3)
    assert builder.tokenizer.convert_ids_to_tokens(letters) == ["ĠA", "ĠB", "ĠC"]
    assert builder.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)


def test_common_prefix_hand_worked():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # the last token stays a suffix
    assert common_prefix([[7], [7, 8]]) == 0
    assert common_prefix([[1, 2], [3, 2]]) == 0


def test_tie_credit_and_loglik_hand_worked():
    assert tie_credit(torch.tensor([0.2, 0.4, 0.4]), 1) == 0.5
    assert tie_credit(torch.tensor([0.2, 0.4, 0.4]), 0) == 0.0
    assert tie_credit(torch.tensor([0.1, 0.9]), 1) == 1.0
    # sums -4 (2 characters) and -6 (12): the sum picks option 0, per character (-2 vs -0.5) option 1.
    assert aggregate_loglik([-4.0, -6.0], [2, 12], 1) == {"ll": [-4.0, -6.0], "ll_correct": 0.0, "ll_norm_correct": 1.0}


def test_cloze_text_leaves_the_options_out():
    assert cloze_text(SKY) == "Question: Which color is the sky?"
    assert cloze_text(SKY.model_copy(update={"context": " Air scatters light. "})) == (
        "Context: Air scatters light.\nQuestion: Which color is the sky?"
    )


# ------------------------------------------------------------------ the tiny model, one forward per prompt

EXAMPLES = [
    SKY,
    Example(
        id="gas",
        benchmark="sciq",
        task="mcq",
        question="Which gas do plants absorb?",
        context="Photosynthesis.",
        choices=["oxygen", "carbon dioxide", "nitrogen", "helium"],
        answer="B",
    ),
    Example(id="add", benchmark="sciq", task="mcq", question="What is 1 + 2?", choices=["3", "4"], answer="A"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    return load_model(tiny_model_dir), PromptBuilder.for_tokenizer(tok)


def chat(tok, text: str) -> str:
    """The tiny template's one-turn prompt, opened assistant turn and "Answer:", rendered by the tokenizer."""
    return (
        tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        + "Answer:"
    )


def unpadded(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def reference_rotation(model, builder, ex) -> list[float]:
    """p̄ by the definition: rotate by slicing, read " A", " B", … off the vocabulary."""
    tok, n = builder.tokenizer, len(ex.choices)
    letters = tok.convert_tokens_to_ids(["Ġ" + k for k in "ABCD"[:n]])
    mean = [0.0] * n
    for r in range(n):
        shown = ex.model_copy(update={"choices": ex.choices[r:] + ex.choices[:r]})
        ids = tok(chat(tok, task_text(shown)), add_special_tokens=False)["input_ids"]
        p = torch.softmax(unpadded(model, ids)[-1, letters], -1)
        for i in range(n):  # letter i shows option (i + r) mod n
            mean[(i + r) % n] += float(p[i]) / n
    return mean


@pytest.mark.parametrize("batch_size, max_tokens", [(1, 0), (16, 0), (4, 300)])
def test_batched_rotation_scores_match_one_unpadded_forward_per_rotation(tiny, batch_size, max_tokens):
    """The option log-likelihoods of the same batched path are checked in
    test_evaluate_scores.py, through the evaluation that computes them."""
    model, builder = tiny
    run = Scoring(model, builder.tokenizer.pad_token_id, batch_size=batch_size, max_tokens=max_tokens)
    for ex, got in zip(EXAMPLES, rotation_scores(run, AnswerEncoder(builder), EXAMPLES, "reason_first", "test")):
        want = reference_rotation(model, builder, ex)
        assert got["rot_probs"] == pytest.approx(want, abs=1e-5), ex.id
        assert got["rot_gold_prob"] == pytest.approx(want[ex.gold_index], abs=1e-5)
        assert got["rot_correct"] == float(max(range(len(want)), key=want.__getitem__) == ex.gold_index)
        assert set(got) == {"rot_probs", "rot_correct", "rot_gold_prob", "circular_correct"}
