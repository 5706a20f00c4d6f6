"""MLflow lineage: one parent run per pipeline run, a nested run per stage.

Run ids are passed explicitly (MlflowClient), never through MLflow's thread-local
active run, so stages running in Prefect worker threads log to the right place. The
default store is `sqlite:///<project>/mlflow.db` with artifacts in
`<project>/mlartifacts`; `MLFLOW_TRACKING_URI` overrides it.

Every run is tagged with the process that opened it (`unisd.owner`). A process killed
with SIGKILL cannot close its runs, so each launch first calls `recover`: runs left
RUNNING by a process that has ended are marked KILLED, and the scratch folders it left
in the artifacts and metrics folders are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from unisd.artifacts import owner_gone, process_token, sweep_stale
from unisd.config import Config, digest_json

log = logging.getLogger(__name__)

EXPERIMENT = "unisd"
PIPELINE_KEY = "unisd.pipeline_key"
OWNER = "unisd.owner"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _flatten(prefix: str, data: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(data, dict):
        for k, v in data.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = data
    return out


class Tracker:
    """Thin wrapper over MlflowClient bound to one project's experiment."""

    def __init__(self, cfg: Config):
        import mlflow
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = tracking_uri(cfg.root)
        mlflow.set_tracking_uri(self.uri)  # for code that uses the fluent API (e.g. logged models)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            EXPERIMENT, artifact_location=(cfg.root / "mlartifacts").as_uri())

    def base_tags(self) -> dict[str, str]:
        return {"git.commit": git_commit(self.cfg.root), "unisd.params_hash": self.cfg.digest(),
                "unisd.run_name": self.cfg.run.name, OWNER: process_token()}

    def start_pipeline(self, name: str, tags: dict[str, str] | None = None, parent: str | None = None) -> str:
        """A pipeline's parent run (itself nested under `parent`, e.g. a study, if given)."""
        tags = {**self.base_tags(), **(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(run.info.run_id, params=_params(self.cfg.model_dump(mode="json")))
        return run.info.run_id

    def pipeline_for_key(self, key: str, name: str, tags: dict[str, str]) -> str:
        """The parent run tagged with `key` (created once): groups separately launched stages."""
        found = self.client.search_runs([self.experiment_id], f"tags.`{PIPELINE_KEY}` = '{key}'", max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            self.client.set_tag(found[0].info.run_id, OWNER, process_token())
            return found[0].info.run_id
        return self.start_pipeline(name, {**tags, PIPELINE_KEY: key})

    def log_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        StageRun(self.client, run_id, self.experiment_id).log_metrics(metrics)

    def reap_orphans(self) -> list[str]:
        """Mark KILLED the runs still RUNNING whose process has ended (nothing else ever
        would), and FAILED the logged models they left PENDING. Runs of live processes,
        of other machines, and runs without an owner tag are left alone."""
        from mlflow.entities import LoggedModelStatus

        orphans = [run for run in self._running() if owner_gone(run.data.tags.get(OWNER, ""))]
        for run in orphans:
            self.client.set_terminated(run.info.run_id, "KILLED")
            for model in self.client.search_logged_models(
                    [self.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"):
                if model.status == LoggedModelStatus.PENDING:
                    self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        return [run.info.run_id for run in orphans]

    def _running(self) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                           max_results=1000, page_token=token)
            runs.extend(page)
            if not (token := page.token):
                return runs

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    @contextlib.contextmanager
    def stage(self, parent_id: str | None, name: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None) -> Iterator["StageRun"]:
        """A nested run for one stage; FAILED (and re-raised) if the body raises."""
        run_tags = {**self.base_tags(), "unisd.stage": name, **(tags or {})}
        if parent_id:
            run_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        stage = StageRun(self.client, run.info.run_id, self.experiment_id)
        if params:
            stage.log_params(params)
        try:
            yield stage
        except BaseException:
            self.client.set_terminated(stage.run_id, "FAILED")
            raise
        self.client.set_terminated(stage.run_id, "FINISHED")

    def log_cached_stage(self, parent_id: str, name: str, output: Path, source_run: str | None) -> str:
        """A nested run recording that a stage was served from cache, linked to its producer."""
        tags = {"unisd.cached": "true", "unisd.output": str(output)}
        if source_run:
            tags["unisd.source_run_id"] = source_run
        with self.stage(parent_id, name, tags=tags) as stage:
            metrics_file = output / "metrics.json"
            if metrics_file.is_file():
                stage.log_metrics(json.loads(metrics_file.read_text()))
        return stage.run_id


def _params(data: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000])
            for k, v in sorted(_flatten("", data, {}).items())]


class StageRun:
    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=_params(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, model_id: str | None = None) -> None:
        """Log every finite number in a (nested) dict; keys joined with '/'."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        flat = _flatten("", metrics, {})
        batch = [Metric(k.replace(".", "/"), float(v), now, step, model_id=model_id) for k, v in sorted(flat.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_dataset(self, name: str, digest: str, source: str, context: str, n_rows: int) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                     profile=json.dumps({"num_rows": n_rows}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", context)])])

    def log_model(self, name: str, artifacts: Path | None, metrics: dict[str, Any], step: int = 0,
                  tags: dict[str, str] | None = None) -> str:
        """A LoggedModel from this run (weights when `artifacts` is given), linked to `metrics`."""
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                tags=tags or {})
        if artifacts is not None:
            self.client.log_model_artifacts(model.model_id, str(artifacts))
        self.log_metrics(metrics, step=step, model_id=model.model_id)
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def log_checkpoint(self, step: int, metrics: dict[str, Any], path: Path) -> str:
        """A resumable checkpoint as a LoggedModel (weights stay on disk at `path`)."""
        return self.log_model(f"checkpoint-step{step}", None, metrics, step, {"unisd.checkpoint_path": str(path)})

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def recover(cfg: Config, tracker: Tracker) -> None:
    """Clean up after launches killed outright (SIGKILL, out of memory, a reboot): their
    MLflow runs, and their scratch folders under the artifacts and metrics folders.
    Finished outputs and resumable training state are kept: the next run goes on from them."""
    for root in (cfg.artifacts, cfg.metrics_dir):
        for path in sweep_stale(root):
            log.warning("removed %s, left by a process that was killed", path)
    for run_id in tracker.reap_orphans():
        log.warning("MLflow run %s was left RUNNING by a process that was killed; marked KILLED", run_id)


def pipeline_key(cfg: Config, launcher: str) -> str:
    return digest_json({"params": cfg.digest(), "launcher": launcher, "commit": git_commit(cfg.root)})[:16]
