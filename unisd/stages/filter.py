"""The filter stage: what a round trains on, and how well its teacher fits the samples."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from unisd.artifacts import write_json_atomic
from unisd.config import Config
from unisd.data.schema import write_jsonl
from unisd.stages import StageContext, log_read, stage_output
from unisd.stages.inputs import prompt_builder, read_jsonl, train_examples

log = logging.getLogger(__name__)


def filter_stage(
    cfg: Config,
    trajectories: Path,
    base: Path,
    data: Path,
    out: Path,
    ctx: StageContext,
    round_idx: int,
    contexts: Path | None = None,
    previous: Path | None = None,
) -> Path:
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
        trajs = [Trajectory.model_validate(r) for r in read_jsonl(trajectories / "trajectories.jsonl")]
        log_read(run, f"trajectories/round-{round_idx}", trajectories / "trajectories.jsonl", "training", len(trajs))
        complete = [t for t in trajs if cfg.train_set.keep_truncated or t.finished]
        sft, distilled = [t for t in complete if t.sft], [t for t in complete if not t.sft]
        if agreement.enabled and contexts is None:
            raise ValueError("agreement is enabled but no contexts stage output was given")
        tok, builder = prompt_builder(cfg, base)
        by_id = {ex.id: ex for ex in train_examples(cfg, data)}
        model, scope = _round_teacher(cfg, base, previous)
        with scope:
            diagnostics = teacher_diagnostics(cfg, model, tok, builder, trajs, by_id)
            if agreement.enabled:
                assert contexts is not None  # checked above
                records = {r["id"]: r for r in read_jsonl(contexts / "contexts.jsonl")}
                distilled, scoring = score_agreement(cfg, model, tok, builder, distilled, records, by_id)
            else:
                scoring = {"filtered_out": 0, "filtered_fraction": 0.0}
        kept = distilled + sft
        stats = {
            "trajectories": len(trajs),
            "dropped_truncated": len(trajs) - len(complete),
            **scoring,
            "kept": len(kept),
            **diagnostics,
        }
        write_jsonl(tmp / "filtered.jsonl", kept)
        write_json_atomic(tmp / "stats.json", stats)
        run.log_metrics(stats)
        log.info(
            "filter round %d: kept %d of %d trajectories (%d truncated dropped); teacher EOS log-p %s vs student %s",
            round_idx,
            len(kept),
            len(trajs),
            stats["dropped_truncated"],
            _fmt(stats["teacher_eos_logp"]),
            _fmt(stats["student_eos_logp"]),
        )
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _round_teacher(cfg: Config, base: Path, previous: Path | None) -> tuple[Any, AbstractContextManager[None]]:
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
