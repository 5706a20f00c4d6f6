"""The evaluate stage: a model's predictions and metrics on the configured split."""

from __future__ import annotations

from pathlib import Path

from unisd.artifacts import dir_digest, write_json_atomic
from unisd.config import Config
from unisd.data.schema import DataError, Example, read_examples
from unisd.stages import StageContext, lineage, log_read, stage_output


def eval_examples(cfg: Config, data: Path, bench: str) -> list[Example]:
    """A benchmark's evaluation split, read before the stage starts: an empty one is an
    error, not a score (its NaN would reach the table and the overall with exit 0)."""
    path = data / bench / f"{cfg.eval.split}.jsonl"
    examples = read_examples(path)
    if not examples:
        raise DataError(f"{path}: the {cfg.eval.split} split of {bench} has no examples")
    return examples


def evaluate_stage(
    cfg: Config, model: Path, data: Path, out: Path, ctx: StageContext, label: str = "base", base: Path | None = None
) -> Path:
    """Evaluate a model on the configured split: predictions and metrics.json in `out`."""
    from unisd.evaluate import evaluate_model

    inputs = {"model": model, "data": data, "base": base}
    params = {**cfg.section("eval", "prompts"), "label": label}
    extra = {"label": label}
    eval_sets = {bench: eval_examples(cfg, data, bench) for bench in cfg.data.benchmarks}
    with stage_output(ctx, f"evaluate-{label}", "evaluate", cfg, inputs, out, params, extra) as (run, tmp):
        for bench, examples in eval_sets.items():
            n = min(len(examples), cfg.eval.limit_of(bench) or len(examples))
            log_read(run, f"{bench}/{cfg.eval.split}", data / bench / f"{cfg.eval.split}.jsonl", "evaluation", n)
        made_by = lineage(cfg, model)
        model_id = run.link_model(made_by.get("mlflow_model_id"), made_by.get("mlflow_run_id"))
        metrics = evaluate_model(cfg, model, data, tmp, base_dir=base)
        metrics.update(label=label, model_digest=dir_digest(model))
        write_json_atomic(tmp / "metrics.json", metrics)
        run.log_metrics(metrics, model_id=model_id)
        run.log_artifacts(tmp / "predictions", "predictions")
        run.log_artifacts(tmp / "metrics.json")
    return out
