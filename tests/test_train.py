"""The training loop (unisd.train) against independent computations: plain model forwards
of unpadded sequences, torch.distributions, F.cross_entropy, and an uninterrupted run as
the reference for a resumed one."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from project import tiny_params
from safetensors.torch import load_file
from torch.distributions import Categorical, kl_divergence

import unisd.objective as objective_mod
import unisd.train as train_mod
from unisd.config import build_config
from unisd.logprobs import completion_hidden, completion_logprobs, head_fn
from unisd.modeling import load_model, load_tokenizer
from unisd.objective import batch_loss, loss_mask
from unisd.recipes import Method, method_dict
from unisd.teachers import Teacher
from unisd.train import TeacherCache, TrainingError, TrainItem, check_lineage, collate, micro_batches, train_round

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [
    ("Question: Which gas do plants absorb?", "Reasoning: plants use carbon dioxide.\nAnswer: B"),
    ("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("Question: What is the weather in Paris?", "Thought: I should call getWeather.\nAction: getWeather"),
    ("Double every number below x.", "def f(x):\n    return [i * 2 for i in range(x)]"),
    ("Question: Which option is a noble gas?", "Answer: D"),
    ("Write a test for add.", "assert add(1, 2) == 3"),
    ("Question: What do plants use for photosynthesis?", "Reasoning: carbon dioxide and light.\nAnswer: B"),
    ("Call the weather tool for Paris.", 'Action Input: {"city": "Paris"}'),
]
DEMO = "This is an example for a response to the question: {}\nStudy the example, then solve the problem."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def items(tok):
    out = []
    for q, a in QUESTIONS:
        prompt = tok(q + "\n")["input_ids"]
        completion = tok(a)["input_ids"] + [tok.eos_token_id]
        teacher = tok(q + "\n" + DEMO.format(a) + "\n")["input_ids"]
        out.append(TrainItem(prompt, completion, teacher_prompt=teacher))
    assert len({len(it.completion) for it in out}) > 1 and len({len(it.prompt) for it in out}) > 1
    return out


def base_model(model_dir):
    return load_model(model_dir, "float32", "cpu")


def lora_model(model_dir, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(base_model(model_dir), cfg)


def perturb(model, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def completion_logits_unpadded(model, prompt, completion):
    """Logits [C, V] of a plain forward of the unpadded sequence at the positions that
    predict each completion token."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


def method(tmp_path, tiny_model_dir, recipe):
    return build_config({**tiny_params(tiny_model_dir), "recipe": recipe}, root=tmp_path).method


# --- collate -----------------------------------------------------------------------------


