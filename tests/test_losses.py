"""Distillation losses against independent computations: torch.distributions, brute-force
loops, closed-form gradients and hand-worked numbers."""

import math
import weakref

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from unisd.chunked import chunked_divergence
from unisd.losses import clip_divergence, contrastive_loss, feature_matching_loss, token_divergence, weighted_token_loss

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def logits(*shape, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=dtype)


def brute_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --- token_divergence ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_kl_matches_torch_distributions_at_temperature(temperature):
    s, t = logits(3, 5, 11, seed=1), logits(3, 5, 11, seed=2)
    p_s, p_t = Categorical(logits=s / temperature), Categorical(logits=t / temperature)
    torch.testing.assert_close(token_divergence(s, t, "forward_kl", temperature=temperature), kl_divergence(p_t, p_s))
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl", temperature=temperature), kl_divergence(p_s, p_t))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_jsd_matches_brute_force_loops(alpha):
    s, t, temperature = logits(2, 3, 7, seed=3), logits(2, 3, 7, seed=4), 0.7
    got = token_divergence(s, t, "jsd", alpha=alpha, temperature=temperature)
    for b in range(2):
        for pos in range(3):
            zs = [x / temperature for x in s[b, pos].tolist()]
            zt = [x / temperature for x in t[b, pos].tolist()]
            p_s = [math.exp(z) / sum(math.exp(y) for y in zs) for z in zs]
            p_t = [math.exp(z) / sum(math.exp(y) for y in zt) for z in zt]
            m = [alpha * a + (1 - alpha) * c for a, c in zip(p_t, p_s)]
            want = alpha * brute_kl(p_t, m) + (1 - alpha) * brute_kl(p_s, m)
            assert got[b, pos].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_hand_worked_two_token_vocabulary():
    # p_S = softmax(0, 0) = (1/2, 1/2). Teacher logits (2 ln 3, 0) at T=2 give (ln 3, 0),
    # so p_T = (3/4, 1/4): temperature divides the teacher's logits too.
    # forward KL(p_T‖p_S) = .75 ln(.75/.5) + .25 ln(.25/.5) = .75·0.405465 − .25·0.693147 = 0.130812
    # reverse KL(p_S‖p_T) = .5 ln(.5/.75) + .5 ln(.5/.25) = −.5·0.405465 + .5·0.693147 = 0.143841
    # JSD α=.5: m = (.625, .375); KL(p_T‖m) = .75 ln 1.2 + .25 ln(2/3) = 0.035375,
    #   KL(p_S‖m) = .5 ln .8 + .5 ln(4/3) = 0.032269; JSD = .5·(0.035375 + 0.032269) = 0.033822
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
    assert token_divergence(s, t, "forward_kl", temperature=2.0).item() == pytest.approx(0.130812, abs=1e-6)
    assert token_divergence(s, t, "reverse_kl", temperature=2.0).item() == pytest.approx(0.143841, abs=1e-6)
    assert token_divergence(s, t, "jsd", alpha=0.5, temperature=2.0).item() == pytest.approx(0.033822, abs=1e-6)


def test_temperature_scales_both_sides():
    s, t = logits(4, 9, seed=5), logits(4, 9, seed=6)
    for kind in KINDS:
        torch.testing.assert_close(
            token_divergence(s, t, kind, temperature=2.0), token_divergence(s / 2, t / 2, kind, temperature=1.0)
        )
    assert not torch.allclose(token_divergence(s, t, temperature=2.0), token_divergence(s / 2, t))


def test_jsd_limits_are_the_two_kls():
    # m → p_S as α → 0, and KL(p_S‖m) ≈ α²/2 Σ (p_T − p_S)²/p_S, so JSD/α → KL(p_T‖p_S) with an
    # O(α) error; symmetrically at α → 1. Moderate logits keep that χ² term small.
    s, t = logits(3, 4, 13, scale=1.0, seed=7), logits(3, 4, 13, scale=1.0, seed=8)
    eps = 1e-4
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", alpha=eps) / eps, token_divergence(s, t, "forward_kl"), rtol=5e-3, atol=1e-6
    )
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", alpha=1 - eps) / eps, token_divergence(s, t, "reverse_kl"), rtol=5e-3, atol=1e-6
    )


def test_forward_kl_gradient_is_the_closed_form():
    # ∂/∂z_S KL(p_T ‖ softmax(z_S/T)) = (p_S − p_T) / T at every position
    s = logits(2, 3, 8, seed=9).requires_grad_()
    t = logits(2, 3, 8, seed=10)
    temperature = 0.7
    (grad,) = torch.autograd.grad(token_divergence(s, t, "forward_kl", temperature=temperature).sum(), s)
    want = (torch.softmax(s.detach() / temperature, -1) - torch.softmax(t / temperature, -1)) / temperature
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_gets_no_gradient(kind):
    s, t = logits(2, 5, seed=11).requires_grad_(), logits(2, 5, seed=12).requires_grad_()
    grads = torch.autograd.grad(token_divergence(s, t, kind).sum(), [s, t], allow_unused=True)
    assert grads[0] is not None and grads[1] is None


