"""The training loop of one round: the student learns from its teacher (or from targets).

Items are batched (`collate`: student, teacher and negative prompts with the same
completion tokens, aligned by completion index; a micro-batch holds items of one kind
only, distillation or SFT), and each micro-batch's loss is the objective of
`unisd.objective.batch_loss` (docs/method.md §1–§2, §7.3), the formula in its docstring.

LoRA (peft) or full fine-tuning; AdamW with warmup + cosine, grad-norm clipping and
accumulation. A resumable checkpoint is written atomically every `checkpoint_every`
optimizer steps; a rerun after an interruption continues from it and ends with the same
weights. A non-finite loss stops the run naming the step. accelerate places the model
and, under `accelerate launch` (`unisd.distributed`), gives each process its share of
every step's micro-batches and the all-reduce that makes their gradient one process's
(`train_round`); with `train.sharding: fsdp` each process holds 1/N of the decoder
(`unisd.sharding`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from unisd.config import Config
from unisd.logprobs import pack_left
from unisd.objective import batch_loss
from unisd.sharding import clip_grad_norm_, copy_full_, full_state, shard_student
from unisd.teachers import Teacher

log = logging.getLogger(__name__)
WHOLE = StateDictOptions(full_state_dict=True)  # optimizer state by parameter name, whole tensors
progress_log = logging.getLogger("unisd.progress")  # a periodic progress line (unisd.progress)


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, incompatible checkpoint)."""


@dataclass
class TrainItem:
    prompt: list[int]  # the student's prompt x
    completion: list[int]  # the trajectory y
    teacher_prompt: list[int] | None = None  # x with the gold demonstration
    negative_prompt: list[int] | None = None  # x with a wrong demonstration (contrastive)
    scores: list[list[float]] | None = None  # [K][T] agreement scores
    sft: bool = False  # cross-entropy on the completion (a gold_mix item), whatever the recipe's loss


# --------------------------------------------------------------------------- batching


def collate(items: list[TrainItem], pad_id: int, device) -> dict[str, Any]:
    """Left-padded student/teacher/negative batches; completions right-aligned in [B, C].
    `mask` is True at every completion token (EOS included); `sft` says the batch's kind."""
    if len({it.sft for it in items}) > 1:
        raise ValueError("a micro-batch mixes SFT and distillation items (see micro_batches)")
    width = max(len(it.completion) for it in items)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    targets = torch.zeros(len(items), width, dtype=torch.long)
    for b, it in enumerate(items):
        mask[b, width - len(it.completion) :] = True
        targets[b, width - len(it.completion) :] = torch.tensor(it.completion)
    batch: dict[str, Any] = {
        "mask": mask.to(device),
        "targets": targets.to(device),
        "width": width,
        "sft": items[0].sft,
        "student": pack_left([(it.prompt, it.completion) for it in items], pad_id, device),
    }
    for name in ("teacher_prompt", "negative_prompt"):
        if getattr(items[0], name) is not None:
            batch[name] = pack_left([(getattr(it, name), it.completion) for it in items], pad_id, device)
    if items[0].scores is not None:
        k = len(items[0].scores)
        scores = torch.zeros(k, len(items), width)
        for b, it in enumerate(items):
            scores[:, b, width - len(it.completion) :] = torch.tensor(it.scores)
        batch["scores"] = scores.to(device)
    return batch


