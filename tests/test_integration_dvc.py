"""`dvc repro` in a temporary copy of the project reproduces the metrics, and the Prefect
flow produces byte-identical artifacts from the same params (DVC sees nothing to do)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from project import copy_project, tiny_params

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def dvc(project: Path, *args: str) -> str:
    # dvc.yaml's commands call `unisd`, found on PATH as in an activated environment
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_dvc_repro_matches_the_prefect_flow(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    project = copy_project(tmp_path / "project", tiny_params(tiny_model_dir))
    dvc(project, "repro", "evaluate")  # the pipeline of one recipe (the studies are separate targets)
    metrics = json.loads((project / "metrics" / "base.json").read_text())
    assert set(metrics["benchmarks"]) == {"sciq", "mbpp"} and metrics["benchmarks"]["sciq"]["n"] == 2
    assert "Data and pipelines are up to date" in dvc(project, "status", "evaluate")
    shown = json.loads(dvc(project, "metrics", "show", "--json"))
    assert shown  # DVC reads the metrics file

    # the Prefect flow on the same params writes the same bytes: DVC has nothing to redo
    run = subprocess.run([str(BIN / "unisd"), "run"], cwd=project, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((project / "metrics" / "base.json").read_text()) == metrics
    assert "Data and pipelines are up to date" in dvc(project, "status", "evaluate")

    # lineage: DVC-launched stages are grouped under one parent and tagged with their stage
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unisd").experiment_id])
    dvc_stages = {r.data.tags.get("dvc.stage") for r in runs if r.data.tags.get("unisd.launcher") == "dvc"}
    assert {"model", "prepare", "evaluate_base"} <= dvc_stages
    evaluate = next(r for r in runs if r.data.tags.get("dvc.stage") == "evaluate_base"
                    and "mlflow.parentRunId" in r.data.tags)
    assert evaluate.data.tags["dvc.prepare.artifacts/data"].endswith(".dir")

    # a param change through `dvc exp run -S` re-runs only what depends on it
    dvc(project, "exp", "run", "evaluate", "-S", "eval.limit=1")
    changed = json.loads((project / "metrics" / "base.json").read_text())
    assert changed["benchmarks"]["sciq"]["n"] == 1
    assert yaml.safe_load((project / "params.yaml").read_text())["eval"]["limit"] == 1
