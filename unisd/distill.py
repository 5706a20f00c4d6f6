"""The self-distillation stages: contexts, negatives, and per round generate → filter → train.

Like `unisd.stages`, each is a plain function `(config, input paths) -> output path`
that writes its output atomically and logs a nested MLflow run.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

from unisd.artifacts import dir_digest, write_json_atomic
from unisd.config import Config
from unisd.data.schema import Example, iter_jsonl, read_examples, write_jsonl
from unisd.stages import StageContext, cache_key, stage_output

log = logging.getLogger(__name__)

NEGATIVES_PER_EXAMPLE = 4  # the reference's count; one is sampled per example for training


def train_examples(cfg: Config, data: Path) -> list[Example]:
    """The training pool: the first `train_set.limit` examples of each train split."""
    out = []
    for bench in cfg.train_benchmarks:
        examples = read_examples(data / bench / "train.jsonl")
        out += examples[: cfg.train_set.limit] if cfg.train_set.limit else examples
    return out


def _by_benchmark(examples: list[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.benchmark, []).append(ex)
    return groups


def _builder(cfg: Config, model_dir: Path):
    from unisd.modeling import load_tokenizer
    from unisd.prompts import PromptBuilder

    tok = load_tokenizer(model_dir)
    return tok, PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


# --------------------------------------------------------------------------- contexts (§2.1)


def contexts_stage(cfg: Config, model: Path, data: Path, out: Path, ctx: StageContext) -> Path:
    """K auxiliary contexts per training example (random, retrieval or induction)."""
    from unisd import contexts

    agreement = cfg.method.agreement
    inputs = {"model": model, "data": data}
    with stage_output(ctx, "contexts", "contexts", cfg, inputs, out, {"kind": agreement.contexts, "k": agreement.k}) \
            as (run, tmp):
        records: list[dict[str, Any]] = []
        groups = _by_benchmark(train_examples(cfg, data))
        if agreement.contexts == "random":
            for exs in groups.values():
                records += contexts.random_refs(exs, agreement.k, cfg.run.seed)
        elif agreement.contexts == "retrieval":
            embed = _embedder()
            for exs in groups.values():
                records += contexts.retrieval_refs(exs, agreement.k, embed)
        else:
            records = _induced(cfg, model, groups)
        write_jsonl(tmp / "contexts.jsonl", records)
        run.log_metrics({"examples": len(records)})
        run.log_artifacts(tmp / "contexts.jsonl")
    return out


def _embedder():
    """all-MiniLM-L6-v2 from its pinned offline wheel, as a texts -> embeddings function."""
    from sentence_transformers import SentenceTransformer

    from unisd.assets import embedding_model_dir

    model = SentenceTransformer(str(embedding_model_dir()), device="cpu")
    return lambda texts: model.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False)


def _induced(cfg: Config, model_dir: Path, groups: dict[str, list[Example]]) -> list[dict[str, Any]]:
    from unisd import contexts
    from unisd.generation import Sampling, generate
    from unisd.modeling import load_model

    tok, builder = _builder(cfg, model_dir)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.device)
    k, records = cfg.method.agreement.k, []
    for bench, exs in groups.items():
        demo_sets = contexts.induction_demo_sets(exs, k, cfg.run.seed)
        prompts = [_fitting_request(builder, demos, cfg.prompts.mcq_format) for demos in demo_sets]
        outs = generate(model, tok, prompts, Sampling(96, do_sample=True, temperature=0.7, seed=cfg.run.seed),
                        cfg.generation.batch_size, builder.stop_strings, desc=f"induce {bench}",
                        backend=cfg.generation.backend)
        instructions = [" ".join(c.text.split()) or "Solve the problem step by step." for c in outs]
        records += contexts.induction_records(exs, k, [[d.id for d in ds] for ds in demo_sets], instructions)
    return records


def _fitting_request(builder, demos: list[Example], mcq_format: str) -> list[int]:
    """The induction request with as many of its demonstrations as fit the prompt budget."""
    from unisd.contexts import induction_request

    for n in range(len(demos), 0, -1):
        if (ids := builder.encode(induction_request(demos[:n], mcq_format))) is not None:
            return ids
    raise ValueError(f"an induction request with one demonstration ({demos[0].id}) exceeds "
                     f"prompts.max_prompt_tokens={builder.max_prompt_tokens}")


# --------------------------------------------------------------------------- negatives (§2.3)


def negatives_stage(cfg: Config, model: Path, data: Path, out: Path, ctx: StageContext) -> Path:
    """Wrong demonstrations per training example: verified programmatic ones, or the model's own."""
    from unisd import negatives
    from unisd.sandbox import Limits

    source = cfg.method.contrastive.negatives
    inputs = {"model": model, "data": data}
    # mutants that loop forever count as wrong at the timeout, so keep it short here
    limits = Limits(timeout_s=min(3.0, cfg.eval.code_timeout_s), memory_mb=cfg.eval.code_memory_mb)
    with stage_output(ctx, "negatives", "negatives", cfg, inputs, out, {"source": source}) as (run, tmp):
        examples = train_examples(cfg, data)
        if source == "programmatic":
            found = negatives.programmatic_negatives(examples, NEGATIVES_PER_EXAMPLE, cfg.run.seed, limits,
                                                     cfg.eval.code_workers, cfg.prompts.mcq_format)
        else:
            found = _self_generated(cfg, model, examples, limits)
        rows = [{"id": ex.id, "negatives": [vars(n) for n in found[ex.id]]} for ex in examples if ex.id in found]
        write_jsonl(tmp / "negatives.jsonl", rows)
        stats = {"examples": len(examples), "with_negative": len(rows), "without_negative": len(examples) - len(rows)}
        write_json_atomic(tmp / "stats.json", stats)
        run.log_metrics(stats)
    return out