class TeacherCache:
    """A frozen teacher's hidden states over each item's completion, kept for the item's
    next visit (`train.epochs` > 1): the teacher cannot change, so its passes would only
    repeat. One [len(completion), H] tensor per item and teacher prompt (gold; negative
    under the contrastive loss). A batch is served from the cache only when all its rows
    are there; other batches run the teacher and fill it. Rows come back as computed in
    their first batch, which differs from a recomputation in another batch only by
    float rounding (padding changes the batch shape)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    def hidden(self, prompt: str, batch: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        width, keys = batch["width"], [(prompt, i) for i in batch["ids"]]
        lengths = batch["mask"].sum(1).tolist()
        if all(k in self.rows for k in keys):
            first = self.rows[keys[0]]
            out = first.new_zeros(len(keys), width, first.shape[-1])
            for b, (k, n) in enumerate(zip(keys, lengths)):
                out[b, width - n :] = self.rows[k]
            return out
        out = compute()
        for b, (k, n) in enumerate(zip(keys, lengths)):
            self.rows[k] = out[b, width - n :].clone()
        return out


# --------------------------------------------------------------------------- setup


def build_student(cfg: Config, base_dir: Path, init_dir: Path | None, device: str | None = None) -> Any:
    """The student (a transformers model, peft-wrapped under LoRA): the base model with a
    LoRA adapter (or all weights) trainable, continuing from a previous round's output
    when `init_dir` is given; on `device` (this process's, under N processes), by default
    `model.device`."""
    from unisd.modeling import load_model

    device = device or cfg.model.device
    lora = cfg.train.lora
    if not lora.enabled:
        start = init_dir / "model" if init_dir else base_dir
        full = load_model(start, cfg.model.dtype, device)
        full.train()
        return full
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model: Any = load_model(base_dir, cfg.model.dtype, device)  # peft-wrapped below
    alpha: Any = lora.alpha  # peft annotates an int; the float scale works as it always has
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    if init_dir is not None:
        state = load_file(init_dir / "adapter" / "adapter_model.safetensors", device=str(model.device))
        result: Any = set_peft_model_state_dict(model, state)  # peft's own annotation lacks unexpected_keys
        if result.unexpected_keys:
            raise TrainingError(
                f"{init_dir}/adapter does not fit this LoRA configuration (unexpected {result.unexpected_keys[:2]})"
            )
    model.train()
    return model


def check_lineage(init_dir: Path | None, base_digest: str) -> None:
    """A previous round must have trained from the same base model."""
    if init_dir is None:
        return
    info_file = init_dir / "train_info.json"
    if not info_file.is_file():
        raise TrainingError(f"{init_dir}: not a train stage output (no train_info.json)")
    got = json.loads(info_file.read_text())["base_digest"]
    if got != base_digest:
        raise TrainingError(
            f"{init_dir} was trained from model {got[:12]}, but this run's model is "
            f"{base_digest[:12]}: a checkpoint from a different model cannot be continued"
        )


def micro_batches(kinds: list[bool], cfg: Config, seed: int) -> list[list[int]]:
    """Item indices per micro-batch for all epochs, reshuffled each epoch (seeded).

    `kinds[i]` is item i's kind (SFT or not): each micro-batch holds one kind, since the
    two losses need different passes. With two kinds the batches of each are cut from
    the shuffled order, then shuffled together; with one, the order is the plain one.
    """
    size, out = cfg.train.batch_size, []
    for epoch in range(cfg.train.epochs):
        order = list(range(len(kinds)))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        groups = [[i for i in order if kinds[i] == kind] for kind in sorted(set(kinds))]
        batches = [group[i : i + size] for group in groups for i in range(0, len(group), size)]
        if len(groups) > 1:
            random.Random(f"{seed}:epoch:{epoch}:kinds").shuffle(batches)
        out += batches
    return out


def _teacher_cache(cfg: Config, items: list[TrainItem], lm, visits: int, per_epoch: int) -> TeacherCache | None:
    """A TeacherCache when the teacher is frozen and items come back (more micro-batches
    than one pass over the data), and `train.cache_teacher` allows it."""
    if not cfg.train.cache_teacher or cfg.method.teacher.kind != "frozen" or visits <= per_epoch:
        return None
    passes = 2 if cfg.method.contrastive.enabled else 1
    size = sum(len(it.completion) for it in items) * passes * lm.config.hidden_size * 4
    log.info(
        "frozen teacher: caching its hidden states for repeat visits (%.0f MiB; train.cache_teacher)", size / 2**20
    )
    return TeacherCache()


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the trainable parameters (gathered from shards: a collective)."""
    return full_state({n: p for n, p in model.named_parameters() if p.requires_grad})


def _rng_state() -> dict[str, Any]:
    # CUDA keeps its own generators (LoRA dropout on a GPU draws from them).
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


# --------------------------------------------------------------------------- processes


def _accelerator(cfg: Config) -> tuple[Any, bool]:
    """accelerate's view of this process (its rank, device and the collectives), and
    whether the student is sharded. One process unless the run was started by
    `accelerate launch` (`unisd.distributed`).

    The data parallelism is DDP's by default (every process holds the whole student,
    gradients are summed across processes once per optimizer step), done here rather
    than by the DistributedDataParallel wrapper: the objective runs the decoder and the
    LM head itself, a chunk at a time (`completion_hidden`, `unisd.chunked`), and DDP's
    wrapper only synchronises gradients after a forward through it. With
    `train.sharding: fsdp`, or an accelerate config asking for FSDP, each process holds
    1/N of the decoder (`unisd.sharding`); DeepSpeed and Megatron are refused, not
    silently run as something else.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=cfg.model.device == "cpu" or not torch.cuda.is_available())
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise TrainingError(
            f"accelerate asks for {accelerator.distributed_type.value}: unisd trains data-parallel, "
            "whole (DDP) or sharded (FSDP) (README 'N-process training')"
        )
    n, accum = accelerator.num_processes, cfg.train.grad_accum
    if accum % n:
        raise TrainingError(
            f"train.grad_accum ({accum}) is not a multiple of the {n} processes: each process runs "
            "grad_accum / N micro-batches of every optimizer step"
        )
    fsdp = cfg.train.sharding == "fsdp" or accelerator.distributed_type == DistributedType.FSDP
    return accelerator, fsdp and n > 1


def _sum_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Every process's gradient becomes the sum over processes of theirs.

    Process r accumulated Σ_{j∈r} ∇L_j / k over its share of the k micro-batches (each
    loss divided by the global k, as one process does), so the sum over processes is
    Σ_j ∇L_j / k: one process's gradient of the same global batch, up to the order of
    the float additions. One all-reduce of one flat buffer (the trainable parameters'
    size once more: small for a LoRA adapter). Sharded parameters are left alone: FSDP's
    reduce-scatter has summed their gradients already."""
    params = [p for p in params if not isinstance(p, DTensor)]  # shards: FSDP has summed them
    if accelerator.num_processes == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "sum")
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)


