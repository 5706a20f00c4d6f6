"""The `pipeline` flow: model -> prepare -> evaluate base -> the recipe's rounds -> evaluate.

Deployed as `pipeline/unisd-full` and `pipeline/<baseline>`; the recipe and any param
can be overridden per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from unisd.chain import run_recipe
from unisd.config import Config, load_config, parse_override
from unisd.orchestration.recovery import begin_flow
from unisd.orchestration.runner import StageRunner
from unisd.stages import StageContext, format_table
from unisd.tracking import Tracker, recover


def tracked_recipe(cfg: Config, name: str, parent: str | None = None, launcher: str = "prefect") -> dict[str, Any]:
    """Run one recipe under an MLflow parent run (nested in `parent` if given)."""
    tracker = Tracker(cfg)
    recover(cfg, tracker)
    tags = {"unisd.launcher": launcher, "prefect.flow_run_id": str(flow_run.id or ""), "unisd.recipe": cfg.recipe}
    run_id = tracker.start_pipeline(name, tags, parent)
    runner = StageRunner(cfg, StageContext(tracker, run_id, tags))
    ok = False
    try:
        metrics = run_recipe(cfg, runner)
        tracker.log_metrics(run_id, metrics)
        ok = True
    finally:
        tracker.end(run_id, ok)
    ran = [step for step, hit in runner.cached.items() if not hit]
    get_run_logger().info(
        "%d stages: %d cached, %d ran%s",
        len(runner.cached),
        len(runner.cached) - len(ran),
        len(ran),
        f" ({', '.join(ran)})" if ran else "",
    )
    return {"metrics": metrics, "cached": runner.cached, "mlflow_parent_run_id": run_id}


@flow(name="pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, recipe: str | None = None
) -> dict[str, Any]:
    """Run one recipe end to end; returns its metrics, what was cached and the MLflow parent run."""
    begin_flow()
    cfg = load_config(params_file, {**(overrides or {}), **({"recipe": recipe} if recipe else {})})
    result = tracked_recipe(cfg, f"prefect:{cfg.recipe}")
    for metrics in result["metrics"].values():
        print(format_table(metrics))
    return result


def run_pipeline(params_file: Path, overrides: list[str]) -> dict[str, Any]:
    """Entry point of `unisd run`: overrides given as KEY=VALUE strings."""
    return pipeline(str(params_file), {".".join(k): v for k, v in map(parse_override, overrides)})
