"""Throughput and peak memory of one distillation optimizer step: ours, naive, TRL's GKD.

All methods train the same model with the same LoRA adapter (all attention and MLP
projections, dropout 0 as under TRL's default `disable_dropout`) on the same batch
(B sequences of a P-token prompt and a C-token completion, random token ids, no
padding), with the generalized JSD at β=0.5 and temperature 1 (TRL's GKD loss applies
no temperature), a frozen teacher equal to the base model, AdamW and grad-norm clipping
at 1.0. Generation is excluded on both sides: TRL runs with λ=0 (no on-policy sampling)
and its `training_step` is called on prepared inputs, as its `train()` loop would.

ours:  `unisd.objective.batch_loss` (recipe gkd: hidden states, LM head and divergence in
       checkpointed chunks), teacher weights swapped into the same model.
naive: the same model and teacher, full logits from `model(...)` for student and
       teacher, `unisd.losses.token_divergence` on the full [B, C, V] tensors.
trl:   `trl.experimental.gkd.GKDTrainer.training_step` (full-sequence logits of the
       student and of a separate teacher model); gradient checkpointing and bf16, which
       TRL turns on by default, are off so that all three do the same work in fp32.

The teacher sees the student's own prompt in every method, so the work is equal; in
real UniSD runs the teacher's prompt also holds the gold demonstration (a longer
teacher forward).

Throughput: the methods live in one process and their steps are interleaved (see
_common.py); tokens/s counts the B×(P+C) tokens of a step. Every method starts from the
same adapter weights and takes the same steps on the same batch, so their losses must
match: the table shows each one's first loss. Memory: each method again in a fresh
process after one warm-up step (optimizer state allocated); "peak RSS" is the whole
process at its worst during a step (model, teacher copy, optimizer state, activations),
"step extra" the part above the resident state between steps.
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import _common as C

FULL = {"batch": 4, "prompt": 128, "completion": 384, "lora_r": 64, "lora_alpha": 128, "chunk": 128, "reps": 5}
QUICK = {"batch": 2, "prompt": 16, "completion": 48, "lora_r": 4, "lora_alpha": 8, "chunk": 16, "reps": 2}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA, TEMPERATURE, LR = 0.5, 1.0, 1e-4


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def _perturb_lora(model) -> None:
    """The same non-zero adapter in every method (seeded by parameter name), so the
    student differs from the base-model teacher and all methods start equal."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.split("layers.")[-1].encode()))
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in name else p.shape[-1] ** -0.5))


def _batch(tok, cfg):
    """Random token ids (specials excluded), the same for every method."""
    import torch

    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, len(tok), (n,), generator=g).tolist()  # noqa: E731
    return [(draw(cfg["prompt"]), draw(cfg["completion"])) for _ in range(cfg["batch"])]


def _step(params, optimizer, loss_fn):
    import torch

    def step() -> float:
        loss = loss_fn()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _unisd_student(model_dir: Path, cfg):
    """The student and its frozen teacher as `unisd.train` builds them, recipe gkd."""
    import torch

    from unisd.config import load_config
    from unisd.teachers import Teacher
    from unisd.train import build_student

    ucfg = load_config(
        C.REPO / "params.yaml",
        {
            "model.name": str(model_dir),
            "model.device": "cpu",
            "recipe": "gkd",
            "components": {"temperature": TEMPERATURE},
            "train.lora": {
                "enabled": True,
                "r": cfg["lora_r"],
                "alpha": cfg["lora_alpha"],
                "dropout": 0.0,
                "target_modules": TARGETS,
            },
        },
    )
    model = build_student(ucfg, model_dir, None)
    teacher = Teacher(model, "frozen")  # the adapter is still zero: the teacher is the base model
    _perturb_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return ucfg, model, teacher, params, torch.optim.AdamW(params, lr=LR)


def build(method: str, model_dir: Path, cfg, bf16: bool = False) -> tuple:
    """(step function, tokens per step) for one method; `bf16`: forward under bf16 autocast."""
    import torch

    from unisd.modeling import load_tokenizer
    from unisd.train import TrainItem, collate

    tok = load_tokenizer(model_dir)
    pairs = _batch(tok, cfg)
    tokens = cfg["batch"] * (cfg["prompt"] + cfg["completion"])
    if method == "trl":
        return _trl_step(model_dir, tok, pairs, cfg, bf16), tokens

    from unisd.losses import token_divergence, weighted_token_loss
    from unisd.objective import batch_loss

    ucfg, model, teacher, params, optimizer = _unisd_student(model_dir, cfg)
    batch = collate([TrainItem(p, c, teacher_prompt=p) for p, c in pairs], tok.pad_token_id, model.device)
    head_weight = model.get_output_embeddings().weight
    head_name = next(n for n, p in model.named_parameters() if p is head_weight)
    width = batch["width"]

    def ours() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = batch_loss(ucfg.method, model, teacher, head_name, batch, cfg["chunk"])
        loss.backward()
        return loss.item()

    def logits(inputs):
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            use_cache=False,
        )
        return out.logits[:, -(width + 1) : -1]

    def naive() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with teacher.active():
                teacher_logits = logits(batch["teacher_prompt"])
            ell = token_divergence(logits(batch["student"]), teacher_logits, "jsd", BETA, TEMPERATURE)
            loss = weighted_token_loss(ell, batch["mask"])
        loss.backward()
        return loss.item()

    return _step(params, optimizer, {"ours": ours, "naive": naive}[method]), tokens