def test_collate_right_aligns_completions_and_scores():
    items = [
        TrainItem([5, 6, 7], [11, 12], teacher_prompt=[1, 5, 6, 7], scores=[[0.1, 0.2], [0.3, 0.4]]),
        TrainItem(
            [8, 9], [21, 22, 23, 24], teacher_prompt=[1, 2, 8], scores=[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
        ),
    ]
    b = collate(items, pad_id=0, device="cpu")
    assert b["width"] == 4
    assert b["mask"].tolist() == [[False, False, True, True], [True, True, True, True]]
    assert b["targets"].tolist() == [[0, 0, 11, 12], [21, 22, 23, 24]]
    # prompt + completion, left-padded so that every completion ends at the last position
    assert b["student"]["input_ids"].tolist() == [[0, 5, 6, 7, 11, 12], [8, 9, 21, 22, 23, 24]]
    assert b["student"]["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert b["student"]["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert b["teacher_prompt"]["input_ids"].tolist() == [[0, 1, 5, 6, 7, 11, 12], [1, 2, 8, 21, 22, 23, 24]]
    assert b["teacher_prompt"]["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    # the last `width` tokens of every packed sequence are the (right-aligned) targets where mask is set
    for name in ("student", "teacher_prompt"):
        tail = b[name]["input_ids"][:, -b["width"] :]
        assert torch.equal(tail[b["mask"]], b["targets"][b["mask"]])
    assert "negative_prompt" not in b
    assert b["scores"].shape == (2, 2, 4)
    torch.testing.assert_close(b["scores"][:, 0], torch.tensor([[0.0, 0.0, 0.1, 0.2], [0.0, 0.0, 0.3, 0.4]]))
    torch.testing.assert_close(b["scores"][:, 1], torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))


def test_collate_negative_prompts_and_no_scores():
    items = [
        TrainItem([5], [11, 12, 13], negative_prompt=[9, 5], teacher_prompt=[1, 5]),
        TrainItem([6, 7], [21], negative_prompt=[9, 9, 6, 7], teacher_prompt=[1, 6, 7]),
    ]
    b = collate(items, pad_id=3, device="cpu")
    assert b["mask"].tolist() == [[True, True, True], [False, False, True]]
    assert b["targets"].tolist() == [[11, 12, 13], [0, 0, 21]]
    assert b["negative_prompt"]["input_ids"].tolist() == [[9, 5, 11, 12, 13], [9, 9, 6, 7, 21]]
    assert b["student"]["input_ids"].tolist() == [[5, 11, 12, 13], [3, 6, 7, 21]]
    assert "scores" not in b


# --- final hidden states and heads ----------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_completion_hidden_is_after_the_final_norm_and_gives_plain_logits(tiny_model_dir, tok, items, lora):
    lm = lora_model(tiny_model_dir) if lora else base_model(tiny_model_dir)
    if lora:
        perturb(lm, 0.05)
    lm.eval()
    batch = collate(items[:4], tok.pad_token_id, "cpu")
    seen = {}
    norm = lm.get_decoder().norm
    handle = norm.register_forward_hook(lambda mod, args, out: seen.update(pre=args[0], post=out))
    with torch.no_grad():
        h = completion_hidden(lm, batch["student"], batch["width"])
    handle.remove()
    W = batch["width"]
    torch.testing.assert_close(h, seen["post"][:, -(W + 1) : -1], atol=0, rtol=0)  # after the final norm ...
    assert (h - seen["pre"][:, -(W + 1) : -1]).abs().max() > 1e-2  # ... not before it
    rms = h[batch["mask"]].pow(2).mean(-1).sqrt() / norm.weight.abs().mean()
    assert rms.min() > 0.3 and rms.max() < 3  # normalised scale

    with torch.no_grad():
        logits = head_fn(lm)(h)
        for b, it in enumerate(items[:4]):
            n = len(it.completion)
            plain = completion_logits_unpadded(lm, it.prompt, it.completion)
            torch.testing.assert_close(logits[b, W - n :], plain, atol=1e-4, rtol=1e-4)
    # log-softmax at the targets = the scoring code's teacher-forced log-probs
    lp = torch.log_softmax(logits, -1).gather(-1, batch["targets"][..., None]).squeeze(-1)
    ref = completion_logprobs(lm, [(it.prompt, it.completion) for it in items[:4]], tok.pad_token_id, batch_size=3)
    for b, it in enumerate(items[:4]):
        torch.testing.assert_close(lp[b, W - len(it.completion) :], ref[b], atol=1e-4, rtol=1e-4)


# --- the loss of one micro-batch --------------------------------------------------------------


def head_name_of(model):
    w = model.get_output_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is w)


@pytest.mark.parametrize("lora", [True, False])
def test_sd_loss_is_forward_kl_to_the_frozen_initial_teacher(tmp_path, tiny_model_dir, items, tok, lora):
    m = method(tmp_path, tiny_model_dir, "sd")
    lm = lora_model(tiny_model_dir) if lora else base_model(tiny_model_dir)
    lm.train()
    teacher = Teacher(lm, "frozen")
    perturb(lm, 0.05 if lora else 0.01)  # the student has learnt something: student ≠ teacher
    batch_items = items[:4]
    batch = collate(batch_items, tok.pad_token_id, "cpu")
    loss, terms = batch_loss(m, lm, teacher, head_name_of(lm), batch, chunk=3)

    base = base_model(tiny_model_dir)  # the teacher: initial weights, privileged prompt
    kls = []
    for it in batch_items:
        with torch.no_grad():
            t = completion_logits_unpadded(base, it.teacher_prompt, it.completion).double()
        s = completion_logits_unpadded(lm, it.prompt, it.completion).double()
        kls.append(kl_divergence(Categorical(logits=t / 0.7), Categorical(logits=s / 0.7)))
    ref = torch.cat(kls).mean()
    assert ref > 1e-3
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    assert terms["divergence"] == pytest.approx(ref.item(), rel=1e-4)
    assert terms["clipped_frac"] == 0.0
    # same gradient as the independent loss: the teacher is a constant
    params = [p for p in lm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-6, rtol=1e-3)


def test_teacher_cache_serves_repeat_items_without_a_teacher_pass(tmp_path, tiny_model_dir, items, tok, monkeypatch):
    m = method(tmp_path, tiny_model_dir, "sd")
    lm = lora_model(tiny_model_dir)
    lm.train()
    teacher = Teacher(lm, "frozen")
    perturb(lm, 0.05)
    forwards = []
    real = objective_mod.completion_hidden
    monkeypatch.setattr(objective_mod, "completion_hidden", lambda *a: forwards.append(1) or real(*a))

    def loss(idx, cache):
        batch = collate([items[i] for i in idx], tok.pad_token_id, "cpu") | {"ids": idx}
        out, _ = batch_loss(m, lm, teacher, head_name_of(lm), batch, chunk=3, cache=cache)
        return out, torch.autograd.grad(out, [p for p in lm.parameters() if p.requires_grad])

    cache = TeacherCache()
    loss([0, 1, 2], cache), loss([3, 4, 5], cache)  # the first epoch fills it
    forwards.clear()
    got, got_grads = loss([4, 0, 2], cache)  # another grouping, every row cached
    assert len(forwards) == 1  # the student's forward only
    want, want_grads = loss([4, 0, 2], None)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-4)
    forwards.clear()
    loss([5, 6], cache)  # item 6 is new: the teacher runs, and fills it
    assert len(forwards) == 2 and ("teacher_prompt", 6) in cache.rows


