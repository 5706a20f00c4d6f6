"""What a `unisd` command prints: a console a person can read at a glance.

By default: one line when each stage starts and one when it ends (its cache status and
time, `unisd.orchestration.runner`), unisd's own messages and progress lines, the tables, and every
library's warnings. Left out unless `--verbose`: other libraries' INFO records (httpx's
line per HTTP request to the Prefect API, its csrf-token probes, MLflow's database
set-up), Hugging Face and MLflow progress bars ("Loading weights", "Downloading
artifacts", the GGUF conversion's: `unisd.assets`), FutureWarnings addressed to library authors, and Prefect's per-task
"Finished in state" lines (the stage's own end line says it). The Prefect UI still
receives every flow and task log.

Flow commands leave the root logger to Prefect (its console handler and format): a
handler installed on the root before Prefect configures logging makes Prefect skip its
own, and every library's INFO records then reach the console through it.
"""

from __future__ import annotations

import logging
import os
import warnings


class _QuietTaskRuns(logging.Filter):
    """Drops Prefect's per-task INFO lines from the console (not from the UI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "prefect.task_runs" and record.levelno < logging.WARNING)


VERBOSE_ENV = "UNISD_VERBOSE"  # "1": the command was --verbose; read by the flow runs it starts


def configure(verbose: bool = False, prefect: bool = False) -> None:
    """Set up the console of one command; `prefect`: the command runs Prefect flows."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    root = logging.getLogger()
    if prefect:
        # unisd's records outside a flow (server start, model conversion) stay console-only,
        # without a warning that they cannot reach the API; read when Prefect is imported
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()  # the root logger gets Prefect's console handler
    elif not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("unisd").setLevel(logging.INFO)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    # read when MLflow and Hugging Face are imported (later, and in the processes this one starts)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    quiet_task_runs()
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_task_runs() -> None:
    """Prefect's per-task lines off the console of this process, unless the `unisd`
    command that started it was --verbose. Flow runs call it first: `unisd serve` and
    Prefect workers run each flow in a process of its own, which `configure` never saw."""
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietTaskRuns) for f in handler.filters):
            handler.addFilter(_QuietTaskRuns())
