"""Every pipeline stage as a Prefect task, cached on content, never on live objects.

The tasks are made from the stage registry (`unisd.registry.STAGES`): a task runs the
stage function, its cache key is the stage's (`StageSpec.key`: the code version, the
stage's params, the digests of its input directories, the round or label), its runs
are named like the stage's MLflow runs (`generate-r2`, `evaluate-base`), and stages
that are safe to repeat retry with a growing delay, unless the error is bad input
that a retry cannot fix. Tasks take paths and return a record of the output: its path
and the digest it had when written. Records persist in Prefect's local result storage
(PREFECT_RESULTS_LOCAL_STORAGE_PATH), which several projects may share. A cached
record is used only while its output still matches that digest file by file, and is
copied (verified) into place when another run asked for the same work at another path
(see `unisd.orchestration.runner.StageRunner`). Isolation is SERIALIZABLE: a run that
asks for a stage another process is computing waits for it and is then served its record
(`unisd.orchestration.locks`), so no work is done twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff

from unisd.artifacts import dir_digest
from unisd.errors import INPUT_ERRORS
from unisd.orchestration.locks import serializable
from unisd.registry import STAGES, StageSpec


def stage_cache_policy(spec: StageSpec) -> CachePolicy:
    """The stage's cache key, computed from the paths and arguments the task was given,
    under SERIALIZABLE isolation with locks that die with their process."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        paths = {k: Path(parameters[k]) for k in spec.inputs if parameters.get(k) is not None}
        extras = {k: parameters.get(k) for k in spec.extra}
        return f"{spec.name}-{spec.key(parameters['cfg'], paths, extras)[:48]}"

    return serializable(key)


def recorded(stage_fn: Callable[..., Path]) -> Callable[..., dict[str, str]]:
    """The stage function, returning {path, digest}: the cache then remembers what the
    output was, independently of the manifest on disk that a later edit could rewrite."""

    @functools.wraps(stage_fn)
    def run(*args: Any, **kwargs: Any) -> dict[str, str]:
        out = stage_fn(*args, **kwargs)
        return {"path": str(out), "digest": dir_digest(out)}

    return run


def worth_retrying(task: Task, run: TaskRun, state: State) -> bool:
    """Bad params, data or a changed output fail the same way every time: no retry.
    Anything else (a download, a full disk, memory) may pass the next time."""
    return not isinstance(state.result(raise_on_failure=False), INPUT_ERRORS)


def _run_name(spec: StageSpec) -> Callable[..., str]:
    # Prefect passes a task_run_name callable the task's arguments when it takes `parameters`
    def name(parameters: dict[str, Any]) -> str:
        return spec.run_name(parameters)

    return name


# a retry delay of 0 or a backoff: no single overload of `task` takes both
TASKS = {
    name: task(
        recorded(spec.function),
        name=name,
        task_run_name=_run_name(spec),  # type: ignore[call-overload]
        cache_policy=stage_cache_policy(spec),
        persist_result=True,
        retries=spec.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=10) if spec.retries else 0,
        retry_condition_fn=worth_retrying,
    )
    for name, spec in STAGES.items()
}
