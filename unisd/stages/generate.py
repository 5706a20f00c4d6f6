"""The generate stage: one round's trajectories, sampled from the current student."""

from __future__ import annotations

from pathlib import Path

from unisd.artifacts import write_json_atomic
from unisd.config import Config
from unisd.data.schema import write_jsonl
from unisd.stages import StageContext, stage_output
from unisd.stages.inputs import log_train_splits, prompt_builder, train_examples


def generate_stage(cfg: Config, student: Path, data: Path, out: Path, ctx: StageContext, round_idx: int) -> Path:
    """Round `round_idx`'s trajectories: samples of the current student (or gold completions)."""
    from unisd.modeling import load_model
    from unisd.trajectories import round_examples, sample_trajectories

    inputs = {"student": student, "data": data}
    extra = {"round_idx": round_idx}
    with stage_output(ctx, f"generate-r{round_idx}", "generate", cfg, inputs, out, extra, extra) as (run, tmp):
        examples = round_examples(train_examples(cfg, data), cfg.train_set.prompts_per_round, cfg.run.seed, round_idx)
        log_train_splits(run, data, examples)
        tok, builder = prompt_builder(cfg, student)
        model = load_model(student, cfg.model.dtype, cfg.model.device)
        trajectories, stats = sample_trajectories(cfg, model, tok, builder, examples, cfg.run.seed * 1000 + round_idx)
        write_jsonl(tmp / "trajectories.jsonl", trajectories)
        stats.update(
            trajectories=len(trajectories),
            mean_completion_tokens=sum(len(t.completion_ids) for t in trajectories) / max(len(trajectories), 1),
            truncated=sum(not t.finished for t in trajectories),
        )
        write_json_atomic(tmp / "stats.json", stats)
        run.log_metrics(stats)
    return out