def _restore_rng(states: list[dict[str, Any]], accelerator, seed: int, step: int) -> None:
    """Each process continues its own random stream (LoRA dropout) from a checkpoint
    written by as many processes; with another count the streams restart from the seed
    and the step (the dropout masks then differ from an uninterrupted run's)."""
    if len(states) == accelerator.num_processes:
        _set_rng_state(states[accelerator.process_index])
        return
    log.warning(
        "checkpoint written by %d processes, resumed on %d: random streams restart from the seed",
        len(states),
        accelerator.num_processes,
    )
    torch.manual_seed(hash((seed, step, accelerator.process_index)) % 2**63)


# --------------------------------------------------------------------------- the loop


def _share_of_a_step(
    cfg: Config, lm, teacher: Teacher, head_name: str, items, group, tok, cache, accelerator, step: int
) -> dict[str, Any]:
    """Forward and backward of this process's share of one optimizer step's micro-batches
    (`group`, the global batch): each loss is divided by the global accumulation k, so
    that the gradients summed over processes are one process's (`_sum_gradients`).
    Returns the share's sums: loss and terms (Σ_j L_j / k), tokens, and the first
    failure (a non-finite loss), which every process raises after they have all met."""
    accum, bf16 = len(group), cfg.train.bf16_autocast
    share = len(group) // accelerator.num_processes
    first = accelerator.process_index * share
    report: dict[str, Any] = {"loss": 0.0, "terms": {}, "tokens": 0, "failure": None}
    for j in range(first, first + share):
        idx = group[j]
        batch = collate([items[i] for i in idx], tok.pad_token_id, lm.device) | {"ids": idx}
        with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, terms = batch_loss(cfg.method, lm, teacher, head_name, batch, cfg.train.chunk_size, cache)
        if not torch.isfinite(loss):
            report["failure"] = (
                f"non-finite loss ({float(loss)}) at step {step + 1}, micro-batch {j + 1}; terms {terms}"
            )
            break
        accelerator.backward(loss / accum)
        report["loss"] += loss.item() / accum
        for k, v in terms.items():
            report["terms"][k] = report["terms"].get(k, 0.0) + v / accum
        report["tokens"] += int(batch["student"]["attention_mask"].sum())
    return report