def test_sft_loss_is_mean_token_cross_entropy(tmp_path, tiny_model_dir, items, tok):
    m = method(tmp_path, tiny_model_dir, "sft")
    lm = lora_model(tiny_model_dir)
    perturb(lm, 0.05)
    batch = collate(items, tok.pad_token_id, "cpu")
    loss, terms = batch_loss(m, lm, Teacher(lm), "lm_head.weight", batch, chunk=4)
    logits = torch.cat([completion_logits_unpadded(lm, it.prompt, it.completion) for it in items])
    targets = torch.tensor([t for it in items for t in it.completion])
    ref = F.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert terms["sft"] == pytest.approx(ref.item(), rel=1e-5)


def resolved(recipe, **components):
    return Method.model_validate(method_dict(recipe, components))


def test_loss_mask_by_hand():
    # right-aligned completions of lengths 2, 4 and 1 in width 4
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert loss_mask(mask, 0).tolist() == mask.tolist()
    assert loss_mask(mask, 1).tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert loss_mask(mask, 3).tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]


def kl_per_token(student, teacher, it):
    """KL(p_T ‖ p_S) at T=0.7 at each completion position of one item, from plain forwards."""
    with torch.no_grad():
        t = completion_logits_unpadded(teacher, it.teacher_prompt, it.completion).double()
    s = completion_logits_unpadded(student, it.prompt, it.completion).double()
    return kl_divergence(Categorical(logits=t / 0.7), Categorical(logits=s / 0.7))


@pytest.mark.parametrize("skip", [1, 3])
def test_skip_first_tokens_leaves_them_out_of_the_divergence(tmp_path, tiny_model_dir, items, tok, skip):
    lm = lora_model(tiny_model_dir)
    lm.train()
    teacher = Teacher(lm, "frozen")
    perturb(lm, 0.05)
    batch_items = items[:4]
    loss, _ = batch_loss(
        resolved("sd", skip_first_tokens=skip),
        lm,
        teacher,
        head_name_of(lm),
        collate(batch_items, tok.pad_token_id, "cpu"),
        chunk=3,
    )
    base = base_model(tiny_model_dir)
    # by hand: the mean over every item's tokens from index `skip` on
    ref = torch.cat([kl_per_token(lm, base, it)[skip:] for it in batch_items]).mean()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-4)
    whole = torch.cat([kl_per_token(lm, base, it) for it in batch_items]).mean()
    assert abs(whole.item() - ref.item()) > 1e-4  # the skipped tokens would have counted


