"""The order of the pipeline's stages, written once for every launcher.

`run_recipe` is the whole pipeline: model, prepare, the base model's evaluation
(`evaluate_base`), the recipe's stages (`distill_chain`: contexts if agreement,
negatives if contrastive, then R rounds of generate → filter → train, each round
sampling from the latest student) and the trained model's evaluation
(`evaluate_trained`). A launcher passes `run_step(stage, **arguments) -> output path`:
the Prefect flow runs a cached task (`unisd.orchestration.runner.StageRunner`); the
`unisd model|prepare|distill|evaluate` commands (what dvc.yaml calls) run one part each,
the stage functions called directly (`direct_runner`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        filtered = run_step(
            "filter",
            trajectories=trajectories,
            base=model,
            data=data,
            out=layout.round(r, "filter"),
            round_idx=r,
            contexts=contexts,
            previous=previous,
        )
        previous = student = run_step(
            "train",
            filtered=filtered,
            base=model,
            data=data,
            out=layout.round(r, "train"),
            round_idx=r,
            negatives=negatives,
            previous=previous,
        )
    return previous


def evaluate_base(cfg: Config, model: Path, data: Path, run_step: RunStep) -> dict[str, Any]:
    """Evaluate the base model; its metrics, also written to the metrics folder."""
    layout = Layout(cfg)
    out = run_step("evaluate", model=model, data=data, out=layout.base_eval, label="base")
    return publish_metrics(out, layout.base_metrics)


def evaluate_trained(cfg: Config, trained: Path | None, model: Path, data: Path, run_step: RunStep) -> dict[str, Any]:
    """Evaluate the recipe's trained model (`trained`, the last round's train output; None
    for `base`, whose evaluation is a copy of the base model's); its metrics, also written
    to the metrics folder with the recipe inside."""
    layout = Layout(cfg)
    if trained is None:
        out = reuse_output(layout.base_eval, layout.recipe_eval)
    else:
        out = run_step("evaluate", model=trained, data=data, out=layout.recipe_eval, label=cfg.recipe, base=model)
    return publish_metrics(out, layout.trained_metrics, cfg.recipe)


def run_recipe(cfg: Config, run_step: RunStep) -> dict[str, Any]:
    """The whole pipeline: evaluate the base model and, unless the recipe is `base`, train
    and evaluate it. Returns the metrics of both (also written to the metrics folder)."""
    layout = Layout(cfg)
    model = run_step("model", out=layout.model)
    data = run_step("prepare", out=layout.data)
    metrics = {"base": evaluate_base(cfg, model, data, run_step)}
    trained = distill_chain(cfg, model, data, run_step)
    metrics[cfg.recipe] = evaluate_trained(cfg, trained, model, data, run_step)
    return metrics
