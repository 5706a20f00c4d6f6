"""Runs a stage task inside a flow: cache-aware, logged, and verified.

A cache hit is accepted only if the output directory it points to is still intact
(its manifest matches); otherwise the task is re-run with `refresh_cache`. Every stage,
run or cached, gets a nested MLflow run under the flow's parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger

from unisd.artifacts import is_intact
from unisd.config import Config
from unisd.stages import StageContext, stage_source_run


class StageRunner:
    def __init__(self, cfg: Config, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.cached: dict[str, bool] = {}

    def run(self, task, name: str, **kwargs: Any) -> str:
        logger = get_run_logger()
        state = task(cfg=self.cfg, ctx=self.ctx, **kwargs, return_state=True)
        out = state.result()
        hit = state.name == "Cached"
        if hit and not is_intact(out):
            logger.warning("stage %s: cached output %s is missing or changed; recomputing", name, out)
            state = task.with_options(refresh_cache=True)(cfg=self.cfg, ctx=self.ctx, **kwargs,
                                                                return_state=True)
            out, hit = state.result(), False
        if hit and self.ctx.tracker is not None:
            self.ctx.tracker.log_cached_stage(self.ctx.parent_run, name, Path(out), stage_source_run(Path(out)))
        self.cached[name] = hit
        logger.info("stage %s: %s -> %s", name, "CACHED" if hit else "ran", out)
        return out