def test_the_final_eos_counts_in_the_loss_and_its_gradient(tmp_path, tiny_model_dir, items, tok):
    """Regression: with pad == EOS (SmolLM2), a mask built from `ids != pad` would drop the
    final EOS, and the student would never be taught to stop. A completion that is only
    EOS isolates that position: its loss is the divergence there, and it has a gradient."""
    lm = lora_model(tiny_model_dir)
    lm.train()
    teacher = Teacher(lm, "frozen")
    perturb(lm, 0.05)
    eos, method_sd = tok.eos_token_id, resolved("sd")
    stop_now = TrainItem(items[0].prompt, [eos], teacher_prompt=items[0].teacher_prompt)
    batch_items = [items[1], stop_now]
    assert items[1].completion[-1] == eos
    batch = collate(batch_items, pad_id=eos, device="cpu")
    assert batch["mask"].sum(1).tolist() == [len(items[1].completion), 1]
    assert (batch["student"]["input_ids"][1, 0] == eos) and not batch["student"]["attention_mask"][1, 0]  # EOS pads
    params = [p for p in lm.parameters() if p.requires_grad]
    base = base_model(tiny_model_dir)

    loss, _ = batch_loss(method_sd, lm, teacher, head_name_of(lm), batch, chunk=3)
    ref = torch.cat([kl_per_token(lm, base, it) for it in batch_items]).mean()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-6, rtol=1e-3)

    alone, _ = batch_loss(method_sd, lm, teacher, head_name_of(lm), collate([stop_now], eos, "cpu"), chunk=3)
    at_eos = kl_per_token(lm, base, stop_now)
    assert at_eos.shape == (1,) and at_eos.item() > 1e-4
    torch.testing.assert_close(alone.double(), at_eos[0], atol=1e-6, rtol=1e-5)
    assert max(float(g.abs().max()) for g in torch.autograd.grad(alone, params)) > 1e-6


def test_gold_items_get_cross_entropy_under_a_distillation_recipe(tmp_path, tiny_model_dir, items, tok):
    lm = lora_model(tiny_model_dir)
    perturb(lm, 0.05)
    gold = [TrainItem(it.prompt, it.completion, sft=True) for it in items[:3]]  # no teacher prompt needed
    batch = collate(gold, tok.pad_token_id, "cpu")
    loss, terms = batch_loss(
        resolved("sd", gold_mix=0.5, skip_first_tokens=2), lm, Teacher(lm), "lm_head.weight", batch, chunk=4
    )
    # by hand: −mean log p(y_t) over every token of the three gold completions (none skipped)
    logits = torch.cat([completion_logits_unpadded(lm, it.prompt, it.completion) for it in gold])
    ref = F.cross_entropy(logits, torch.tensor([t for it in gold for t in it.completion]))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert terms == {"sft": pytest.approx(ref.item(), rel=1e-5)}
    with pytest.raises(ValueError, match="mixes SFT and distillation items"):
        collate([gold[0], items[1]], tok.pad_token_id, "cpu")


def test_micro_batches_hold_one_kind_and_cover_every_item_each_epoch(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, batch_size=3, epochs=2)
    kinds = [False, True, False, False, True, False, False, True, False, False]  # 7 distill, 3 SFT
    batches = micro_batches(kinds, cfg, seed=5)
    assert len(batches) == 2 * (3 + 1)  # per epoch ceil(7/3) + ceil(3/3)
    for epoch in (batches[:4], batches[4:]):
        assert sorted(i for b in epoch for i in b) == list(range(10))
        assert all(len({kinds[i] for i in b}) == 1 and len(b) <= 3 for b in epoch)
    assert batches == micro_batches(kinds, cfg, seed=5) and batches != micro_batches(kinds, cfg, seed=6)
    plain = micro_batches([False] * 10, cfg, seed=5)  # one kind: batches of 3, 3, 3, 1 per epoch
    assert [len(b) for b in plain] == [3, 3, 3, 1] * 2


