"""The teacher π_φ (docs/method.md §1, §2.2): frozen initial weights or an EMA of the student.

Every check compares against an independently loaded base model or against the closed
form of the EMA recursion, never against the Teacher's own bookkeeping. The public
reference's defect (docs/method.md §9.2: averaging only the frozen base weights under LoRA) is
simulated next to ours to show that its teacher would never move.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from unisd.modeling import load_model, load_tokenizer
from unisd.teachers import Teacher

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE = "Question: Which gas do plants absorb?\nReasoning: plants use carbon dioxide for photosynthesis.\nAnswer: B"


pytestmark = pytest.mark.usefixtures("one_thread")


def base_model(model_dir):
    return load_model(model_dir, "float32", "cpu")


def lora_model(model_dir, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base_model(model_dir), cfg)
    model.train()
    return model


@pytest.fixture(scope="module")
def probe(tiny_model_dir):
    ids = load_tokenizer(tiny_model_dir)(PROBE)["input_ids"]
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir, probe):
    with torch.no_grad():
        return base_model(tiny_model_dir)(input_ids=probe).logits


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def token_logprobs(model, ids):
    """log p(x_{t+1} | x_{≤t}) of the probe's own next tokens."""
    lp = torch.log_softmax(logits(model, ids).double(), -1)[:, :-1]
    return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def teacher_token_logprobs(teacher, ids):
    with teacher.active():
        return token_logprobs(teacher.model, ids)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model):
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def perturb(model, scale, seed=1):
    """Move every trainable weight by scale·N(0,1) (what optimizer steps would do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def gap(weights_a, weights_b):
    """‖φ − θ‖ over all tracked parameters."""
    return torch.sqrt(sum(((weights_a[n].double() - weights_b[n].double()) ** 2).sum() for n in weights_a))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# --- frozen teacher ---------------------------------------------------------------------


def test_lora_frozen_teacher_is_the_base_model_after_the_student_moves(tiny_model_dir, probe, base_logits):
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "frozen")
    assert set(teacher.weights) == set(trainable(model)) and all("lora_" in n for n in teacher.weights)
    perturb(model, 0.05)
    student_before = snapshot(model)
    student_logits = logits(model, probe)
    assert (student_logits - base_logits).abs().max() > 1e-2  # the student really moved

    model.train()
    with teacher.active():
        assert not model.training  # teacher passes without dropout
        t_logits = logits(model, probe)
        with model.disable_adapter():
            t_disabled = logits(model, probe)
    torch.testing.assert_close(t_logits, base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(t_disabled, base_logits, atol=1e-5, rtol=0)

    # the student is back, bit for bit, and in training mode again
    assert model.training
    assert_same(snapshot(model), student_before)
    torch.testing.assert_close(logits(model, probe), student_logits, atol=0, rtol=0)


def test_base_teacher_shortcut_equals_swapping_the_zero_adapter_in(tiny_model_dir, probe, base_logits):
    """While the teacher's LoRA B is zero, `active()` switches the adapter off instead of
    swapping weights: both ways give the base model's logits, and the student is restored."""
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "ema", every=1, beta=0.5)
    assert teacher.is_base
    perturb(model, 0.05)
    student_before = snapshot(model)
    shortcut = teacher_token_logprobs(teacher, probe)
    teacher.is_base = False  # force the weight swap
    swapped = teacher_token_logprobs(teacher, probe)
    expected = torch.log_softmax(base_logits.double(), -1)[:, :-1].gather(-1, probe[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(shortcut, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped, shortcut, atol=1e-6, rtol=0)
    assert_same(snapshot(model), student_before)
    assert model.training

    # an EMA update makes B non-zero: from then on the teacher is no longer the base model
    teacher.after_step(1)
    assert not teacher.is_base
    moved = teacher_token_logprobs(teacher, probe)
    assert (moved - expected).abs().max() > 1e-4
    # and a state with a zero B (a frozen round's teacher.pt) makes it the base model again
    teacher.load_state_dict({n: torch.zeros_like(w) if "lora_B" in n else w for n, w in teacher.weights.items()})
    assert teacher.is_base


@pytest.mark.parametrize("shortcut", [True, False])
def test_student_weights_are_restored_when_the_teacher_pass_raises(tiny_model_dir, shortcut):
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "frozen")
    teacher.is_base = shortcut
    perturb(model, 0.05)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), teacher.active():
        raise RuntimeError("boom")
    assert_same(snapshot(model), before)
    assert model.training