def _trl_step(model_dir: Path, tok, pairs, cfg, bf16: bool):
    import os

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental: we know
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from unisd.modeling import load_model

    args = GKDConfig(
        output_dir=str(Path(tempfile.gettempdir()) / "unisd-bench-trl"),
        per_device_train_batch_size=cfg["batch"],
        lmbda=0.0,
        beta=BETA,
        seq_kd=False,
        learning_rate=LR,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=bf16,
        gradient_checkpointing=False,
        disable_dropout=True,
        report_to=[],
        max_length=cfg["prompt"] + cfg["completion"],
    )
    dummy = Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]})
    lora = LoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    trainer = GKDTrainer(
        model=load_model(model_dir, device="cpu"),
        teacher_model=load_model(model_dir, device="cpu"),
        args=args,
        train_dataset=dummy,
        processing_class=tok,
        peft_config=lora,
    )
    _perturb_lora(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop, which we bypass
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    ids = torch.tensor([p + c for p, c in pairs])
    labels = ids.clone()
    labels[:, : cfg["prompt"]] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return _step(params, optimizer, lambda: trainer.training_step(trainer.model, dict(inputs)).item())


def setup_memory(method: str, model_dir: str, cfg: dict, bf16: bool):
    """Fresh-process memory factory: the method after one warm-up step."""
    step, _ = build(method, Path(model_dir), cfg, bf16)
    step()
    return step


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--no-trl", action="store_true", help="skip TRL even if it is installed")
    p.add_argument("--bf16", action="store_true", help="forward passes under bf16 autocast (all methods)")
    args = C.parse(p)
    cfg = QUICK if args.quick else FULL
    reps = args.reps or cfg["reps"]
    methods = ["ours", "naive"] + (["trl"] if _has_trl() and not args.no_trl else [])
    model_dir = C.model_dir(args.quick)

    built = {m: build(m, model_dir, cfg, args.bf16) for m in methods}
    tokens = built["ours"][1]
    losses = {m: [] for m in methods}
    steps = {m: (lambda m=m: losses[m].append(built[m][0]())) for m in methods}  # noqa: F821 - run before the del
    times = C.interleaved(steps, reps, warmup=1)
    del built, steps  # free the models before the memory children load theirs
    memory = {
        m: [
            C.peak_memory(__file__, "setup_memory", method=m, model_dir=str(model_dir), cfg=cfg, bf16=args.bf16)
            for _ in range(max(1, reps // 2))
        ]
        for m in methods
    }

    speed = {m: [tokens / t for t in times[m]] for m in methods}
    rows = []
    for m in methods:
        vs = lambda ref: C.spread(C.ratios(speed[m], speed[ref]), "{:.2f}×") if ref in methods else "—"  # noqa: E731, B023
        rows.append(
            [
                m,
                C.spread(speed[m]),
                C.spread([r["peak_mb"] for r in memory[m]], "{:.0f}"),
                C.spread([r["extra_mb"] for r in memory[m]], "{:.0f}"),
                vs("trl"),
                vs("naive"),
                f"{losses[m][0]:.6f}",
            ]
        )
    first = [losses[m][0] for m in methods]
    notes = [
        f"model {model_dir.name}, B={cfg['batch']}, prompt {cfg['prompt']} + completion {cfg['completion']} "
        f"tokens, LoRA r={cfg['lora_r']}, {'bf16 autocast' if args.bf16 else 'fp32'}, {C.environment()['threads']} threads; median (min–max) over "
        f"{reps} interleaved steps (memory: {len(memory['ours'])} fresh processes). First losses agree within "
        f"{(max(first) - min(first)) / abs(max(first)):.1e} (relative): the methods compute the same thing."
    ]
    if "trl" not in methods:
        notes.append("TRL is not installed (pip install 'unisd[bench]'): its row is missing.")
    C.report(
        "Distillation training step",
        ["method", "tokens/s", "peak RSS MiB", "step extra MiB", "vs trl", "vs naive", "first loss"],
        rows,
        {
            "config": cfg
            | {"reps": reps, "model": str(model_dir), "beta": BETA, "temperature": TEMPERATURE, "bf16": args.bf16},
            "tokens_per_step": tokens,
            "seconds": times,
            "memory": memory,
            "losses": losses,
        },
        args.json,
        notes,
    )


if __name__ == "__main__":
    main()
