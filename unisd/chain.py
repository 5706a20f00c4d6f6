"""The order of the pipeline's stages, written once for every launcher.

`distill_chain` says which stages a recipe needs and how their outputs feed each
other: contexts (if agreement) and negatives (if contrastive), then R rounds of
generate → filter → train, each round sampling from the latest student. A launcher
passes `run_step(stage, name, **inputs) -> output path`: the Prefect flow runs a
cached task, the `unisd distill` command (what dvc.yaml calls) runs the stage
function directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from unisd.artifacts import link_copy
from unisd.config import Config
from unisd.distill import contexts_stage, filter_stage, generate_stage, negatives_stage, train_stage
from unisd.stages import Layout, evaluate_stage, model_stage, prepare_stage, publish_metrics

RunStep = Callable[..., Path]

STAGE_FUNCTIONS = {
    "model": model_stage, "prepare": prepare_stage, "contexts": contexts_stage, "negatives": negatives_stage,
    "generate": generate_stage, "filter": filter_stage, "train": train_stage, "evaluate": evaluate_stage,
}


def distill_chain(cfg: Config, model: Path, data: Path, run_step: RunStep) -> Path | None:
    """Run the recipe's stages; returns the last round's train output (None for `base`)."""
    method, layout = cfg.method, Layout(cfg)
    if method.loss == "none":
        return None
    contexts = negatives = previous = None
    if method.agreement.enabled:
        contexts = run_step("contexts", "contexts", model=model, data=data, out=layout.run / "contexts")
    if method.contrastive.enabled:
        negatives = run_step("negatives", "negatives", model=model, data=data, out=layout.run / "negatives")
    student = model
    for r in range(1, cfg.train_set.rounds + 1):
        trajectories = run_step("generate", f"generate-r{r}", student=student, data=data,
                                out=layout.round(r, "generate"), round_idx=r)
        filtered = run_step("filter", f"filter-r{r}", trajectories=trajectories, base=model, data=data,
                            out=layout.round(r, "filter"), round_idx=r, contexts=contexts, previous=previous)
        previous = student = run_step("train", f"train-r{r}", filtered=filtered, base=model, data=data,
                                      out=layout.round(r, "train"), round_idx=r, negatives=negatives,
                                      previous=previous)
    return previous


def run_recipe(cfg: Config, run_step: RunStep) -> dict[str, Any]:
    """The whole pipeline: evaluate the base model and, unless the recipe is `base`, train
    and evaluate it. Returns the metrics of both (also written to the metrics folder)."""
    layout = Layout(cfg)
    model = run_step("model", "model", out=layout.model)
    data = run_step("prepare", "prepare", out=layout.data)
    base_eval = run_step("evaluate", "evaluate-base", model=model, data=data, out=layout.base_eval, label="base")
    metrics = {"base": publish_metrics(base_eval, layout.base_metrics)}
    trained = distill_chain(cfg, model, data, run_step)
    if trained is None:  # the `base` recipe: its evaluation is the base model's
        out = link_copy(base_eval, layout.recipe_eval)
    else:
        out = run_step("evaluate", f"evaluate-{cfg.recipe}", model=trained, data=data, out=layout.recipe_eval,
                       label=cfg.recipe, base=model)
    metrics[cfg.recipe] = publish_metrics(out, layout.recipe_metrics)
    return metrics
