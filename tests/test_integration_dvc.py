"""`dvc repro` in a temporary copy of the project reproduces the metrics; a param or a
module changed marks exactly the stages that read it; a second clone pulls every output
from the default remote without recomputing; the Prefect flow produces byte-identical
artifacts from the same params (DVC sees nothing to do); experiments of two recipes
compare on one metrics path."""

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
STAGES = (
    "model",
    "prepare",
    "evaluate-base",
    "contexts",
    "negatives",
    "generate-r1",
    "filter-r1",
    "train-r1",
    "evaluate-unisd-full",
)


def dvc(project: Path, *args: str) -> str:
    # dvc.yaml's commands call `unisd`, found on PATH as in an activated environment
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def changed_stages(project: Path) -> set[str]:
    """The stages of the one-recipe pipeline that `dvc status` says must run again."""
    return set(json.loads(dvc(project, "status", "--json", "--with-deps", "evaluate")))


def changed_by(project: Path, path: str, edit) -> set[str]:
    """`changed_stages` while `path` is edited by `edit(text) -> text`; the file is restored."""
    file = project / path
    text = file.read_text()
    file.write_text(edit(text))
    try:
        return changed_stages(project)
    finally:
        file.write_text(text)


def git(project: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", *args], cwd=project, check=True, env=env, capture_output=True)


def test_dvc_repro_matches_the_prefect_flow(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    project = copy_project(tmp_path / "project", tiny_params(tiny_model_dir))
    dvc(project, "repro", "evaluate")  # the pipeline of one recipe (the studies are separate targets)
    metrics = json.loads((project / "metrics" / "base.json").read_text())
    assert set(metrics["benchmarks"]) == {"sciq", "mbpp"} and metrics["benchmarks"]["sciq"]["n"] == 2
    assert changed_stages(project) == set()
    shown = json.loads(dvc(project, "metrics", "show", "--json"))
    assert shown  # DVC reads the metrics file

    # a param, or the code of some stages, marks exactly the stages that read it
    assert changed_by(project, "params.yaml", lambda t: t.replace("limit: 2", "limit: 1")) == {
        "evaluate_base",
        "evaluate",
    }
    assert changed_by(project, "unisd/stages/model.py", lambda t: t + "# an edit\n") == {"model"}
    assert changed_by(project, "unisd/teachers.py", lambda t: t + "# an edit\n") == {"distill"}
    assert changed_by(project, "unisd/losses.py", lambda t: t + "# an edit\n") == {
        "evaluate_base",
        "distill",
        "evaluate",
    }  # not the model conversion

    # a second clone pulls every output from the remote, and has nothing to run
    remote = tmp_path / "dvc-remote"  # in place of the default, ~/.cache/unisd/dvc-remote
    dvc(project, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(project, "push")
    git(project, "add", "dvc.lock", "metrics")
    git(project, "commit", "-qm", "repro")
    git(tmp_path, "clone", "-q", str(project), "clone")
    clone = tmp_path / "clone"
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(clone, "pull", "--with-deps", "evaluate")  # the studies, never run, have nothing to pull
    assert changed_stages(clone) == set()
    assert not (clone / "mlflow.db").exists()  # no stage ran there
    assert (clone / "artifacts" / "eval" / "base" / "metrics.json").read_bytes() == (
        project / "artifacts" / "eval" / "base" / "metrics.json"
    ).read_bytes()

    # the Prefect flow on the same params writes the same bytes: DVC has nothing to redo
    run = subprocess.run([str(BIN / "unisd"), "run"], cwd=project, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    # a quiet console: a line as each stage starts and ends, no library chatter
    console = run.stdout + run.stderr
    assert len([line for line in console.splitlines() if "unisd.progress" not in line]) < 60, console
    noises = ("httpx", "HTTP Request", "csrf", "Loading weights", "FutureWarning", "Task run '", "Error logging to API")
    for noise in noises:
        assert noise not in console, noise  # Prefect's per-task lines: the stage's own lines say it
    for stage in STAGES:
        assert f"{stage}: started" in console and f"{stage}: done in" in console, stage
    assert json.loads((project / "metrics" / "base.json").read_text()) == metrics
    assert changed_stages(project) == set()

    # lineage: DVC-launched stages are grouped under one parent and tagged with their stage
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unisd").experiment_id])
    dvc_stages = {r.data.tags.get("dvc.stage") for r in runs if r.data.tags.get("unisd.launcher") == "dvc"}
    assert {"model", "prepare", "evaluate_base"} <= dvc_stages
    evaluate = next(
        r for r in runs if r.data.tags.get("dvc.stage") == "evaluate_base" and "mlflow.parentRunId" in r.data.tags
    )
    assert evaluate.data.tags["dvc.prepare.artifacts/data"].endswith(".dir")

    # a param change through `dvc exp run -S` re-runs only what depends on it
    dvc(project, "exp", "run", "evaluate", "-S", "eval.limit=1", "--name", "limit1")
    changed = json.loads((project / "metrics" / "base.json").read_text())
    assert changed["benchmarks"]["sciq"]["n"] == 1
    assert yaml.safe_load((project / "params.yaml").read_text())["eval"]["limit"] == 1

    # another recipe writes the same metrics path: `dvc exp show` lines the recipes up
    dvc(project, "exp", "run", "evaluate", "-S", "recipe=base", "--name", "base-recipe")
    assert json.loads((project / "metrics" / "trained.json").read_text())["recipe"] == "base"
    trained = {}
    for row in json.loads(dvc(project, "exp", "show", "--json")):
        for exp in row.get("experiments") or []:
            data = exp["revs"][0]["data"]
            recipe = data["params"]["params.yaml"]["data"]["recipe"]
            trained[exp["name"]] = (recipe, data["metrics"]["metrics/trained.json"]["data"]["recipe"])
    assert trained == {"limit1": ("unisd-full", "unisd-full"), "base-recipe": ("base", "base")}