def _self_generated(cfg: Config, model_dir: Path, examples: list[Example], limits) -> dict[str, list]:
    from unisd import negatives
    from unisd.generation import Sampling, generate
    from unisd.modeling import load_model

    tok, builder = _builder(cfg, model_dir)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.device)
    fmt = cfg.prompts.mcq_format
    asks = [(ex, i, builder.encode(negatives.negative_request(ex, i, fmt)))
            for ex in examples for i in range(NEGATIVES_PER_EXAMPLE)]
    asks = [a for a in asks if a[2] is not None]
    found: dict[str, list] = {}
    for task in sorted({ex.task for ex, _, _ in asks}):
        group = [a for a in asks if a[0].task == task]
        sampling = Sampling(getattr(cfg.generation.max_new_tokens, task), do_sample=True,
                            temperature=cfg.generation.temperature, seed=cfg.run.seed)
        outs = generate(model, tok, [ids for _, _, ids in group], sampling, cfg.generation.batch_size,
                        builder.stop_strings, desc=f"negatives {task}", backend=cfg.generation.backend)
        for (ex, i, _), c in zip(group, outs):
            if (neg := negatives.clean_self_generated(ex, i, c.text, fmt)) is not None:
                found.setdefault(ex.id, []).append(neg)
    by_id = {ex.id: ex for ex in examples}
    return negatives.verify_negatives([by_id[i] for i in found], found, limits)


# --------------------------------------------------------------------------- one round