def test_frozen_teacher_never_moves(tiny_model_dir, probe, base_logits):
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "frozen", every=1, beta=0.5)
    initial = {n: w.clone() for n, w in teacher.weights.items()}
    for step in range(1, 6):
        perturb(model, 0.05, seed=step)
        assert teacher.after_step(step) is False
    assert_same(teacher.weights, initial)
    with teacher.active():
        torch.testing.assert_close(logits(model, probe), base_logits, atol=1e-5, rtol=0)


def test_a_model_without_trainable_parameters_is_refused(tiny_model_dir):
    model = base_model(tiny_model_dir).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Teacher(model)


# --- EMA teacher: the fix of docs/method.md §9.2 -------------------------------------------------------


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_lora_ema_parameter_gap_shrinks_by_exactly_beta_per_update(tiny_model_dir, beta):
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "ema", every=1, beta=beta)
    phi0 = {n: w.clone() for n, w in teacher.weights.items()}
    perturb(model, 0.05)  # the student's LoRA weights move (A and B)
    theta = snapshot(model)
    g0 = gap(teacher.weights, theta)
    assert g0 > 0.1
    for n in range(1, 6):
        assert teacher.after_step(n) is True
        assert_same(snapshot(model), theta)  # the update does not touch the student
        torch.testing.assert_close(
            gap(teacher.weights, theta) / g0, torch.tensor(beta**n, dtype=torch.float64), rtol=1e-5, atol=1e-7
        )
    # closed form, parameter by parameter: φ_n = θ + β^n (φ_0 − θ)
    for name in theta:
        expected = theta[name] + beta**5 * (phi0[name] - theta[name])
        torch.testing.assert_close(teacher.weights[name], expected, rtol=1e-5, atol=1e-6)
    # the LoRA B matrices started at 0 (teacher = base model) and are now non-zero
    assert any("lora_B" in n and phi0[n].abs().max() == 0 and teacher.weights[n].abs().max() > 0 for n in phi0)


def test_lora_ema_teacher_logprobs_move_toward_the_student(tiny_model_dir, probe):
    beta = 0.8
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "ema", every=1, beta=beta)
    perturb(model, 0.01)  # a small move: the teacher's response is first order in the gap
    lp_s = token_logprobs(model, probe)
    dist = [(teacher_token_logprobs(teacher, probe) - lp_s).abs().mean()]
    for n in range(1, 7):
        teacher.after_step(n)
        torch.testing.assert_close(token_logprobs(model, probe), lp_s, atol=0, rtol=0)  # student held fixed
        dist.append((teacher_token_logprobs(teacher, probe) - lp_s).abs().mean())
    assert dist[0] > 1e-3, "the perturbation must be visible in the log-probs"
    assert all(b < a for a, b in zip(dist, dist[1:])), dist  # monotone
    ratios = [float(b / a) for a, b in zip(dist, dist[1:])]
    assert ratios == pytest.approx([beta] * len(ratios), abs=0.01), ratios
    assert float(dist[-1] / dist[0]) == pytest.approx(beta**6, rel=0.15)


def test_reference_defect_averaging_only_base_weights_never_moves_the_teacher(tiny_model_dir, probe, base_logits):
    """The public reference under LoRA: φ ← βφ + (1−β)θ over the frozen base weights
    only, skipping LoRA. Student and teacher share those base weights, so the update is
    a no-op and the teacher stays the initial model, while ours follows the student."""
    beta = 0.5
    model = lora_model(tiny_model_dir)
    reference_teacher = copy.deepcopy(model).eval()  # the reference keeps a separate teacher copy
    ours = Teacher(model, "ema", every=1, beta=beta)
    perturb(model, 0.01)
    lp_s = token_logprobs(model, probe)
    lp_ref0 = token_logprobs(reference_teacher, probe)
    ref_dist0 = (lp_ref0 - lp_s).abs().mean()
    ours_dist0 = (teacher_token_logprobs(ours, probe) - lp_s).abs().mean()
    assert ref_dist0 > 1e-3

    student = dict(model.named_parameters())
    averaged = 0
    for step in range(1, 6):
        with torch.no_grad():
            for name, p_t in reference_teacher.named_parameters():
                p_s = student[name]
                if not p_s.requires_grad:  # the frozen base weights only
                    assert torch.equal(p_t, p_s)  # identical in student and teacher ...
                    p_t.lerp_(p_s, 1.0 - beta)  # ... so this changes nothing
                    averaged += 1
        ours.after_step(step)
    assert averaged > 0

    lp_ref = token_logprobs(reference_teacher, probe)
    torch.testing.assert_close(lp_ref, lp_ref0, atol=0, rtol=0)  # the reference teacher never moved
    torch.testing.assert_close(logits(reference_teacher, probe), base_logits, atol=1e-5, rtol=0)
    assert (lp_ref - lp_s).abs().mean() == ref_dist0
    # ours moved most of the way to the student (β^5 ≈ 0.03 of the initial gap)
    ours_dist = (teacher_token_logprobs(ours, probe) - lp_s).abs().mean()
    assert ours_dist < 0.1 * ours_dist0


