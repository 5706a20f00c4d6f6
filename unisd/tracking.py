"""MLflow lineage: one parent run per pipeline run, a nested run per stage.

Run ids are passed explicitly (MlflowClient), never through MLflow's thread-local
active run, so stages running in Prefect worker threads log to the right place. The
default store is `sqlite:///<project>/mlflow.db` with artifacts in
`<project>/mlartifacts`; `MLFLOW_TRACKING_URI` overrides it, e.g. with the URL of a
shared tracking server (`unisd.tracking_server`), whose own store then holds the artifacts.

Every run is tagged with the process that opened it (`unisd.owner`). A process killed
with SIGKILL cannot close its runs, so each launch first calls `recover`: runs left
RUNNING by a process that has ended are marked KILLED, and the scratch folders it left
in the artifacts and metrics folders are removed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unisd.artifacts import owner_gone, process_token, sweep_stale
from unisd.config import Config, digest_json

log = logging.getLogger(__name__)

EXPERIMENT = "unisd"
SYSTEM_METRICS_INTERVAL_S = 10
PIPELINE_KEY = "unisd.pipeline_key"
OWNER = "unisd.owner"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
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

    def __init__(self, cfg: Config) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = tracking_uri(cfg.root)
        mlflow.set_tracking_uri(self.uri)  # for code that uses the fluent API (e.g. logged models)
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        """The project's experiment, created on first use. A tracking server keeps the
        artifacts in its own store (proxied, `mlflow-artifacts:/`): a worker's folder would
        be out of reach of the others. Two workers may create it at once: one wins."""
        from mlflow.exceptions import MlflowException

        if exp := self.client.get_experiment_by_name(EXPERIMENT):
            return exp.experiment_id
        remote = self.uri.startswith(("http://", "https://"))
        try:
            return self.client.create_experiment(
                EXPERIMENT, artifact_location=None if remote else (self.cfg.root / "mlartifacts").as_uri()
            )
        except MlflowException as err:
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if err.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
                raise
            return exp.experiment_id

    def base_tags(self) -> dict[str, str]:
        """MLflow's standard tags (`mlflow.user`, `mlflow.source.*`, as its fluent API sets
        them), the project's commit, the params' digest and the process that opened the run."""
        from mlflow.tracking.context.registry import resolve_tags

        commit = git_commit(self.cfg.root)
        tags = {
            **resolve_tags(),
            "git.commit": commit,
            "unisd.params_hash": self.cfg.digest(),
            "unisd.run_name": self.cfg.run.name,
            OWNER: process_token(),
        }
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        return tags

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
                [self.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
            ):
                if model.status == LoggedModelStatus.PENDING:
                    self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        return [run.info.run_id for run in orphans]

    def _running(self) -> list:
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
            )
            runs.extend(page)
            if not (token := page.token):
                return runs

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    @contextlib.contextmanager
    def stage(
        self,
        parent_id: str | None,
        name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        system_metrics: bool = False,
    ) -> Iterator[StageRun]:
        """A nested run for one stage; FAILED (and re-raised) if the body raises. With
        `system_metrics`, CPU, memory, disk and network use are sampled into it (`system/*`,
        every SYSTEM_METRICS_INTERVAL_S seconds; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        overrides), so a stage that runs for minutes shows them and a short one none."""
        run_tags = {**self.base_tags(), "unisd.stage": name, **(tags or {})}
        if parent_id:
            run_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        stage = StageRun(self.client, run.info.run_id, self.experiment_id)
        if params:
            stage.log_params(params)
        try:
            with self._system_metrics(stage.run_id) if system_metrics else contextlib.nullcontext():
                yield stage
        except BaseException:
            self.client.set_terminated(stage.run_id, "FAILED")
            raise
        self.client.set_terminated(stage.run_id, "FINISHED")

    @contextlib.contextmanager
    def _system_metrics(self, run_id: str) -> Iterator[None]:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

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

    return [
        Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000])
        for k, v in sorted(_flatten("", data, {}).items())
    ]


@functools.cache
def _rows_class() -> type:
    """An `mlflow.data` dataset class, made on first use (no MLflow import before it)."""
    from mlflow.data.meta_dataset import MetaDataset

    class Rows(MetaDataset):
        """A dataset known by its file and digest, with its row count as its profile."""

        def __init__(self, source, name: str, digest: str, n_rows: int) -> None:
            super().__init__(source, name=name, digest=digest)
            self._n_rows = n_rows

        @property
        def profile(self) -> dict[str, int]:
            return {"num_rows": self._n_rows}

    return Rows


class StageRun:
    model_id: str | None = None  # the model this run produced (`log_model` with weights)

    def __init__(self, client, run_id: str, experiment_id: str) -> None:
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
        batch = [
            Metric(k.replace(".", "/"), float(v), now, step, model_id=model_id)
            for k, v in sorted(flat.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_dataset(
        self, name: str, path: Path, digest: str, context: str, n_rows: int, origin: str | None = None
    ) -> None:
        """A dataset this stage reads (or, for prepare, writes), as an `mlflow.data` dataset:
        its file, digest and row count, its role (`context`: training, evaluation, ...) and,
        for a prepared split, where the rows came from (`origin`)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # MLflow registers its local-file source twice ("" and "file:")
            warnings.simplefilter("ignore", UserWarning)  # and warns that both match
            source = resolve_dataset_source(Path(path).resolve().as_uri())
        dataset = _rows_class()(source, name, digest[:36], n_rows)
        tags = [InputTag("mlflow.data.context", context), *([InputTag("unisd.origin", origin)] if origin else [])]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])

    def log_model(
        self,
        name: str,
        save: Callable[[Path], None] | None,
        metrics: dict[str, Any],
        step: int = 0,
        tags: dict[str, str] | None = None,
    ) -> str:
        """A LoggedModel from this run, linked to `metrics`; with `save(folder)`, which
        writes an MLflow model (`unisd.logged_model`), its weights too: then it is the
        model this run produced (`model_id`), which later stages link to."""
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id, tags=tags or {}
        )
        if save is not None:
            with tempfile.TemporaryDirectory(prefix="unisd-model-") as folder:
                save(Path(folder) / "model")
                self.client.log_model_artifacts(model.model_id, str(Path(folder) / "model"))
            self.model_id = model.model_id
        self.log_metrics(metrics, step=step, model_id=model.model_id)
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def register_model(self, model_id: str, name: str) -> None:
        """A new version of registered model `name` (created on first use): the LoggedModel
        `model_id`, tagged with the params' digest and run name that produced it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        run = self.client.get_run(self.run_id)
        self.client.create_model_version(
            name,
            f"models:/{model_id}",
            run_id=self.run_id,
            model_id=model_id,
            tags={k: run.data.tags[k] for k in ("unisd.params_hash", "unisd.run_name")},
        )

    def link_model(self, model_id: str | None, source_run: str | None) -> str | None:
        """Record that this run evaluated the LoggedModel `model_id` (made by run
        `source_run`): tags naming both and, when this store holds the model, a model
        input of the run. Returns `model_id` when linked, else None: a model made under
        another tracking store (artifacts pulled from another clone, or made under
        another MLFLOW_TRACKING_URI) is named in the tags only: a store cannot refer to
        a model it does not hold (logging metrics against it fails)."""
        from mlflow.entities import LoggedModelInput
        from mlflow.exceptions import MlflowException

        tags = {"unisd.model_id": model_id, "unisd.model_source_run_id": source_run}
        self.set_tags({k: v for k, v in tags.items() if v})
        if not model_id:
            return None
        try:
            self.client.get_logged_model(model_id)
        except MlflowException:
            log.warning("model %s was logged in another MLflow store: the evaluation names it in tags only", model_id)
            return None
        self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
        return model_id

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