def generate_stage(cfg: Config, student: Path, data: Path, out: Path, ctx: StageContext, round_idx: int) -> Path:
    """Round `round_idx`'s trajectories: samples of the current student (or gold completions)."""
    from unisd.modeling import load_model
    from unisd.trajectories import round_examples, sample_trajectories

    inputs = {"student": student, "data": data}
    extra = {"round_idx": round_idx}
    with stage_output(ctx, f"generate-r{round_idx}", "generate", cfg, inputs, out, extra, extra) as (run, tmp):
        examples = round_examples(train_examples(cfg, data), cfg.train_set.prompts_per_round, cfg.run.seed, round_idx)
        tok, builder = _builder(cfg, student)
        model = load_model(student, cfg.model.dtype, cfg.model.device)
        trajectories, stats = sample_trajectories(cfg, model, tok, builder, examples, cfg.run.seed * 1000 + round_idx)
        write_jsonl(tmp / "trajectories.jsonl", trajectories)
        stats.update(trajectories=len(trajectories),
                     mean_completion_tokens=sum(len(t.completion_ids) for t in trajectories) / max(len(trajectories), 1),
                     truncated=sum(not t.finished for t in trajectories))
        write_json_atomic(tmp / "stats.json", stats)
        run.log_metrics(stats)
        run.log_dataset(f"trajectories/round-{round_idx}", dir_digest(tmp / "trajectories.jsonl"), str(out),
                        context="training", n_rows=len(trajectories))
    return out


def filter_stage(cfg: Config, trajectories: Path, base: Path, data: Path, out: Path, ctx: StageContext,
                 round_idx: int, contexts: Path | None = None, previous: Path | None = None) -> Path:
    """What the round trains on, and how well its teacher fits the student's samples.

    Truncated samples (cut at the token limit) are dropped unless `train_set.keep_truncated`;
    with agreement, the rest are scored under K auxiliary contexts and disagreeing ones
    dropped (gold_mix SFT items pass through: they are not distilled). Every run also
    records the teacher diagnostics (`trajectories.teacher_diagnostics`) over all the
    round's trajectories. The teacher is the round's starting teacher: the base model
    (frozen) or the EMA teacher carried from the previous round.
    """
    from unisd.trajectories import Trajectory, score_agreement, teacher_diagnostics

    agreement = cfg.method.agreement
    inputs = {"trajectories": trajectories, "base": base, "data": data, "contexts": contexts, "previous": previous}
    extra = {"round_idx": round_idx}
    with stage_output(ctx, f"filter-r{round_idx}", "filter", cfg, inputs, out, extra, extra) as (run, tmp):
        trajs = [Trajectory.model_validate(r) for r in _read_jsonl(trajectories / "trajectories.jsonl")]
        complete = [t for t in trajs if cfg.train_set.keep_truncated or t.finished]
        sft, distilled = [t for t in complete if t.sft], [t for t in complete if not t.sft]
        if agreement.enabled and contexts is None:
            raise ValueError("agreement is enabled but no contexts stage output was given")
        tok, builder = _builder(cfg, base)
        by_id = {ex.id: ex for ex in train_examples(cfg, data)}
        model, scope = _round_teacher(cfg, base, previous)
        with scope:
            diagnostics = teacher_diagnostics(cfg, model, tok, builder, trajs, by_id)
            if agreement.enabled:
                records = {r["id"]: r for r in _read_jsonl(contexts / "contexts.jsonl")}
                distilled, scoring = score_agreement(cfg, model, tok, builder, distilled, records, by_id)
            else:
                scoring = {"filtered_out": 0, "filtered_fraction": 0.0}
        kept = distilled + sft
        stats = {"trajectories": len(trajs), "dropped_truncated": len(trajs) - len(complete), **scoring,
                 "kept": len(kept), **diagnostics}
        write_jsonl(tmp / "filtered.jsonl", kept)
        write_json_atomic(tmp / "stats.json", stats)
        run.log_metrics(stats)
        log.info("filter round %d: kept %d of %d trajectories (%d truncated dropped); teacher EOS log-p %s vs "
                 "student %s", round_idx, len(kept), len(trajs), stats["dropped_truncated"],
                 _fmt(stats["teacher_eos_logp"]), _fmt(stats["student_eos_logp"]))
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _round_teacher(cfg: Config, base: Path, previous: Path | None):
    """The round's starting teacher and the scope its passes run in: the EMA teacher of
    the previous round swapped into the student, or the base model."""
    import contextlib

    import torch

    from unisd.teachers import Teacher
    from unisd.train import build_student

    teacher_file = previous / "teacher.pt" if previous is not None else None
    if teacher_file is not None and teacher_file.is_file() and cfg.method.teacher.kind == "ema":
        model = build_student(cfg, base, previous)
        teacher = Teacher(model)
        teacher.load_state_dict(torch.load(teacher_file, map_location=model.device))
        return model, teacher.active()
    from unisd.modeling import load_model

    return load_model(base, cfg.model.dtype, cfg.model.device), contextlib.nullcontext()