def test_ema_updates_only_every_n_steps(tiny_model_dir):
    beta, every = 0.5, 3
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "ema", every=every, beta=beta)
    perturb(model, 0.05)
    theta = snapshot(model)
    g0 = gap(teacher.weights, theta)
    fired = []
    for step in range(1, 10):
        before = {n: w.clone() for n, w in teacher.weights.items()}
        moved = teacher.after_step(step)
        fired.append(moved)
        if moved:
            assert not all(torch.equal(before[n], teacher.weights[n]) for n in before)
        else:
            assert_same(teacher.weights, before)
    assert fired == [step % every == 0 for step in range(1, 10)]
    torch.testing.assert_close(
        gap(teacher.weights, theta) / g0, torch.tensor(beta**3, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )


def test_state_dict_round_trip(tiny_model_dir, probe, tmp_path):
    model = lora_model(tiny_model_dir)
    teacher = Teacher(model, "ema", every=1, beta=0.7)
    perturb(model, 0.05)
    teacher.after_step(1)
    teacher.after_step(2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    saved = teacher.state_dict()
    expected_lp = teacher_token_logprobs(teacher, probe)
    teacher.after_step(3)  # the saved state is a copy, not a view of the live weights
    assert not all(torch.equal(saved[n], teacher.weights[n]) for n in saved)

    other = lora_model(tiny_model_dir, seed=5)  # other initial A matrices
    restored = Teacher(other, "ema", every=1, beta=0.7)
    restored.load_state_dict(torch.load(tmp_path / "teacher.pt"))
    assert_same(restored.weights, saved)
    torch.testing.assert_close(teacher_token_logprobs(restored, probe), expected_lp, atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="lacks 1 parameters"):
        restored.load_state_dict({n: w for n, w in list(saved.items())[1:]})


# --- full fine-tuning: every weight is trainable ---------------------------------------------


def test_full_finetuning_frozen_teacher_and_restore(tiny_model_dir, probe, base_logits):
    model = base_model(tiny_model_dir).train()
    teacher = Teacher(model, "frozen")
    assert set(teacher.weights) == {n for n, _ in model.named_parameters()}
    perturb(model, 0.02)
    before = snapshot(model)
    assert (logits(model, probe) - base_logits).abs().max() > 1e-2
    with teacher.active():
        torch.testing.assert_close(logits(model, probe), base_logits, atol=1e-5, rtol=0)
    assert model.training
    assert_same(snapshot(model), before)


def test_full_finetuning_ema_follows_the_student(tiny_model_dir, probe):
    beta = 0.8
    model = base_model(tiny_model_dir).train()
    teacher = Teacher(model, "ema", every=2, beta=beta)
    perturb(model, 0.002)
    theta = snapshot(model)
    lp_s = token_logprobs(model, probe)
    g0 = gap(teacher.weights, theta)
    dist = [(teacher_token_logprobs(teacher, probe) - lp_s).abs().mean()]
    for n in range(1, 5):
        assert teacher.after_step(2 * n - 1) is False
        assert teacher.after_step(2 * n) is True
        torch.testing.assert_close(
            gap(teacher.weights, theta) / g0, torch.tensor(beta**n, dtype=torch.float64), rtol=1e-5, atol=1e-7
        )
        dist.append((teacher_token_logprobs(teacher, probe) - lp_s).abs().mean())
    assert_same(snapshot(model), theta)
    assert dist[0] > 1e-3
    assert all(b < a for a, b in zip(dist, dist[1:])), dist
    ratios = [float(b / a) for a, b in zip(dist, dist[1:])]
    assert ratios == pytest.approx([beta] * len(ratios), abs=0.03), ratios