@pytest.mark.parametrize("kind", KINDS)
def test_stable_for_extreme_logits(kind):
    s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 0.0, 0.0]])
    out = token_divergence(s, t, kind)
    assert torch.isfinite(out).all() and out[1].item() == pytest.approx(0.0, abs=1e-7)


def test_unknown_kind_and_bad_alpha_raise():
    s = logits(2, 4)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(s, s, "kl")
    with pytest.raises(ValueError, match="alpha"):
        token_divergence(s, s, "jsd", alpha=1.0)


# --- chunked_divergence ----------------------------------------------------------------

B, T, H, V = 2, 10, 6, 17


def heads(dtype=torch.float32):
    g = torch.Generator().manual_seed(20)
    student = torch.nn.Linear(H, V, dtype=dtype)
    teacher = torch.nn.Linear(H, V, dtype=dtype)
    with torch.no_grad():
        for p in [*student.parameters(), *teacher.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return student, teacher.requires_grad_(False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 16])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable-head", "frozen-head"])
def test_chunked_equals_unchunked_values_and_gradients(kind, chunk_size, frozen_head):
    student, teacher = heads()
    student.requires_grad_(not frozen_head)
    h_s = logits(B, T, H, scale=1.0, seed=21, dtype=torch.float32).requires_grad_()
    h_t = logits(B, T, H, scale=1.0, seed=22, dtype=torch.float32)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(23))
    temperature = 0.7

    full = token_divergence(student(h_s), teacher(h_t), kind, alpha=0.3, temperature=temperature)
    lp_s = torch.log_softmax(student(h_s) / temperature, -1).gather(-1, targets[..., None])[..., 0]
    lp_t = torch.log_softmax(teacher(h_t) / temperature, -1).gather(-1, targets[..., None])[..., 0]
    out = chunked_divergence(
        h_s,
        student,
        h_t,
        teacher,
        kind=kind,
        alpha=0.3,
        temperature=temperature,
        targets=targets,
        chunk_size=chunk_size,
    )
    torch.testing.assert_close(out.divergence, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.student_logprobs, lp_s, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.teacher_logprobs, lp_t, atol=1e-5, rtol=0)
    assert not out.teacher_logprobs.requires_grad

    # any loss touching both outputs: gradients w.r.t. hidden states and head weights agree
    params = [h_s] if frozen_head else [h_s, student.weight, student.bias]
    g = torch.Generator().manual_seed(24)
    a, c = torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    want = torch.autograd.grad((a * full + c * lp_s).sum(), params)
    got = torch.autograd.grad((a * out.divergence + c * out.student_logprobs).sum(), params)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_chunked_accepts_teacher_logits_and_returns_no_logprobs_without_targets():
    student, teacher = heads(torch.float64)
    h_s, h_t = logits(B, T, H, seed=25), logits(B, T, H, seed=26)
    t_logits = teacher(h_t)
    out = chunked_divergence(h_s, student, t_logits, kind="jsd", chunk_size=4)
    torch.testing.assert_close(out.divergence, token_divergence(student(h_s), t_logits, "jsd"))
    assert out.student_logprobs is None and out.teacher_logprobs is None


def traced_chunked(student, teacher):
    """chunked_divergence (chunks of 4) through a head that records each call's width,
    and the shapes of the tensors saved for a backward that are still alive after the
    forward (the forward's own inner graphs, if any, have been freed by then)."""
    h_s = logits(B, T, H, scale=1.0, seed=27, dtype=torch.float32).requires_grad_()
    h_t = logits(B, T, H, scale=1.0, seed=28, dtype=torch.float32)
    calls, saved = [], []

    def head(x):
        calls.append(x.shape[1])
        return student(x)

    def pack(x):
        saved.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = chunked_divergence(h_s, head, h_t, teacher, chunk_size=4)
    kept = [ref().shape for ref in saved if ref() is not None]
    return out, h_s, h_t, calls, kept


def test_chunked_recomputes_chunks_in_backward_instead_of_storing_logits():
    student, teacher = heads()
    out, h_s, _, calls, kept = traced_chunked(student, teacher)
    assert calls == [1, 4, 4, 2]  # one probe token (is the head trainable?), then each chunk
    assert kept and not any(shape[-1] == V for shape in kept), kept  # nothing B×chunk×V kept for backward
    out.divergence.sum().backward()
    assert sorted(calls) == [1, 2, 2, 4, 4, 4, 4]  # each chunk recomputed once in backward
    assert h_s.grad is not None and student.weight.grad is not None


