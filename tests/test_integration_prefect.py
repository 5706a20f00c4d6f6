"""A real Prefect server on loopback, the served deployment, `prefect deployment run`,
and the lineage it leaves in MLflow; a second run is served from cache."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from project import copy_project, tiny_params

from unisd.orchestration.serve import local_prefect_server

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
STAGES = {
    "model",
    "prepare",
    "evaluate-base",
    "contexts",
    "negatives",
    "generate-r1",
    "filter-r1",
    "train-r1",
    "evaluate-unisd-full",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_task_runs(api: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_task_runs()


def runs_by_parent(db: Path) -> tuple[MlflowClient, dict]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("unisd")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = {pid: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid] for pid in parents}
    return client, {pid: (parents[pid], children[pid]) for pid in parents}


def test_served_deployment_runs_and_caches(tmp_path, tiny_model_dir, monkeypatch):
    project = copy_project(tmp_path / "project", tiny_params(tiny_model_dir))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = free_port()
    with local_prefect_server(port) as api:
        env = {**os.environ, "PREFECT_API_URL": api}
        served = (tmp_path / "serve.log").open("w")
        server = subprocess.Popen(
            [str(BIN / "unisd"), "serve", "--params", str(project / "params.yaml")],
            cwd=project,
            env=env,
            stdout=served,
            stderr=subprocess.STDOUT,
        )
        try:
            for _attempt in range(2):
                deadline = time.monotonic() + 60
                while True:  # the deployment appears once `serve` has registered it
                    run = subprocess.run(
                        [
                            str(BIN / "prefect"),
                            "deployment",
                            "run",
                            "pipeline/unisd-full",
                            "--watch",
                            "--watch-timeout",
                            "300",
                        ],
                        cwd=project,
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    if run.returncode == 0 or time.monotonic() > deadline or "not found" not in run.stdout + run.stderr:
                        break
                    time.sleep(2)
                assert run.returncode == 0, run.stdout + run.stderr
                assert "Completed" in run.stdout, run.stdout
        finally:
            server.terminate()
            server.wait(timeout=30)
        task_runs = read_task_runs(api)
    # the flow runs' consoles (processes of their own) as `unisd run`'s: a line per stage, no per-task lines
    console = (tmp_path / "serve.log").read_text()
    assert "train-r1: started" in console and "Task run '" not in console, console

    # task runs named like the stages' MLflow runs, each linked to the runs it read from
    assert {run.name for run in task_runs} == STAGES
    one = {run.name: run for run in task_runs if run.flow_run_id == task_runs[0].flow_run_id}
    inputs = {i.id for values in one["evaluate-unisd-full"].task_inputs.values() for i in values}
    assert {one[name].id for name in ("train-r1", "model", "prepare")} <= inputs

    client, pipelines = runs_by_parent(project / "mlflow.db")
    assert len(pipelines) == 2
    first, second = sorted(pipelines.values(), key=lambda pc: pc[0].info.start_time)
    for parent, children in (first, second):
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["unisd.launcher"] == "prefect" and parent.data.tags["prefect.flow_run_id"]
        assert parent.data.tags["unisd.params_hash"]
        assert {c.info.run_name for c in children} == STAGES
        assert "base/overall" in parent.data.metrics and "unisd-full/overall" in parent.data.metrics
    ran = {c.info.run_name: c for c in first[1]}
    assert "unisd.cached" not in ran["evaluate-base"].data.tags
    datasets = {d.dataset.name for d in ran["prepare"].inputs.dataset_inputs}
    assert {"sciq/train", "sciq/validation", "sciq/test", "mbpp/test"} <= datasets
    assert {d.dataset.name for d in ran["evaluate-base"].inputs.dataset_inputs} == {"sciq/test", "mbpp/test"}
    for key in ("benchmarks/sciq/score", "benchmarks/mbpp/score", "overall"):
        assert key in ran["evaluate-base"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(ran["evaluate-base"].info.run_id, "predictions")}
    assert artifacts == {"predictions/sciq.jsonl", "predictions/mbpp.jsonl"}
    # training curves, the trained model as a LoggedModel, trajectories as a dataset input
    train = ran["train-r1"]
    assert {"train/loss", "train/divergence", "train/feature", "train/contrastive", "train/lr"} <= set(
        train.data.metrics
    )
    assert [
        m.name
        for m in client.search_logged_models(
            [train.info.experiment_id], filter_string=f"source_run_id = '{train.info.run_id}'"
        )
    ]
    assert {d.dataset.name for d in ran["generate-r1"].inputs.dataset_inputs} == {"sciq/train", "mbpp/train"}
    assert {d.dataset.name for d in ran["filter-r1"].inputs.dataset_inputs} == {"trajectories/round-1"}
    # the recipe's model is registered once: the second, cached run trained nothing
    assert [v.run_id for v in client.search_model_versions("name = 'unisd-full'")] == [train.info.run_id]
    assert "benchmarks/sciq/ppl_ret" in ran["evaluate-unisd-full"].data.metrics
    # the second run was served from cache, each cached stage linked to the run that made it
    cached = {c.info.run_name: c for c in second[1]}
    for name, run in cached.items():
        assert run.data.tags["unisd.cached"] == "true"
        assert run.data.tags["unisd.source_run_id"] == ran[name].info.run_id
    assert second[0].data.metrics["base/overall"] == first[0].data.metrics["base/overall"]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_stopped_run_stops_its_temporary_prefect_server(tmp_path, tiny_model_dir, sig, code, word):
    """`unisd run` without PREFECT_API_URL starts a Prefect server of its own (a child
    `prefect server start`); SIGTERM or Ctrl-C mid-flow must end the run with a message and stop it."""
    project = copy_project(tmp_path / "project", tiny_params(tiny_model_dir))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PYTHONUNBUFFERED="1",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "prefect-results"),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.Popen(
        [str(BIN / "unisd"), "run"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # as a shell would
    try:
        deadline, log = time.monotonic() + 240, []
        while time.monotonic() < deadline and run.poll() is None:
            log.append(run.stdout.readline())
            if "Beginning flow run" in log[-1]:
                break
        children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
        servers = [
            pid for pid in children if "server\0start" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        ]
        assert servers, "".join(log)
        run.send_signal(sig)
        rest, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == code, "".join(log) + rest
    assert f"unisd: {word}" in rest
    time.sleep(2)
    assert not [pid for pid in servers if Path(f"/proc/{pid}").exists()], (
        "the temporary Prefect server outlived the run"
    )
