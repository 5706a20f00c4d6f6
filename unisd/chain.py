"""The order of the pipeline's stages, written once for every launcher.

`distill_chain` says which stages a recipe needs and how their outputs feed each
other: contexts (if agreement) and negatives (if contrastive), then R rounds of
generate → filter → train, each round sampling from the latest student. A launcher
passes `run_step(stage, **arguments) -> output path`: the Prefect flow runs a cached
task (`flows.runner.StageRunner`), the `unisd distill` command (what dvc.yaml calls)
runs the stage function directly (`direct_runner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from unisd.artifacts import reuse_output
from unisd.config import Config
from unisd.registry import STAGES
from unisd.stages import Layout, StageContext, publish_metrics

RunStep = Callable[..., Path]


def direct_runner(cfg: Config, ctx: StageContext) -> RunStep:
    """Runs each stage's function as it is asked for: no cache (DVC decides what to run)."""

    def run_step(stage: str, **arguments: Any) -> Path:
        return STAGES[stage].function(cfg, ctx=ctx, **arguments)

    return run_step


def distill_chain(cfg: Config, model: Path, data: Path, run_step: RunStep) -> Path | None:
    """Run the recipe's stages; returns the last round's train output (None for `base`)."""
    method, layout = cfg.method, Layout(cfg)
    if method.loss == "none":
        return None
    contexts = negatives = previous = None
    if method.agreement.enabled:
        contexts = run_step("contexts", model=model, data=data, out=layout.run / "contexts")
    if method.contrastive.enabled:
        negatives = run_step("negatives", model=model, data=data, out=layout.run / "negatives")
    student = model
    for r in range(1, cfg.train_set.rounds + 1):
        trajectories = run_step("generate", student=student, data=data, out=layout.round(r, "generate"), round_idx=r)
        filtered = run_step("filter", trajectories=trajectories, base=model, data=data, out=layout.round(r, "filter"),
                            round_idx=r, contexts=contexts, previous=previous)
        previous = student = run_step("train", filtered=filtered, base=model, data=data, out=layout.round(r, "train"),
                                      round_idx=r, negatives=negatives, previous=previous)
    return previous


def run_recipe(cfg: Config, run_step: RunStep) -> dict[str, Any]:
    """The whole pipeline: evaluate the base model and, unless the recipe is `base`, train
    and evaluate it. Returns the metrics of both (also written to the metrics folder)."""
    layout = Layout(cfg)
    model = run_step("model", out=layout.model)
    data = run_step("prepare", out=layout.data)
    base_eval = run_step("evaluate", model=model, data=data, out=layout.base_eval, label="base")
    metrics = {"base": publish_metrics(base_eval, layout.base_metrics)}
    trained = distill_chain(cfg, model, data, run_step)
    if trained is None:  # the `base` recipe: its evaluation is the base model's
        out = reuse_output(base_eval, layout.recipe_eval)
    else:
        out = run_step("evaluate", model=trained, data=data, out=layout.recipe_eval, label=cfg.recipe, base=model)
    metrics[cfg.recipe] = publish_metrics(out, layout.trained_metrics, cfg.recipe)
    return metrics
