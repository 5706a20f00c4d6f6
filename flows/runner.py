"""Runs stage tasks inside a flow: cache-aware, verified, logged.

A cache hit is used only if the output it points to is still intact (its manifest
matches); otherwise the task re-runs with `refresh_cache`. When the same work was
cached for another output path (another recipe, another artifacts root), the output
is linked into the requested place instead of being recomputed. Every stage, run or
cached, gets a nested MLflow run under the flow's parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger

from tasks.stages import TASKS
from unisd.artifacts import is_intact, link_copy
from unisd.config import Config
from unisd.stages import StageContext, lineage_file, stage_source_run


class StageRunner:
    def __init__(self, cfg: Config, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.cached: dict[str, bool] = {}

    def __call__(self, stage: str, name: str, **kwargs: Any) -> Path:
        """Run stage `stage` (a key of tasks.stages.TASKS) as the step called `name`."""
        logger = get_run_logger()
        task = TASKS[stage]
        state = task(cfg=self.cfg, ctx=self.ctx, **kwargs, return_state=True)
        result, hit = Path(state.result()), state.name == "Cached"
        if hit and not is_intact(result):
            logger.warning("stage %s: cached output %s is missing or changed; recomputing", name, result)
            state = task.with_options(refresh_cache=True)(cfg=self.cfg, ctx=self.ctx, **kwargs, return_state=True)
            result, hit = Path(state.result()), False
        out = Path(kwargs["out"])
        if result.resolve() != out.resolve():  # the same work, done for another place
            link_copy(result, out)
            if (source := lineage_file(self.cfg, result)).is_file():
                lineage_file(self.cfg, out).write_text(source.read_text())
            logger.info("stage %s: reused %s", name, result)
        if hit and self.ctx.tracker is not None:
            self.ctx.tracker.log_cached_stage(self.ctx.parent_run, name, out, stage_source_run(self.cfg, out))
        self.cached[name] = hit
        logger.info("stage %s: %s -> %s", name, "CACHED" if hit else "ran", out)
        return out
