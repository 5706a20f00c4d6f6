"""Teacher-forced log-probs and the drift metrics, against unpadded one-sequence forwards."""

import math

import pytest
import torch

from tiny import build_tiny_model
from unisd.logprobs import completion_logprobs, perplexity, retention
from unisd.modeling import load_model, load_tokenizer

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


def test_completion_logprobs_match_unpadded_forwards(models):
    model, _, pad = models
    for (prompt, completion), lp in zip(PAIRS, completion_logprobs(model, PAIRS, pad, batch_size=2)):
        ref = reference(model, prompt, completion).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(lp.double(), ref, atol=1e-5)


def test_retention_gives_base_logprobs_and_jsd(models):
    model, base, pad = models
    for (prompt, completion), (lp, jsd) in zip(PAIRS, retention(model, base, PAIRS, pad, batch_size=3)):
        lp_base, lp_model = reference(base, prompt, completion), reference(model, prompt, completion)
        assert torch.allclose(lp.double(), lp_base.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1),
                              atol=1e-5)
        p, q = lp_model.exp(), lp_base.exp()
        m = (p + q) / 2
        expected = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
        assert jsd == pytest.approx(float(expected), rel=1e-4, abs=1e-7)
        assert 0 < jsd < math.log(2)
    same = retention(model, model, PAIRS, pad)
    assert all(abs(j) < 1e-6 for _, j in same)


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(torch.tensor([math.log(0.5), math.log(0.25)])) == pytest.approx(2 ** 1.5)
    assert math.isnan(perplexity(torch.tensor([])))
