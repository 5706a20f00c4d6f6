"""Agreement weights against brute-force loops and hand-worked examples (docs/method.md §2.1)."""

import math

import pytest
import torch

from unisd.agreement import (
    keep_by_disagreement,
    sequence_disagreement,
    sequence_weights,
    token_disagreement,
    token_weights,
)

K, B, T = 3, 4, 7


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = -3 * torch.rand(K, B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    return scores, mask


def pop_var(xs):
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / len(xs)


def brute_quantile(xs, q):
    """Linear interpolation between order statistics (what torch.quantile does by default)."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def column(scores, b, t):
    return [scores[k, b, t].item() for k in range(scores.shape[0])]


# --- token level -----------------------------------------------------------------------


def test_token_disagreement_matches_loops():
    scores, mask = batch(1)
    var, rng = token_disagreement(scores, mask, "var"), token_disagreement(scores, mask, "range")
    for b in range(B):
        for t in range(T):
            xs = column(scores, b, t)
            want_var, want_rng = (pop_var(xs), max(xs) - min(xs)) if mask[b, t] else (0.0, 0.0)
            assert var[b, t].item() == pytest.approx(want_var, abs=1e-12)
            assert rng[b, t].item() == pytest.approx(want_rng, abs=1e-12)


def test_token_disagreement_hand_example():
    # K=2 scores (0, −2): mean −1, population variance ((1)² + (−1)²)/2 = 1, range 2.
    # K=2 scores (−1, −1): variance 0, range 0.
    scores = torch.tensor([[[0.0, -1.0]], [[-2.0, -1.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert token_disagreement(scores, mask, "var").tolist() == [[1.0, 0.0]]
    assert token_disagreement(scores, mask, "range").tolist() == [[2.0, 0.0]]


@pytest.mark.parametrize("stat", ["var", "range"])
@pytest.mark.parametrize("gamma", [1.0, 0.01, 50.0])
def test_token_weights_match_brute_force(stat, gamma):
    scores, mask = batch(2)
    spread = pop_var if stat == "var" else (lambda xs: max(xs) - min(xs))
    d = {(b, t): spread(column(scores, b, t)) for b in range(B) for t in range(T) if mask[b, t]}
    q = max(brute_quantile(list(d.values()), 0.95), 1e-6)
    got = token_weights(scores, mask, gamma, stat)
    for b in range(B):
        for t in range(T):
            want = max(1 / (1 + gamma * min(d[b, t] / q, 10.0)), 0.01) if mask[b, t] else 0.0
            assert got[b, t].item() == pytest.approx(want, rel=1e-10)


def test_token_weights_hand_example_with_cap_and_floor():
    # K=2, six tokens with scores (0, −x): variance x²/4 → d = (0, .25, .25, .25, .25, 25) for
    # x = (0, 1, 1, 1, 1, 10). 0.95-quantile: position 5·.95 = 4.75 between .25 and 25 →
    # q = .25 + .75·24.75 = 18.8125. The big token: d/q = 1.3289 (under the cap).
    # With quantile=0.5 instead: q = .25, the big token's d/q = 100 → capped at 10.
    x = torch.tensor([0.0, 1, 1, 1, 1, 10], dtype=torch.float64)
    scores = torch.stack([torch.zeros_like(x), -x])[:, None, :]
    mask = torch.ones(1, 6, dtype=torch.bool)
    w = token_weights(scores, mask, gamma=1.0)
    assert w[0, 0].item() == 1.0
    assert w[0, 1].item() == pytest.approx(1 / (1 + 0.25 / 18.8125))
    assert w[0, 5].item() == pytest.approx(1 / (1 + 25 / 18.8125))
    w = token_weights(scores, mask, gamma=1.0, quantile=0.5)
    assert w[0, 1].item() == pytest.approx(0.5)  # d/q = 1
    assert w[0, 5].item() == pytest.approx(1 / 11)  # min(100, 10) = 10
    w = token_weights(scores, mask, gamma=100.0, quantile=0.5)
    assert w[0, 5].item() == pytest.approx(0.01)  # 1/(1 + 1000) < floor


def test_token_weights_quantile_floor_when_all_teachers_agree():
    scores = torch.full((K, B, T), -1.0)
    mask = torch.ones(B, T, dtype=torch.bool)
    assert torch.equal(token_weights(scores, mask, gamma=1.0), torch.ones(B, T))
    # nearly equal: q is floored at 1e-6, so d = 1e-8 gives d/q = .01
    scores = torch.zeros(2, 1, 2, dtype=torch.float64)
    scores[1, 0, 0] = -2e-4  # population variance (1e-4)² = 1e-8 on token 0, 0 on token 1
    w = token_weights(scores, torch.ones(1, 2, dtype=torch.bool), gamma=1.0)
    assert w[0, 0].item() == pytest.approx(1 / 1.01)


def test_padding_is_ignored_and_weighted_zero():
    scores, mask = batch(3)
    other = scores.clone()
    other[:, ~mask] = torch.randn(K, int((~mask).sum()), dtype=torch.float64) * 100
    other[0, ~mask] = float("-inf")
    for stat in ["var", "range"]:
        assert torch.equal(token_weights(scores, mask, 1.0, stat), token_weights(other, mask, 1.0, stat))
        assert torch.equal(token_disagreement(scores, mask, stat), token_disagreement(other, mask, stat))
    assert torch.equal(sequence_disagreement(scores, mask), sequence_disagreement(other, mask))
    assert (token_weights(scores, mask, 1.0)[~mask] == 0).all()


def test_weights_carry_no_gradient():
    scores, mask = batch(4)
    scores.requires_grad_()
    assert not token_weights(scores, mask, 1.0).requires_grad
    assert not sequence_weights(scores, mask, 1.0).requires_grad


# --- sequence level --------------------------------------------------------------------


def test_sequence_disagreement_and_weights_match_loops():
    scores, mask = batch(5)
    gamma = 0.7
    got_d, got_w = sequence_disagreement(scores, mask), sequence_weights(scores, mask, gamma)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        means = [sum(scores[k, b, t].item() for t in valid) / len(valid) for k in range(K)]
        assert got_d[b].item() == pytest.approx(pop_var(means), abs=1e-12)
        assert got_w[b].item() == pytest.approx(math.exp(-gamma * pop_var(means)), rel=1e-12)


def test_sequence_weights_hand_example():
    # sequence 0: per-context means (−1 + −3)/2 = −2, (−2 + −2)/2 = −2, (0 + −4)/2 = −2 → D = 0, w = 1
    # sequence 1 (last token padding): means −1, −2, −3 → mean −2, D = (1 + 0 + 1)/3 = 2/3,
    #   w = exp(−1.5 · 2/3) = e^−1
    scores = torch.tensor([[[-1.0, -3.0], [-1.0, 9.0]], [[-2.0, -2.0], [-2.0, 9.0]], [[0.0, -4.0], [-3.0, 9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(sequence_disagreement(scores, mask), torch.tensor([0.0, 2 / 3]))
    torch.testing.assert_close(sequence_weights(scores, mask, 1.5), torch.tensor([1.0, math.exp(-1.0)]))


def test_sequence_without_tokens_gets_full_weight():
    scores, mask = batch(6)
    mask[1] = False
    assert sequence_disagreement(scores, mask)[1].item() == 0.0
    assert torch.isfinite(sequence_weights(scores, mask, 1.0)).all()


# --- filtering -------------------------------------------------------------------------


def test_keep_by_disagreement_counts():
    d = torch.arange(10, dtype=torch.float64)[torch.randperm(10, generator=torch.Generator().manual_seed(7))]
    assert keep_by_disagreement(d, 1.0).all()
    # 0.5-quantile of 0..9 is 4.5 → keeps 0..4
    keep = keep_by_disagreement(d, 0.5)
    assert keep.sum().item() == 5 and (d[keep] <= 4).all()
    # 0.8-quantile is 7.2 → keeps 0..7; quantile 0 keeps only the minimum
    assert keep_by_disagreement(d, 0.8).sum().item() == 8
    assert keep_by_disagreement(d, 0.0).tolist() == (d == 0).tolist()
    assert keep_by_disagreement(torch.tensor([0.3, 0.3, 0.3]), 0.5).all()  # ties are kept together
    assert keep_by_disagreement(torch.empty(0), 0.5).shape == (0,)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, m: token_disagreement(s, m),
        lambda s, m: token_weights(s, m, 1.0),
        lambda s, m: sequence_disagreement(s, m),
        lambda s, m: sequence_weights(s, m, 1.0),
    ],
)
def test_fewer_than_two_contexts_is_an_error(fn):
    with pytest.raises(ValueError, match="K >= 2"):
        fn(torch.zeros(1, B, T), torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="K >= 2"):
        fn(torch.zeros(B, T), torch.ones(B, T, dtype=torch.bool))


def test_unknown_stat_is_an_error():
    scores, mask = batch(8)
    with pytest.raises(ValueError, match="stat"):
        token_weights(scores, mask, 1.0, stat="std")
