"""Prefect's side of crash hygiene: flow runs whose process was killed are marked Crashed.

A process killed with SIGKILL leaves its flow run, and the task runs it had started,
Running in Prefect's database forever: nothing in the process can report the end, and
an in-process run has no worker watching it. So every flow tags its own run with the
process that runs it (`unisd.owner:<host>.<pid>.<start>`, see
`unisd.artifacts.process_token`), and every flow start marks Crashed the runs whose
owner has ended on this machine. Runs of live processes and of other machines are
left alone.
"""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from unisd import console
from unisd.artifacts import owner_gone, process_token

log = logging.getLogger(__name__)

OWNER_TAG = "unisd.owner:"
UNFINISHED = [StateType.RUNNING, StateType.PENDING]


def _owner(tags: list[str]) -> str:
    return next((t.removeprefix(OWNER_TAG) for t in tags if t.startswith(OWNER_TAG)), "")


def crash_orphaned_flow_runs() -> list[UUID]:
    """Mark Crashed the unfinished flow runs (and their unfinished task runs) whose process has ended."""
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)))
        )
        for run in runs:
            if not owner_gone(_owner(run.tags)):
                continue
            message = "its process was killed (found at the next start)"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED)))
            for task_run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), task_run_filter=unfinished
            ):
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            crashed.append(run.id)
    for run_id in crashed:
        log.warning("Prefect flow run %s was left unfinished by a process that was killed; marked Crashed", run_id)
    return crashed


def claim_flow_run() -> None:
    """Tag the current flow run with this process, for `crash_orphaned_flow_runs` of a later start."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=[*run.tags, OWNER_TAG + process_token()])


def begin_flow() -> None:
    """What every unisd flow does first: its console, clear what killed flows left, then claim its own run."""
    console.quiet_task_runs()
    crash_orphaned_flow_runs()
    claim_flow_run()
