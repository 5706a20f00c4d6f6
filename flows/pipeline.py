"""The `pipeline` flow: model -> prepare -> evaluate (base).

Deployed as `pipeline/unisd-full`. Later stages (generate, filter, train, evaluate the
trained model) join this same DAG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.runner import StageRunner
from tasks.stages import evaluate_task, model_task, prepare_task
from unisd.config import load_config, parse_override
from unisd.stages import Layout, StageContext, format_table, publish_metrics
from unisd.tracking import Tracker


@flow(name="pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the configured pipeline; returns the base model's metrics and what was cached."""
    cfg = load_config(params_file, overrides or {})
    layout = Layout(cfg)
    tracker = Tracker(cfg)
    tags = {"unisd.launcher": "prefect", "prefect.flow_run_id": str(flow_run.id or "")}
    parent = tracker.start_pipeline(f"prefect:{cfg.run.name}", tags)
    runner = StageRunner(cfg, StageContext(tracker, parent, tags))
    ok = False
    try:
        model = runner.run(model_task, "model", out=str(layout.model))
        data = runner.run(prepare_task, "prepare", out=str(layout.data))
        base_eval = runner.run(evaluate_task, "evaluate-base", model=model, data=data,
                               out=str(layout.eval("base")), label="base")
        metrics = publish_metrics(cfg, "base", Path(base_eval))
        tracker.log_metrics(parent, {"base": metrics})
        ok = True
    finally:
        tracker.end(parent, ok)
    logger = get_run_logger()
    logger.info("cache: %s", json.dumps(runner.cached))
    print(format_table(metrics))
    return {"metrics": metrics, "cached": runner.cached, "mlflow_parent_run_id": parent}


def run_pipeline(params_file: Path, overrides: list[str]) -> dict[str, Any]:
    """Entry point of `unisd run`: overrides given as KEY=VALUE strings."""
    return pipeline(str(params_file), {".".join(k): v for k, v in map(parse_override, overrides)})