# --- train_round: resume, failures, lineage, rounds ----------------------------------------------


class Run:
    """A stand-in for the MLflow run."""

    def __init__(self):
        self.metrics, self.checkpoints = [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_checkpoint(self, step, point, path):
        self.checkpoints.append((step, path.is_file()))


def make_cfg(tmp_path, tiny_model_dir, recipe="sd", components=None, device="cpu", **train):
    settings = {
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
        "lr": 5e-3,
        "max_steps": 6,
        "batch_size": 2,
        "grad_accum": 2,
        "checkpoint_every": 2,
        "warmup_ratio": 0.2,
        "chunk_size": 4,
    }
    settings.update(train)
    params = tiny_params(tiny_model_dir, train=settings, model={"device": device})
    params.update(recipe=recipe, components=components or {})
    return build_config(params, root=tmp_path)


def run_round(cfg, items, tiny_model_dir, out, work, init_dir=None, on_step=None, digest="d" * 64):
    out.mkdir(parents=True, exist_ok=True)
    run = Run()
    info = train_round(cfg, items, tiny_model_dir, digest, out, work, run, init_dir=init_dir, on_step=on_step)
    return info, run


def curves(out):
    return [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


class Stop(Exception):
    pass


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (CUDA keeps its own RNG state)"),
        ),
    ],
)
def test_interrupted_run_resumes_from_the_checkpoint_and_ends_identically(tmp_path, tiny_model_dir, items, device):
    # EMA every 3 steps: the teacher state in the checkpoint matters too; LoRA dropout: the RNG state
    cfg = make_cfg(tmp_path, tiny_model_dir, recipe="ema", components={"teacher": {"ema_every": 3}}, device=device)
    info_a, run_a = run_round(cfg, items, tiny_model_dir, tmp_path / "out_a", tmp_path / "work_a")
    assert info_a["steps"] == 6 and not (tmp_path / "work_a" / "checkpoint.pt").exists()
    assert [c["ema_update"] for c in curves(tmp_path / "out_a")] == [0, 0, 1, 0, 0, 1]

    work_b, out_b = tmp_path / "work_b", tmp_path / "out_b"
    ckpt = work_b / "checkpoint.pt"

    def interrupt(step):
        if step == 5:
            assert torch.load(ckpt, weights_only=False)["step"] == 4
            raise Stop

    with pytest.raises(Stop):
        run_round(cfg, items, tiny_model_dir, out_b, work_b, on_step=interrupt)
    assert ckpt.is_file() and not (out_b / "train_info.json").exists()

    resumed_steps = []
    info_b, run_b = run_round(cfg, items, tiny_model_dir, out_b, work_b, on_step=resumed_steps.append)
    assert resumed_steps == [5, 6]  # continued from step 4, not from scratch
    assert [s for s, _ in run_b.metrics] == [5, 6]
    assert not ckpt.exists()  # removed on success
    assert info_b["steps"] == 6

    a, b = adapter(tmp_path / "out_a"), adapter(out_b)
    assert a.keys() == b.keys() and any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    ta, tb = torch.load(tmp_path / "out_a" / "teacher.pt"), torch.load(out_b / "teacher.pt")
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=0)
    ca, cb = curves(tmp_path / "out_a"), curves(out_b)
    assert [c["step"] for c in cb] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "divergence", "lr", "grad_norm", "ema_update"):
        assert [c[key] for c in cb] == pytest.approx([c[key] for c in ca], rel=1e-6, abs=1e-7), key
    assert info_b["final_loss"] == pytest.approx(info_a["final_loss"], rel=1e-6)