def test_chunked_with_a_frozen_head_takes_gradients_in_the_forward_and_never_recomputes():
    student, teacher = heads()
    student.requires_grad_(False)
    out, h_s, h_t, calls, kept = traced_chunked(student, teacher)
    assert calls == [1, 4, 4, 2]  # one probe token (is the head trainable?), then each chunk once
    assert kept and not any(shape[-1] == V for shape in kept), kept  # nothing B×chunk×V outlives the forward
    out.divergence.sum().backward()
    assert calls == [1, 4, 4, 2]  # the backward ran no head
    want = torch.autograd.grad(token_divergence(student(h_s), teacher(h_t)).sum(), h_s)[0]
    torch.testing.assert_close(h_s.grad, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # without autograd nothing is differentiated
        plain = chunked_divergence(h_s, student, h_t, teacher, chunk_size=4).divergence
    assert not plain.requires_grad
    torch.testing.assert_close(plain, out.divergence.detach(), atol=0, rtol=0)


# --- clip_divergence -------------------------------------------------------------------


def test_static_clip_values_gradients_and_fraction():
    ell = torch.tensor([[0.5, 12.0, 3.0], [20.0, 9.0, 99.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    clipped, fraction = clip_divergence(ell, mask, "static", tau=10.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.5, 10.0, 3.0], [10.0, 9.0, 10.0]]))
    assert fraction == pytest.approx(2 / 5)  # 12 and 20 over the 5 masked tokens; 99 is padding
    clipped.sum().backward()
    torch.testing.assert_close(ell.grad, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_quantile_clip_threshold_is_the_masked_quantile():
    ell = logits(4, 25, scale=2.0, seed=30).abs().requires_grad_()
    mask = torch.rand(4, 25, generator=torch.Generator().manual_seed(31)) < 0.7
    with torch.no_grad():
        ell[~mask] = 1e6  # padding must not move the threshold
    clipped, fraction = clip_divergence(ell, mask, "quantile", q=0.9)
    limit = torch.quantile(ell.detach()[mask], 0.9)
    torch.testing.assert_close(clipped, torch.minimum(ell.detach(), limit))
    over = (ell.detach() > limit) & mask
    assert fraction == pytest.approx(over.sum().item() / mask.sum().item())
    clipped.sum().backward()
    assert (ell.grad[over] == 0).all() and (ell.grad[mask & ~over] == 1).all()


def test_quantile_clip_hand_example():
    # masked values 1..5, median (q=.5) = 3 → 4, 5 clipped to 3: fraction 2/5
    ell = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 100.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    clipped, fraction = clip_divergence(ell, mask, "quantile", q=0.5)
    assert clipped[0, :5].tolist() == [1.0, 2.0, 3.0, 3.0, 3.0] and fraction == pytest.approx(0.4)


def test_clip_none_empty_mask_and_unknown_mode():
    ell = torch.tensor([[5.0, 50.0]])
    assert clip_divergence(ell, torch.ones(1, 2, dtype=torch.bool), "none") == (ell, 0.0)
    clipped, fraction = clip_divergence(ell, torch.zeros(1, 2, dtype=torch.bool), "quantile")
    assert torch.equal(clipped, ell) and fraction == 0.0
    with pytest.raises(ValueError, match="clip mode"):
        clip_divergence(ell, torch.ones(1, 2, dtype=torch.bool), "max")


# --- weighted_token_loss ---------------------------------------------------------------

ELL = torch.tensor([[1.0, 3.0], [4.0, 6.0]], dtype=torch.float64)
FULL = torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.parametrize("s", [1.0, 0.5, 2.0])
def test_reference_reduction_cancels_sequence_weights(s):
    # per-sequence Σ_t w ℓ / Σ_t w: (s·1 + s·3)/(2s) = 2 and (4 + 6)/2 = 5 → mean 3.5 for every s
    seq_w = torch.tensor([s, 1.0], dtype=torch.float64)
    assert weighted_token_loss(ELL, FULL, seq_weights=seq_w, normalize="sequence").item() == pytest.approx(3.5)


def test_fixed_reductions_let_sequence_weights_matter():
    seq_w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    # tokens: (1·(1 + 3) + .5·(4 + 6)) / 4 tokens = 9 / 4 = 2.25 (3.5 unweighted)
    assert weighted_token_loss(ELL, FULL, seq_weights=seq_w).item() == pytest.approx(2.25)
    assert weighted_token_loss(ELL, FULL).item() == pytest.approx(3.5)
    # weight: 9 / (1·2 + .5·2) = 9 / 3 = 3
    assert weighted_token_loss(ELL, FULL, seq_weights=seq_w, normalize="weight").item() == pytest.approx(3.0)


def test_token_weights_and_mask_by_hand():
    ell = torch.tensor([[1.0, 3.0, float("nan")], [4.0, 6.0, 8.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    tok_w = torch.tensor([[0.5, 1.0, 7.0], [1.0, 0.25, 1.0]], dtype=torch.float64)
    seq_w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    # numerator: 2·(.5·1 + 1·3) + 1·(1·4 + .25·6 + 1·8) = 7 + 13.5 = 20.5
    assert weighted_token_loss(ell, mask, tok_w, seq_w, "tokens").item() == pytest.approx(20.5 / 5)
    # total weight: 2·(.5 + 1) + (1 + .25 + 1) = 5.25
    assert weighted_token_loss(ell, mask, tok_w, seq_w, "weight").item() == pytest.approx(20.5 / 5.25)
    # per sequence: 3.5/1.5 and 13.5/2.25 = 6 (s cancels), mean
    assert weighted_token_loss(ell, mask, tok_w, seq_w, "sequence").item() == pytest.approx((3.5 / 1.5 + 6) / 2)


@pytest.mark.parametrize("normalize", ["tokens", "weight", "sequence"])
def test_weighted_loss_empty_sequences_and_padding_stay_finite(normalize):
    ell = torch.tensor([[float("inf"), float("nan")], [2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[False, False], [True, True]])
    loss = weighted_token_loss(ell, mask, normalize=normalize)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert torch.isfinite(ell.grad).all()
    none = weighted_token_loss(ell, torch.zeros(2, 2, dtype=torch.bool), normalize=normalize)
    assert none.item() == 0.0


# --- contrastive_loss ------------------------------------------------------------------


def test_contrastive_matches_loops():
    g = torch.Generator().manual_seed(40)
    lp_s, lp_pos, lp_neg = (-3 * torch.rand(3, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 6, generator=g) < 0.6
    mask[2] = False  # a sequence without tokens does not count in the batch mean
    mask[0, 0] = mask[1, 0] = True
    margin = 0.5
    per_seq = []
    for b in range(3):
        terms = [
            max(0.0, margin + abs(lp_s[b, t] - lp_pos[b, t]).item() - abs(lp_s[b, t] - lp_neg[b, t]).item())
            for t in range(6)
            if mask[b, t]
        ]
        if terms:
            per_seq.append(sum(terms) / len(terms))
    got = contrastive_loss(lp_s, lp_pos, lp_neg, mask, margin)
    assert got.item() == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-12)


def test_contrastive_hand_example_and_gradient_only_to_student():
    # token 1: pos |−1 − (−1.2)| = .2, neg |−1 − (−3)| = 2 → ReLU(.5 + .2 − 2) = 0
    # token 2: pos |−2 − (−1)| = 1, neg |−2 − (−2.2)| = .2 → ReLU(.5 + 1 − .2) = 1.3; mean .65
    lp_s = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    lp_pos = torch.tensor([[-1.2, -1.0]], dtype=torch.float64, requires_grad=True)
    lp_neg = torch.tensor([[-3.0, -2.2]], dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(lp_s, lp_pos, lp_neg, torch.ones(1, 2, dtype=torch.bool), margin=0.5)
    assert loss.item() == pytest.approx(0.65)
    grads = torch.autograd.grad(loss, [lp_s, lp_pos, lp_neg], allow_unused=True)
    # token 2: d/dlp_S (|lp_S + 1| − |lp_S + 2.2|)/2 = (−1 − 1)/2 = −1
    torch.testing.assert_close(grads[0], torch.tensor([[0.0, -1.0]], dtype=torch.float64))
    assert grads[1] is None and grads[2] is None


# --- feature_matching_loss -------------------------------------------------------------


def test_feature_matching_matches_loops_and_stops_teacher_gradient():
    s = logits(3, 4, 5, scale=1.0, seed=50).requires_grad_()
    t = logits(3, 4, 5, scale=1.0, seed=51).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    per_seq = []
    for b in range(2):
        tokens = [sum((s[b, i, h] - t[b, i, h]).item() ** 2 for h in range(5)) / 5 for i in range(4) if mask[b, i]]
        per_seq.append(sum(tokens) / len(tokens))
    loss = feature_matching_loss(s, t, mask)
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-12)
    grads = torch.autograd.grad(loss, [s, t], allow_unused=True)
    assert grads[1] is None
    # ∂/∂s = 2 (s − t) / H / n_b / B_with_tokens at masked positions, 0 elsewhere
    n = mask.sum(-1).clamp_min(1)[:, None, None]
    want = torch.where(mask[..., None], 2 * (s - t).detach() / 5 / n / 2, 0.0)
    torch.testing.assert_close(grads[0], want)


def test_feature_matching_without_tokens_is_zero():
    s = torch.randn(2, 3, 4)
    assert feature_matching_loss(s, s + 1, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
