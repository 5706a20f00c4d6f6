"""The train stage: one round of training on the filtered trajectories, resumable."""

from __future__ import annotations

import functools
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unisd.artifacts import dir_digest, write_json_atomic
from unisd.config import Config
from unisd.stages import Layout, StageContext, cache_key, log_read, stage_output
from unisd.stages.inputs import prompt_builder, read_jsonl, train_examples

if TYPE_CHECKING:
    from unisd.train import TrainItem


def train_stage(
    cfg: Config,
    filtered: Path,
    base: Path,
    data: Path,
    out: Path,
    ctx: StageContext,
    round_idx: int,
    negatives: Path | None = None,
    previous: Path | None = None,
    on_step=None,
) -> Path:
    """Train round `round_idx` on the filtered trajectories; resumable after interruption.
    In `train.processes` processes (or as `train.accelerate_config` says) when asked:
    `unisd.distributed` (`on_step`, a test hook, is for the one-process path)."""
    from unisd.distributed import launched, train_in_processes
    from unisd.logged_model import save_trained_model
    from unisd.train import train_round
    from unisd.trajectories import Trajectory

    inputs = {"filtered": filtered, "base": base, "data": data, "negatives": negatives, "previous": previous}
    extra = {"round_idx": round_idx}
    work = Layout(cfg).resume(cache_key("train", cfg, inputs, extra))
    params = {**cfg.section("train"), "method": cfg.method.model_dump(mode="json"), "round": round_idx}
    with stage_output(ctx, f"train-r{round_idx}", "train", cfg, inputs, out, params, extra) as (run, tmp):
        trajs = [Trajectory.model_validate(r) for r in read_jsonl(filtered / "filtered.jsonl")]
        log_read(run, f"filtered/round-{round_idx}", filtered / "filtered.jsonl", "training", len(trajs))
        items, stats = _train_items(cfg, trajs, base, data, negatives)
        if not items:
            raise ValueError(
                f"round {round_idx}: no trajectories left to train on ({stats}; the filter stage "
                f"drops samples cut at the token limit unless train_set.keep_truncated)"
            )
        run.log_metrics({f"items/{k}": v for k, v in stats.items()})
        if launched(cfg):
            info = train_in_processes(cfg, items, base, dir_digest(base), tmp, work, run, previous)
        else:
            info = train_round(cfg, items, base, dir_digest(base), tmp, work, run, previous, on_step)
        write_json_atomic(tmp / "metrics.json", {**info, **stats})
        run.log_artifacts(tmp / "curves.jsonl")
        save = functools.partial(save_trained_model, cfg, tmp, base)
        model_id = run.log_model(
            f"{cfg.recipe}-round{round_idx}",
            save,
            {"final_loss": info["final_loss"] or float("nan"), "steps": info["steps"]},
        )
        if round_idx == cfg.train_set.rounds:  # the recipe's trained model
            run.register_model(model_id, cfg.recipe)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _train_items(
    cfg: Config, trajs: list[Any], base: Path, data: Path, negatives: Path | None
) -> tuple[list[TrainItem], dict[str, int]]:
    """TrainItems with the teacher's privileged prompt, a negative and agreement scores
    (gold_mix items: only prompt and completion, for the cross-entropy)."""
    from unisd.train import TrainItem
    from unisd.trajectories import teacher_prompt

    method = cfg.method
    _, builder = prompt_builder(cfg, base)
    by_id = {ex.id: ex for ex in train_examples(cfg, data)}
    negs = {r["id"]: r["negatives"] for r in read_jsonl(negatives / "negatives.jsonl")} if negatives else {}
    items, no_negative, over_budget = [], 0, 0
    for t in trajs:
        ex = by_id[t.example_id]
        item = TrainItem(
            t.prompt_ids,
            t.completion_ids,
            sft=t.sft,
            scores=t.agreement_scores if method.agreement.enabled and not t.sft else None,
        )
        if method.loss == "distill" and not t.sft:
            item.teacher_prompt = teacher_prompt(cfg, builder, ex)
            if method.contrastive.enabled:
                if ex.id not in negs:
                    no_negative += 1
                    continue
                chosen = random.Random(f"{cfg.run.seed}:{ex.id}").choice(negs[ex.id])
                item.negative_prompt = teacher_prompt(cfg, builder, ex, chosen["text"])
            if item.teacher_prompt is None or (method.contrastive.enabled and item.negative_prompt is None):
                over_budget += 1
                continue
        items.append(item)
    return items, {
        "trajectories": len(trajs),
        "items": len(items),
        "sft_items": sum(it.sft for it in items),
        "dropped_no_negative": no_negative,
        "dropped_over_budget": over_budget,
    }
