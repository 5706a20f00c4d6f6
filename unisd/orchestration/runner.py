"""Runs stage tasks inside a flow: cache-aware, verified, logged, linked.

A cache hit is used only if the output it points to still holds the bytes recorded
when it was written (`unisd.artifacts.check_output`, every file re-hashed); otherwise
the task re-runs with `refresh_cache`. When the same work was cached for another
output path (another recipe, another artifacts root, another project sharing the
Prefect result storage), the output is copied into the requested place, each file
verified as it is copied (`reuse_output`), never hard-linked: an altered file is never
carried into another project, and a later edit in one place cannot change the other.
Every stage, run or cached, gets a nested MLflow run under the flow's parent run, and
one console line when it starts and one when it ends (cache status and time).

The output path a stage returns is linked to its task run, as Prefect links a task's
return value: passed on to the next stages, it makes Prefect record the upstream task
run as their input, so the UI draws the DAG's edges.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.utilities.engine import link_state_to_task_run_result

from unisd.artifacts import IntegrityError, check_output, reuse_output
from unisd.config import Config
from unisd.orchestration.tasks import TASKS
from unisd.registry import STAGES
from unisd.stages import StageContext, lineage_file, stage_source_run


class StageRunner:
    def __init__(self, cfg: Config, ctx: StageContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.cached: dict[str, bool] = {}

    def __call__(self, stage: str, **kwargs: Any) -> Path:
        """Run stage `stage` (a key of `unisd.registry.STAGES`) on `kwargs`; its output path."""
        logger, started = get_run_logger(), time.monotonic()
        task, out, name = TASKS[stage], Path(kwargs["out"]), STAGES[stage].run_name(kwargs)
        logger.info("%s: started", name)
        state = task(cfg=self.cfg, ctx=self.ctx, **kwargs, return_state=True)
        record, hit = state.result(), state.name == "Cached"  # result(): a failed stage raises its error here
        if hit and (problem := self._place(record, out)):
            logger.warning("%s: cached output %s; recomputing", name, problem)
            state = task.with_options(refresh_cache=True)(cfg=self.cfg, ctx=self.ctx, **kwargs, return_state=True)
            state.result()
            hit = False
        if hit and self.ctx.tracker is not None:
            self.ctx.tracker.log_cached_stage(self.ctx.parent_run, name, out, stage_source_run(self.cfg, out))
        self.cached[name] = hit
        logger.info("%s: %s in %.1f s -> %s", name, "CACHED" if hit else "done", time.monotonic() - started, out)
        link_state_to_task_run_result(state, out)
        return out

    def _place(self, record: dict[str, str], out: Path) -> str | None:
        """Make the cached output `record` available at `out`; None, or what is wrong with it."""
        result = Path(record["path"])
        if (problem := check_output(out, record["digest"])) is None:
            return None  # `out` holds the recorded output already (made here, or copied here before)
        if result.resolve() == out.resolve():
            return f"{out}: {problem}"
        try:
            reuse_output(result, out, record["digest"])
        except IntegrityError as err:
            return str(err)
        if (source := lineage_file(self.cfg, result)).is_file():
            lineage_file(self.cfg, out).write_text(source.read_text())
        get_run_logger().info("reused %s at %s", result, out)
        return None
