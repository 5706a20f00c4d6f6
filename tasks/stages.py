"""Every pipeline stage as a Prefect task, cached on content, never on live objects.

A task is the library's stage function itself; its cache key is
`unisd.stages.cache_key`: the code version, the stage's params and the digests of its
input directories (plus the round or label). Tasks take and return paths; results
persist in Prefect's local result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH). A
cached result is used only while its output is intact, and is linked into place when
another run asked for the same work at another path (see `flows.runner.StageRunner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.context import TaskRunContext

from unisd.chain import STAGE_FUNCTIONS
from unisd.stages import cache_key


def stage_cache_key(stage: str, inputs: tuple[str, ...], extra: tuple[str, ...] = ()
                    ) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        paths = {k: Path(parameters[k]) for k in inputs if parameters.get(k) is not None}
        extras = {k: parameters.get(k) for k in extra}
        return f"{stage}-{cache_key(stage, parameters['cfg'], paths, extras)[:48]}"

    return key


# stage -> (input path parameters, other parameters that change the output)
KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "model": ((), ()),
    "prepare": ((), ()),
    "contexts": (("model", "data"), ()),
    "negatives": (("model", "data"), ()),
    "generate": (("student", "data"), ("round_idx",)),
    "filter": (("trajectories", "base", "data", "contexts", "previous"), ("round_idx",)),
    "train": (("filtered", "base", "data", "negatives", "previous"), ("round_idx",)),
    "evaluate": (("model", "data", "base"), ("label",)),
}
TASKS = {stage: task(STAGE_FUNCTIONS[stage], name=stage, cache_key_fn=stage_cache_key(stage, *KEYS[stage]),
                     persist_result=True)
         for stage in KEYS}
