"""The `compare` and `ablation` flows: every cell of a study through the pipeline, then
the report (`unisd.study`, `unisd.report`). Deployed as `compare/compare` and
`ablation/ablation`.

With `study.runner: dask` each pending cell is a Prefect task (`study-cell`) submitted to
a Dask cluster through prefect-dask's DaskTaskRunner: `study.dask_address`'s scheduler,
or a LocalCluster of `study.workers` processes bound to 127.0.0.1. Every cell asks for
the worker resource `device: 1`, so a worker started with `--resources device=1` runs one
training at a time; a failed cell fails alone (the others finish and are recorded, and
the next run resumes from them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from unisd.config import Config, load_config
from unisd.orchestration.pipeline import tracked_recipe
from unisd.orchestration.recovery import begin_flow
from unisd.study import Cell, report_dir, run_cell_recorded, run_study, torch_threads
from unisd.tracking import StageRun, Tracker, recover

# what a cell asks of a Dask worker: one device (workers: `dask worker --resources device=1`)
CELL_RESOURCES = {"device": 1}


@task(name="study-cell", task_run_name="{cell.name}", cache_policy=NO_CACHE, persist_result=False)
def study_cell(cell_cfg: Config, cell: Cell, study: str, parent: str, threads: int) -> dict[str, Any]:
    """One cell on a Dask worker: its recipe under the study's MLflow parent run, recorded."""
    with torch_threads(threads):
        return run_cell_recorded(
            cell_cfg, cell, lambda c, k: tracked_recipe(c, f"{study}:{k.name}", parent, launcher="prefect-dask")
        )


@contextlib.contextmanager
def _worker_env() -> Iterator[None]:
    """The Prefect API and result storage of this process, in the environment that the
    LocalCluster's worker processes inherit (temporary settings do not reach them)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH

    env = {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dask_runner(cfg: Config) -> Any:
    """prefect-dask's task runner on `study.dask_address`, or on a new LocalCluster."""
    from prefect_dask import DaskTaskRunner

    if cfg.study.dask_address:
        return DaskTaskRunner(address=cfg.study.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cfg.study.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            "resources": CELL_RESOURCES,
        },
    )


def dask_cells(cfg: Config, study: str, parent: str) -> Any:
    """`run_study`'s map_cells: every pending cell a `study-cell` task on the Dask cluster."""
    import dask

    def run(pending: list[tuple[Config, Cell]]) -> list[dict[str, Any] | BaseException]:
        threads = cfg.study.threads or 1
        with _worker_env(), dask_runner(cfg) as runner:
            with dask.annotate(resources=CELL_RESOURCES):
                futures = [
                    runner.submit(
                        study_cell, {"cell_cfg": c, "cell": k, "study": study, "parent": parent, "threads": threads}
                    )
                    for c, k in pending
                ]
            states = [f.wait() or f.state for f in futures]
        return [s.result(raise_on_failure=False) if s.is_completed() else _error(s) for s in states]

    return run


def _error(state: Any) -> BaseException:
    err = state.result(raise_on_failure=False)
    return err if isinstance(err, BaseException) else RuntimeError(f"cell ended {state.name}: {state.message}")


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

    map_cells = dask_cells(cfg, name, parent) if cfg.study.runner == "dask" else None
    ok = False
    try:
        report = run_study(Path(params_file), overrides, name, run_cell, map_cells)
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
