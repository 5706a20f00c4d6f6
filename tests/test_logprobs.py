"""Teacher-forced log-probs and the drift metrics, against unpadded one-sequence forwards."""

import math

import pytest
import torch
from tiny import build_tiny_model

from unisd.logprobs import (
    completion_logprobs,
    length_batches,
    next_token_logprobs,
    perplexity,
    retention,
    shared_prefix_next_token_logprobs,
    shared_prompt_logprobs,
)
from unisd.modeling import inference_autocast, load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [([5, 9, 12, 7], [30, 31, 2]), ([4, 6], [40, 41, 42, 43, 44]), ([8, 8, 8, 8, 8, 8, 8], [50])]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    other = build_tiny_model(tmp_path_factory.mktemp("other"), seed=1)
    return load_model(tiny_model_dir), load_model(other), load_tokenizer(tiny_model_dir).pad_token_id


def reference(model, prompt, completion):
    """Full next-token distributions over the completion from one unpadded sequence."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("batch_size, max_tokens", [(2, 0), (3, 14), (3, 1)])
def test_completion_logprobs_match_unpadded_forwards(models, batch_size, max_tokens):
    model, _, pad = models
    lps = completion_logprobs(model, PAIRS, pad, batch_size=batch_size, max_tokens=max_tokens)
    for (prompt, completion), lp in zip(PAIRS, lps):
        ref = reference(model, prompt, completion).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(lp.double(), ref, atol=1e-5)


# options of MCQ items: prompts shared by 1 to 3 continuations of different lengths, one empty
SHARED = [
    ([5, 9, 12, 7], [30]),
    ([4, 6], [40, 41, 42]),
    ([5, 9, 12, 7], [31, 32, 33, 34]),
    ([8, 8, 8, 8, 8, 8, 8], [50, 51]),
    ([4, 6], []),
    ([5, 9, 12, 7], [30, 2]),
    ([4, 6], [43]),
]


@pytest.mark.parametrize("batch_size, max_tokens", [(1, 0), (2, 0), (3, 8), (3, 3)])
def test_shared_prompt_logprobs_match_unpadded_forwards(models, batch_size, max_tokens):
    """Each distinct prompt run once, its continuations over its cache (with a token budget,
    in several groups of similar length): every pair's token log-probs as one unpadded
    forward of prompt + continuation gives them, in input order."""
    model, _, pad = models
    got = shared_prompt_logprobs(model, SHARED, pad, batch_size=batch_size, max_tokens=max_tokens)
    assert [len(lp) for lp in got] == [len(c) for _, c in SHARED]
    for (prompt, completion), lp in zip(SHARED, got):
        if completion:
            ref = reference(model, prompt, completion).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            assert torch.allclose(lp.double(), ref, atol=1e-5)


@pytest.mark.parametrize("batch_size, max_tokens", [(1, 0), (2, 0), (3, 8)])
def test_shared_prefix_next_token_logprobs_match_unpadded_forwards(models, batch_size, max_tokens):
    """Prompts split as (shared prefix, own suffix): the candidates' next-token log-probs
    after each whole prompt, as one unpadded forward of it gives them."""
    model, _, pad = models
    splits = [(p, c) for p, c in SHARED if c]  # every prompt keeps a suffix to read the next token after
    candidates = [[3, 30], [44], [50, 7, 50], [9], [2, 31], [40]]
    got = shared_prefix_next_token_logprobs(
        model, splits, candidates, pad, batch_size=batch_size, max_tokens=max_tokens
    )
    for (prefix, suffix), cands, lp in zip(splits, candidates, got):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([prefix + suffix])).logits[0, -1].double(), -1)
        assert torch.allclose(lp.double(), ref[cands], atol=1e-5)


@pytest.mark.parametrize("batch_size, max_tokens", [(1, 0), (3, 0), (2, 9)])
def test_next_token_logprobs_match_unpadded_forwards(models, batch_size, max_tokens):
    model, _, pad = models
    prompts = [p + c for p, c in PAIRS]  # lengths 7, 7, 8
    candidates = [[3, 30], [44], [50, 7, 50]]
    got = next_token_logprobs(model, prompts, candidates, pad, batch_size=batch_size, max_tokens=max_tokens)
    for prompt, cands, lp in zip(prompts, candidates, got):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        assert torch.allclose(lp.double(), ref[cands], atol=1e-5)


def test_length_batches_hand_worked():
    # lengths by index: 0:5 1:9 2:3 3:9 4:4 5:12 -> longest first: 5(12) 1(9) 3(9) 0(5) 4(4) 2(3)
    lengths = [5, 9, 3, 9, 4, 12]
    assert length_batches(lengths, max_rows=2) == [[5, 1], [3, 0], [4, 2]]
    # budget 20 padded tokens: 12 alone (2×12 > 20); 9+9 = 18; then 5,4,3 -> 3×5 = 15
    assert length_batches(lengths, max_rows=4, max_tokens=20) == [[5], [1, 3], [0, 4, 2]]
    # a budget below one sequence still scores it, alone
    assert length_batches(lengths, max_rows=4, max_tokens=1) == [[i] for i in (5, 1, 3, 0, 4, 2)]


def test_retention_gives_base_logprobs_and_jsd(models):
    model, base, pad = models
    for (prompt, completion), (lp, jsd) in zip(PAIRS, retention(model, base, PAIRS, pad, batch_size=3)):
        lp_base, lp_model = reference(base, prompt, completion), reference(model, prompt, completion)
        assert torch.allclose(lp.double(), lp_base.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), atol=1e-5)
        p, q = lp_model.exp(), lp_base.exp()
        m = (p + q) / 2
        expected = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
        assert jsd == pytest.approx(float(expected), rel=1e-4, abs=1e-7)
        assert 0 < jsd < math.log(2)
    same = retention(model, model, PAIRS, pad)
    assert all(abs(j) < 1e-6 for _, j in same)


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(torch.tensor([math.log(0.5), math.log(0.25)])) == pytest.approx(2**1.5)
    assert math.isnan(perplexity(torch.tensor([])))


def test_inference_autocast_equals_autocast_and_restores_the_weights(models):
    model, _, pad = models
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = torch.tensor([[5, 9, 12, 7, 30, 31, 2], [4, 6, 40, 41, 42, 43, 44]])
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = model(input_ids=ids).logits
        with inference_autocast(model, True):
            got = model(input_ids=ids).logits
            cast = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same rounding, done once
    assert cast and all(n.endswith("proj.weight") for n in cast)  # linear layers; the tied head/embedding stay fp32
    assert dict(model.named_parameters()) == params  # the same Parameter objects, fp32 again, unchanged
    for n, p in params.items():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    bf16 = completion_logprobs(model, PAIRS, pad, bf16=True)  # the scoring path under it: close to fp32
    for a, b in zip(bf16, completion_logprobs(model, PAIRS, pad)):
        assert (a - b).abs().max() < 0.1
