"""The `pipeline` flow: model -> prepare -> evaluate base -> the recipe's rounds -> evaluate.

Deployed as `pipeline/unisd-full` (and one deployment per baseline); the recipe and
any param can be overridden per run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.runner import StageRunner
from unisd.artifacts import link_copy
from unisd.chain import distill_chain
from unisd.config import Config, load_config, parse_override
from unisd.stages import Layout, StageContext, format_table, publish_metrics
from unisd.tracking import Tracker


def run_recipe(cfg: Config, runner: StageRunner) -> dict[str, Any]:
    """Evaluate the base model and, unless the recipe is `base`, train and evaluate it."""
    layout = Layout(cfg)
    model = runner("model", "model", out=layout.model)
    data = runner("prepare", "prepare", out=layout.data)
    base_eval = runner("evaluate", "evaluate-base", model=model, data=data, out=layout.base_eval, label="base")
    metrics = {"base": publish_metrics(base_eval, layout.base_metrics)}
    trained = distill_chain(cfg, model, data, runner)
    if trained is None:  # the `base` recipe: its evaluation is the base model's
        out = link_copy(base_eval, layout.recipe_eval)
    else:
        out = runner("evaluate", f"evaluate-{cfg.recipe}", model=trained, data=data, out=layout.recipe_eval,
                     label=cfg.recipe, base=model)
    metrics[cfg.recipe] = publish_metrics(out, layout.recipe_metrics)
    return metrics


@flow(name="pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None,
             recipe: str | None = None) -> dict[str, Any]:
    """Run one recipe end to end; returns its metrics, what was cached and the MLflow parent run."""
    cfg = load_config(params_file, {**(overrides or {}), **({"recipe": recipe} if recipe else {})})
    tracker = Tracker(cfg)
    tags = {"unisd.launcher": "prefect", "prefect.flow_run_id": str(flow_run.id or ""), "unisd.recipe": cfg.recipe}
    parent = tracker.start_pipeline(f"prefect:{cfg.recipe}", tags)
    runner = StageRunner(cfg, StageContext(tracker, parent, tags))
    ok = False
    try:
        metrics = run_recipe(cfg, runner)
        tracker.log_metrics(parent, metrics)
        ok = True
    finally:
        tracker.end(parent, ok)
    get_run_logger().info("cache: %s", json.dumps(runner.cached))
    for m in metrics.values():
        print(format_table(m))
    return {"metrics": metrics, "cached": runner.cached, "mlflow_parent_run_id": parent}


def run_pipeline(params_file: Path, overrides: list[str]) -> dict[str, Any]:
    """Entry point of `unisd run`: overrides given as KEY=VALUE strings."""
    return pipeline(str(params_file), {".".join(k): v for k, v in map(parse_override, overrides)})
