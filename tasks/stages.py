"""Each pipeline stage as a Prefect task, cached on content, not on live objects.

The cache key is `unisd.stages.cache_key`: the code version, the stage's param
sections and the digests of its input directories, plus where the output goes.
Tasks take and return paths; results persist in Prefect's local result storage
(PREFECT_RESULTS_LOCAL_STORAGE_PATH). A cached result is only trusted while its
output directory is intact (see `flows.runner.StageRunner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.context import TaskRunContext

from unisd.config import Config, digest_json
from unisd.stages import STAGES, StageContext, cache_key, evaluate_stage, model_stage, prepare_stage


def stage_cache_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        cfg: Config = parameters["cfg"]
        inputs = {k: Path(parameters[k]) for k in STAGES[stage].inputs if parameters.get(k)}
        out = str(Path(parameters["out"]).resolve())  # same work into another place is another entry
        return f"{stage}-{digest_json([cache_key(stage, cfg, inputs), out])[:48]}"

    return key


@task(name="model", cache_key_fn=stage_cache_key("model"), persist_result=True)
def model_task(cfg: Config, out: str, ctx: StageContext) -> str:
    return str(model_stage(cfg, Path(out), ctx))


@task(name="prepare", cache_key_fn=stage_cache_key("prepare"), persist_result=True)
def prepare_task(cfg: Config, out: str, ctx: StageContext) -> str:
    return str(prepare_stage(cfg, Path(out), ctx))


@task(name="evaluate", cache_key_fn=stage_cache_key("evaluate"), persist_result=True)
def evaluate_task(cfg: Config, model: str, data: str, out: str, ctx: StageContext, label: str = "base",
                  base: str | None = None) -> str:
    return str(evaluate_stage(cfg, Path(model), Path(data), Path(out), ctx, label, Path(base) if base else None))
