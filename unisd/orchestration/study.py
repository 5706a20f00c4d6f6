"""The `compare` and `ablation` flows: every cell of a study through the pipeline, then
the report (`unisd.study`, `unisd.report`). Deployed as `compare/compare` and
`ablation/ablation`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from unisd.config import Config, load_config
from unisd.orchestration.pipeline import tracked_recipe
from unisd.orchestration.recovery import begin_flow
from unisd.study import Cell, report_dir, run_study
from unisd.tracking import StageRun, Tracker, recover


def study(name: str, params_file: str, overrides: dict[str, Any] | None) -> str:
    """Run study `name` under one MLflow parent run; log its report there."""
    begin_flow()
    overrides = overrides or {}
    cfg = load_config(params_file, overrides)
    tracker = Tracker(cfg)
    recover(cfg, tracker)
    parent = tracker.start_pipeline(f"study:{name}", {"unisd.study": name, "unisd.launcher": "prefect"})

    def run_cell(cell_cfg: Config, cell: Cell) -> None:
        tracked_recipe(cell_cfg, f"{name}:{cell.name}", parent)

    ok = False
    try:
        report = run_study(Path(params_file), overrides, name, run_cell)
        StageRun(tracker.client, parent, tracker.experiment_id).log_artifacts(report_dir(cfg, name), "report")
        ok = True
    finally:
        tracker.end(parent, ok)
    print(report.read_text())
    return str(report)


@flow(name="compare", log_prints=True)
def compare(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    """base, sft, ssd, sdft, gkd, opsd and unisd-full on the same data, seeds and budget."""
    return study("compare", params_file, overrides)


@flow(name="ablation", log_prints=True)
def ablation(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    """Single components on plain SD, their pairs, leave-one-out from unisd-full, agreement variants."""
    return study("ablation", params_file, overrides)