def test_resume_without_the_rng_state_would_differ(tmp_path, tiny_model_dir, items, monkeypatch):
    """Control for the resume test: with dropout the RNG state decides the result, so
    the identical ending above really depends on restoring it."""
    cfg = make_cfg(tmp_path, tiny_model_dir, max_steps=4)
    run_round(cfg, items, tiny_model_dir, tmp_path / "out_a", tmp_path / "work_a")

    def interrupt(step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        run_round(cfg, items, tiny_model_dir, tmp_path / "out_b", tmp_path / "work_b", on_step=interrupt)
    monkeypatch.setattr(train_mod, "_set_rng_state", lambda state: None)
    run_round(cfg, items, tiny_model_dir, tmp_path / "out_b", tmp_path / "work_b")
    a, b = adapter(tmp_path / "out_a"), adapter(tmp_path / "out_b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-5


def test_non_finite_loss_names_the_step(tmp_path, tiny_model_dir, items, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, max_steps=3, grad_accum=2)
    real, calls = train_mod.batch_loss, []

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 2, micro-batch 1
            return loss * float("nan"), terms
        return loss, terms

    monkeypatch.setattr(train_mod, "batch_loss", poisoned)
    steps = []
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 2, micro-batch 1"):
        run_round(cfg, items, tiny_model_dir, tmp_path / "out", tmp_path / "work", on_step=steps.append)
    assert steps == [1]
    assert not (tmp_path / "out" / "train_info.json").exists()


def test_check_lineage(tmp_path, tiny_model_dir, items):
    check_lineage(None, "a" * 64)
    prev = tmp_path / "prev"
    prev.mkdir()
    with pytest.raises(TrainingError, match=r"not a train stage output \(no train_info.json\)"):
        check_lineage(prev, "a" * 64)
    (prev / "train_info.json").write_text(json.dumps({"base_digest": "b" * 64, "steps": 1}))
    check_lineage(prev, "b" * 64)
    with pytest.raises(
        TrainingError,
        match=r"trained from model b{12}, but this run's model is a{12}: "
        r"a checkpoint from a different model cannot be continued",
    ):
        check_lineage(prev, "a" * 64)
    # train_round checks it before any work
    cfg = make_cfg(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="different model"):
        run_round(cfg, items, tiny_model_dir, out, tmp_path / "work", init_dir=prev, digest="a" * 64)
    assert list(out.iterdir()) == []


class ProbeTeacher(Teacher):
    """Records the student's weights and outputs when the teacher is built, and the
    teacher's weights and outputs at its first pass (before any EMA update)."""

    instances: list = []
    probe: torch.Tensor = None

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.student_start = {n: p.detach().clone() for n, p in self.params.items()}
        was = model.training
        model.eval()
        with torch.no_grad():
            self.student_logits = model(input_ids=self.probe).logits
        model.train(was)
        self.first = None
        ProbeTeacher.instances.append(self)

    def active(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            with super(ProbeTeacher, self).active():
                if self.first is None:
                    self.first = (
                        {n: w.clone() for n, w in self.weights.items()},
                        self.model(input_ids=self.probe).logits,
                    )
                yield

        return scope()


@pytest.fixture
def probe_teacher(monkeypatch, items):
    ProbeTeacher.instances = []
    ProbeTeacher.probe = torch.tensor([items[0].teacher_prompt + items[0].completion])
    monkeypatch.setattr(train_mod, "Teacher", ProbeTeacher)
    return ProbeTeacher


@pytest.mark.parametrize("recipe", ["sd", "ema"])
def test_second_round_continues_from_the_first(tmp_path, tiny_model_dir, items, probe_teacher, recipe):
    components = {"teacher": {"ema_every": 1, "ema_beta": 0.5}} if recipe == "ema" else {}
    cfg = make_cfg(tmp_path, tiny_model_dir, recipe=recipe, components=components, max_steps=3)
    r1, r2 = tmp_path / "round1", tmp_path / "round2"
    run_round(cfg, items, tiny_model_dir, r1, tmp_path / "w1")
    run_round(cfg, items, tiny_model_dir, r2, tmp_path / "w2", init_dir=r1)
    t1, t2 = probe_teacher.instances
    probe = probe_teacher.probe
    with torch.no_grad():
        base_logits = base_model(tiny_model_dir)(input_ids=probe).logits
        merged1_logits = load_model(r1 / "model", "float32", "cpu")(input_ids=probe).logits

    # round 2's student starts from round 1's adapter ...
    saved = adapter(r1)
    start = {n.replace(".default", ""): w for n, w in t2.student_start.items()}
    assert start.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(start[k], saved[k], atol=0, rtol=0)
    # ... which is round 1's merged model (an independent path), not the base model
    torch.testing.assert_close(t2.student_logits, merged1_logits, atol=1e-4, rtol=1e-4)
    assert (t2.student_logits - base_logits).abs().max() > 1e-3

    weights2, teacher2_logits = t2.first
    if recipe == "sd":
        # without the previous round's teacher there is nothing to continue the teacher from
        broken = tmp_path / "broken"
        shutil.copytree(r1, broken)
        (broken / "teacher.pt").unlink()
        with pytest.raises(TrainingError, match="no teacher.pt"):
            run_round(cfg, items, tiny_model_dir, tmp_path / "round2b", tmp_path / "w3", init_dir=broken)
    if recipe == "sd":
        # a frozen teacher is the initial model in every round
        torch.testing.assert_close(t1.first[1], base_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(teacher2_logits, base_logits, atol=1e-5, rtol=0)
    else:
        # an EMA teacher continues from round 1's teacher.pt (which has moved off the base)
        saved_teacher = torch.load(r1 / "teacher.pt")
        assert weights2.keys() == saved_teacher.keys()
        for k in saved_teacher:
            torch.testing.assert_close(weights2[k], saved_teacher[k], atol=0, rtol=0)
        assert (teacher2_logits - base_logits).abs().max() > 1e-4
        assert (teacher2_logits - t2.student_logits).abs().max() > 1e-4  # and it is not the student


def test_full_finetuning_round(tmp_path, tiny_model_dir, items):
    cfg = make_cfg(
        tmp_path,
        tiny_model_dir,
        recipe="ema",
        components={"teacher": {"ema_every": 1}},
        lora={"enabled": False},
        max_steps=2,
        lr=1e-3,
    )
    info, _ = run_round(cfg, items, tiny_model_dir, tmp_path / "out", tmp_path / "work")
    assert info["steps"] == 2 and math.isfinite(info["final_loss"])
    assert not (tmp_path / "out" / "adapter").exists()
    trained = load_model(tmp_path / "out" / "model", "float32", "cpu").state_dict()
    base = base_model(tiny_model_dir).state_dict()
    assert any((trained[k] - base[k]).abs().max() > 1e-5 for k in base)
    teacher = torch.load(tmp_path / "out" / "teacher.pt")
    assert "model.embed_tokens.weight" in teacher
    # the EMA teacher sits strictly between the base and the trained weights
    k = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < (teacher[k] - base[k]).norm() < (trained[k] - base[k]).norm()


@pytest.mark.parametrize(
    "recipe, train, cached",
    [
        ("sd", {"epochs": 2, "max_steps": 0}, True),
        ("sd", {"epochs": 1, "max_steps": 0}, False),  # every item seen once: nothing to reuse
        ("sd", {"epochs": 2, "max_steps": 0, "cache_teacher": False}, False),
        ("ema", {"epochs": 2, "max_steps": 0}, False),  # the teacher moves
    ],
)
def test_teacher_cache_in_a_round(tmp_path, tiny_model_dir, items, recipe, train, cached, monkeypatch):
    """Used only when a frozen teacher would see items again; the round then ends as
    without it (the cached rows differ from recomputed ones only by float rounding)."""
    made = []
    monkeypatch.setattr(train_mod, "TeacherCache", lambda: made.append(TeacherCache()) or made[-1])
    cfg = make_cfg(tmp_path / "on", tiny_model_dir, recipe, **train)
    run_round(cfg, items, tiny_model_dir, tmp_path / "on" / "out", tmp_path / "on" / "work")
    assert bool(made) == cached
    if cached:
        assert {i for _, i in made[0].rows} == set(range(len(items)))
        off = make_cfg(tmp_path / "off", tiny_model_dir, recipe, **train, cache_teacher=False)
        run_round(off, items, tiny_model_dir, tmp_path / "off" / "out", tmp_path / "off" / "work")
        for name, w in adapter(tmp_path / "off" / "out").items():
            torch.testing.assert_close(adapter(tmp_path / "on" / "out")[name], w, atol=1e-5, rtol=1e-4)