def train_stage(cfg: Config, filtered: Path, base: Path, data: Path, out: Path, ctx: StageContext, round_idx: int,
                negatives: Path | None = None, previous: Path | None = None, on_step=None) -> Path:
    """Train round `round_idx` on the filtered trajectories; resumable after interruption."""
    from unisd.train import train_round
    from unisd.trajectories import Trajectory

    inputs = {"filtered": filtered, "base": base, "data": data, "negatives": negatives, "previous": previous}
    extra = {"round_idx": round_idx}
    work = out.parent / f".{out.name}.work-{cache_key('train', cfg, inputs, extra)[:12]}"
    params = {**cfg.section("train"), "method": cfg.method.model_dump(mode="json"), "round": round_idx}
    with stage_output(ctx, f"train-r{round_idx}", "train", cfg, inputs, out, params, extra) as (run, tmp):
        trajs = [Trajectory.model_validate(r) for r in _read_jsonl(filtered / "filtered.jsonl")]
        items, stats = _train_items(cfg, trajs, base, data, negatives)
        if not items:
            raise ValueError(f"round {round_idx}: no trajectories left to train on ({stats}; the filter stage "
                             f"drops samples cut at the token limit unless train_set.keep_truncated)")
        run.log_metrics({f"items/{k}": v for k, v in stats.items()})
        info = train_round(cfg, items, base, dir_digest(base), tmp, work, run, previous, on_step)
        write_json_atomic(tmp / "metrics.json", {**info, **stats})
        run.log_artifacts(tmp / "curves.jsonl")
        run.log_model(f"{cfg.recipe}-round{round_idx}", tmp / "adapter" if (tmp / "adapter").is_dir() else None,
                      {"final_loss": info["final_loss"] or float("nan"), "steps": info["steps"]})
    shutil.rmtree(work, ignore_errors=True)
    return out


def _train_items(cfg: Config, trajs: list, base: Path, data: Path, negatives: Path | None):
    """TrainItems with the teacher's privileged prompt, a negative and agreement scores
    (gold_mix items: only prompt and completion, for the cross-entropy)."""
    from unisd.train import TrainItem
    from unisd.trajectories import privileged_messages

    method = cfg.method
    _, builder = _builder(cfg, base)
    by_id = {ex.id: ex for ex in train_examples(cfg, data)}
    negs = {r["id"]: r["negatives"] for r in _read_jsonl(negatives / "negatives.jsonl")} if negatives else {}
    items, no_negative, over_budget = [], 0, 0
    for t in trajs:
        ex = by_id[t.example_id]
        item = TrainItem(t.prompt_ids, t.completion_ids, sft=t.sft,
                         scores=t.agreement_scores if method.agreement.enabled and not t.sft else None)
        if method.loss == "distill" and not t.sft:
            item.teacher_prompt = builder.encode_messages(privileged_messages(cfg, ex))
            if method.contrastive.enabled:
                if ex.id not in negs:
                    no_negative += 1
                    continue
                chosen = random.Random(f"{cfg.run.seed}:{ex.id}").choice(negs[ex.id])
                item.negative_prompt = builder.encode_messages(privileged_messages(cfg, ex, chosen["text"]))
            if item.teacher_prompt is None or (method.contrastive.enabled and item.negative_prompt is None):
                over_budget += 1
                continue
        items.append(item)
    return items, {"trajectories": len(trajs), "items": len(items), "sft_items": sum(it.sft for it in items),
                   "dropped_no_negative": no_negative, "dropped_over_budget": over_budget}