def _combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The global batch's loss, terms and tokens: sums of the processes' shares (each
    already divided by the global k). A term logged by some micro-batches only (SFT
    items' `sft`) is averaged over all k, as with one process."""
    terms: dict[str, float] = {}
    for r in reports:
        for k, v in r["terms"].items():
            terms[k] = terms.get(k, 0.0) + v
    return {"loss": sum(r["loss"] for r in reports), "terms": terms, "tokens": sum(r["tokens"] for r in reports)}


def train_round(
    cfg: Config,
    items: list[TrainItem],
    base_dir: Path,
    base_digest: str,
    out: Path,
    work: Path,
    run,
    init_dir: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one round and write `out/` (merged model, adapter, teacher state, curves).

    `work` holds the resumable checkpoint (kept across failures, deleted on success).
    `on_step` is called after each optimizer step (tests use it to interrupt a run).

    Under `accelerate launch` every process runs this function: each takes an equal,
    contiguous share of every optimizer step's k micro-batches, gradients are summed
    across processes (`_sum_gradients`), and every process applies the same update to
    the same weights, so the student and the teacher (an EMA of the student's weights)
    stay identical everywhere. The main process alone logs and writes the checkpoint and
    the outputs; a checkpoint resumes on any number of processes.
    """
    from accelerate.utils import gather_object
    from transformers import get_cosine_schedule_with_warmup

    from unisd.modeling import load_tokenizer

    method = cfg.method
    check_lineage(init_dir, base_digest)
    accelerator, sharded = _accelerator(cfg)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.run.seed)  # the same initial student (the LoRA initialisation) in every process
    model = build_student(cfg, base_dir, init_dir, str(accelerator.device))
    if sharded:
        shard_student(model)  # before the teacher and the optimizer take its parameters
        if main:
            log.info(
                "sharded (FSDP2): %d processes, each holding a piece of every decoder parameter",
                accelerator.num_processes,
            )
    if accelerator.process_index:  # other processes draw their own dropout masks; the main one continues
        torch.manual_seed(cfg.run.seed + accelerator.process_index)
    teacher = Teacher(model, method.teacher.kind, method.teacher.ema_every, method.teacher.ema_beta)
    if init_dir is not None:
        # The previous round's teacher: an EMA teacher continues from it, and a frozen one
        # stays the initial model in every round (the teacher above would be the
        # previous round's student).
        if not (init_dir / "teacher.pt").is_file():
            raise TrainingError(f"{init_dir}: no teacher.pt to continue the teacher from")
        teacher.load_state_dict(torch.load(init_dir / "teacher.pt", map_location=model.device))
    head_weight = model.get_output_embeddings().weight
    head_name = next((n for n, p in model.named_parameters() if p is head_weight), "lm_head.weight")
    params = [p for p in model.parameters() if p.requires_grad]
    # Plain torch objects: accelerate's prepared scheduler would step N times per step.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = micro_batches([it.sft for it in items], cfg, cfg.run.seed)
    accum = cfg.train.grad_accum
    total = cfg.train.max_steps or math.ceil(len(batches) / accum)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total), total)

    step, curves = 0, []
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        for n, p in model.named_parameters():
            if n in state["trainable"]:
                copy_full_(p, state["trainable"][n])
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=WHOLE)
        scheduler.load_state_dict(state["scheduler"])
        teacher.load_state_dict(state["teacher"])
        step, curves = state["step"], state["curves"]
        _restore_rng(state["rng"], accelerator, cfg.run.seed, step)
        log.info("resuming from %s at step %d of %d", ckpt, step, total)

    tok = load_tokenizer(base_dir)
    cache = _teacher_cache(cfg, items, model, total * accum, len(batches) // cfg.train.epochs)
    while step < total:
        started = time.monotonic()
        group = [batches[(step * accum + j) % len(batches)] for j in range(accum)]
        mine = _share_of_a_step(cfg, model, teacher, head_name, items, group, tok, cache, accelerator, step)
        reports = gather_object([mine])  # every process's share, in every process
        if failure := next((r["failure"] for r in reports if r["failure"]), None):
            raise TrainingError(failure)
        _sum_gradients(accelerator, params)
        clip = clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_  # the former: over shards
        grad_norm = float(clip(params, cfg.train.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        teacher_moved = teacher.after_step(step)
        elapsed = time.monotonic() - started
        done = _combine(reports)
        point = {
            "step": step,
            "loss": done["loss"],
            **done["terms"],
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": done["tokens"] / max(elapsed, 1e-9),
            "ema_update": int(teacher_moved),
        }
        curves.append(point)
        if main:
            run.log_metrics({f"train/{k}": v for k, v in point.items() if k != "step"}, step=step)
        if main and (step % 10 == 0 or step == total):
            progress_log.info(
                "train step %d/%d: loss %.4f, %.0f tok/s", step, total, done["loss"], point["tokens_per_s"]
            )
        if step % cfg.train.checkpoint_every == 0 and step < total:
            rng = gather_object([_rng_state()])  # each process's random streams
            if main or sharded:  # gathering shards is a collective; whole, only the writer needs it
                state = _checkpoint_state(model, optimizer, scheduler, teacher, step, curves, rng)
            if main:
                _save_checkpoint(ckpt, state)
                run.log_checkpoint(step, point, ckpt)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step)

    info = _train_info(cfg, base_digest, step, curves)
    teacher_state = teacher.state_dict() if main or sharded else {}  # gathered from shards by every process
    if sharded:  # the main process writes a whole copy: the base weights and the gathered adapter
        trained = _trainable_state(model)
        if main:
            model = build_student(cfg, base_dir, init_dir, "cpu")
            for n, p in model.named_parameters():
                if n in trained:
                    copy_full_(p, trained[n])
    if main:
        _write_outputs(cfg, model, tok, teacher_state, out, curves, info)
        ckpt.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return info


TIMINGS = ("tokens_per_s",)


def _sort_target_modules(path: Path) -> None:
    """peft writes target_modules from a set, in hash order; sort it so the file is reproducible."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _checkpoint_state(
    lm, optimizer, scheduler, teacher: Teacher, step: int, curves: list, rng: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a resume on any number of processes, sharded or not, needs: the trainable
    weights, the optimizer state (keyed by parameter name) and the teacher, all whole
    tensors; the step and every process's random streams (`rng`). Gathering shards is a
    collective: every process calls this, the main one writes it (`_save_checkpoint`)."""
    return {
        "trainable": _trainable_state(lm),
        "optimizer": get_optimizer_state_dict(lm, optimizer, options=WHOLE),
        "scheduler": scheduler.state_dict(),
        "teacher": teacher.state_dict(),
        "rng": rng,
        "step": step,
        "curves": curves,
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _train_info(cfg: Config, base_digest: str, steps: int, curves: list) -> dict[str, Any]:
    return {
        "base_digest": base_digest,
        "steps": steps,
        "recipe": cfg.recipe,
        "final_loss": curves[-1]["loss"] if curves else None,
    }


def _write_outputs(
    cfg: Config, lm, tok, teacher_state: dict[str, torch.Tensor], out: Path, curves: list, info: dict[str, Any]
) -> None:
    """Adapter (LoRA), teacher weights, curves, the merged model for evaluation, and `info`."""
    torch.save(teacher_state, out / "teacher.pt")
    if cfg.train.lora.enabled:
        lm.save_pretrained(out / "adapter")
        _sort_target_modules(out / "adapter" / "adapter_config.json")
        lm = lm.merge_and_unload()
    lm.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    with open(out / "curves.jsonl", "w") as fh:  # timings stay in MLflow: the file is reproducible
        for point in curves:
            fh.write(json.dumps({k: v for k, v in point.items() if k not in TIMINGS}) + "\n")
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
