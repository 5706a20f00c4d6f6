"""Continuous batching gives the same completions as plain `model.generate`; the backends
are reached by name and split their time into prefill and decode."""

import pytest
import torch

from unisd.generation import Sampling, _inverse_cdf, _pick, generate
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    return load_model(tiny_model_dir), tok, PromptBuilder.for_tokenizer(tok, max_prompt_tokens=4096)


def prompts(builder, n=11):
    return [builder.encode(f"question {i}: " + "word " * (5 * i)) for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_continuous_batching_equals_plain_generate(lm, batch_size):
    model, tok, builder = lm
    ps = prompts(builder)
    fast = generate(model, tok, ps, Sampling(12), batch_size, continuous=True)
    ref = generate(model, tok, ps, Sampling(12), batch_size, continuous=False)
    assert [c.ids for c in fast] == [c.ids for c in ref]
    assert [c.text for c in fast] == [c.text for c in ref]


def test_stopping_at_eos_and_refilling(lm, monkeypatch):
    model, tok, builder = lm
    eos = tok.eos_token_id
    # make the model end every sequence after 3 tokens: slots are freed and refilled
    calls = {"n": 0}
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if kwargs["input_ids"].shape[1] == 1 and calls["n"] % 3 == 0:
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, eos] = 0.0
        return out

    monkeypatch.setattr(model, "forward", forward)
    done = generate(model, tok, prompts(builder, 7), Sampling(50), batch_size=2, continuous=True)
    assert all(c.finished and c.ids[-1] == eos and len(c.ids) < 50 for c in done)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    # top_p below the top token's probability keeps only the argmax
    p0 = torch.softmax(logits, -1)[0, 0].item()
    picks = {_pick(logits, Sampling(1, True, 1.0, p0 - 0.01), gen)[0].item() for _ in range(50)}
    assert picks == {0}
    picks = {_pick(logits, Sampling(1, True, 1.0, 1.0), gen)[0].item() for _ in range(400)}
    assert picks == {0, 1, 2, 3}


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    """Hand-worked: cumulative sums 0.5, 0.5, 0.8, 1.0; the zero-probability token 1 is never drawn."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).repeat(6, 1)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.8, 0.999], dtype=torch.float64)
    assert _inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3]
    assert _inverse_cdf(probs * 0.5, u).tolist() == [0, 0, 2, 2, 3, 3]  # u scales with the row's total


def test_sampled_frequencies_follow_softmax_at_the_temperature():
    """20,000 draws of one row against torch.distributions' probabilities at T = 0.7 (5 sd of a
    binomial share is under 0.018)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    picked, _ = _pick(logits.repeat(20_000, 1), Sampling(1, True, 0.7, 1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(picked, minlength=5) / 20_000
    torch.testing.assert_close(freq, torch.distributions.Categorical(logits=logits / 0.7).probs, atol=0.018, rtol=0)


def test_sampled_generation_is_deterministic_for_a_seed(lm):
    model, tok, builder = lm
    ps = prompts(builder, 6)
    a = generate(model, tok, ps, Sampling(10, True, 0.7, 1.0, seed=3), 4)
    b = generate(model, tok, ps, Sampling(10, True, 0.7, 1.0, seed=3), 4)
    c = generate(model, tok, ps, Sampling(10, True, 0.7, 1.0, seed=4), 4)
    assert [x.ids for x in a] == [x.ids for x in b] != [x.ids for x in c]


def test_backends_by_name():
    from unisd.fast_decode import fast_generate
    from unisd.generation import get_backend, hf_generate
    from unisd.vllm_backend import vllm_generate

    assert get_backend("hf") is hf_generate and get_backend("fast") is fast_generate
    assert get_backend("vllm") is vllm_generate  # importable without vLLM: it says so when called
    with pytest.raises(ValueError, match="unknown generation backend"):
        get_backend("tgi")
    with pytest.raises(ValueError, match="'hf' backend only"):
        generate(None, None, [[1]], Sampling(1), continuous=True, backend="fast")


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_phases_count_prompt_and_decoded_tokens(lm, backend):
    from unisd.generation import Phases

    model, tok, builder = lm
    ps = prompts(builder, 7)
    phases = Phases()
    done = generate(model, tok, ps, Sampling(9), 3, backend=backend, phases=phases)
    assert phases.prefill_tokens == sum(map(len, ps))  # every prompt once, no padding
    assert phases.decode_tokens == sum(len(c.ids) for c in done) - len(ps)  # prefill makes each first token
    assert phases.prefill_s > 0 and phases.decode_s > 0
