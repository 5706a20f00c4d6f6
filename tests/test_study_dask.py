"""The smallest ablation on a LocalCluster of 2 Dask workers (`study.runner: dask`) gives
exactly the metrics of the sequential run, cell by cell."""

import json
import os
from pathlib import Path

import pytest
import yaml
from project import tiny_params

pytestmark = pytest.mark.integration


def cell_metrics(root: Path) -> dict[str, bytes]:
    """Every cell's published files (scores, per-example CSVs, its evaluation) and its
    training's final metrics, as bytes; not cell.json (wall times) nor lock files."""
    published = (root / "metrics" / "study" / "ablation").rglob("*")
    files = [p for p in published if p.is_file() and p.name != "cell.json" and not p.name.startswith(".")]
    files += (root / "artifacts" / "study" / "ablation").glob("*/runs/*/round-*/train/metrics.json")
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(files)}


def cell_launchers(root: Path) -> dict[str, str]:
    """The launcher tag of each cell's MLflow run (nested in the study's run)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unisd").experiment_id], max_results=200)
    return {r.info.run_name: r.data.tags["unisd.launcher"] for r in runs if r.info.run_name.startswith("ablation:")}


def run_ablation(root: Path, model_dir: Path, runner: str) -> dict[str, bytes]:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from unisd.orchestration.serve import flow_server
    from unisd.orchestration.study import ablation

    root.mkdir()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri sets it: the project's own store
    params = tiny_params(model_dir)
    params["study"].update(
        components=["ema"],
        leave_one_out=False,
        seeds=[42],
        size={"train_set.limit": 4},
        ablation_size={},
        runner=runner,
        workers=2,
        threads=1,
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # each run its own Prefect task cache: the second must compute, not copy the first's outputs
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / "prefect-results"}), flow_server():
        report = json.loads((Path(ablation(str(root / "params.yaml"))).parent / "report.json").read_text())
    assert [c["status"] for c in report["study"]["cells"].values()] == ["done"] * 4
    assert all(c["computed"] for c in report["study"]["cells"].values())
    return cell_metrics(root)


def test_ablation_on_two_dask_workers_matches_sequential(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test; unset per run
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    sequential = run_ablation(tmp_path / "sequential", tiny_model_dir, "sequential")
    dask = run_ablation(tmp_path / "dask", tiny_model_dir, "dask")
    cells = {"base-s42", "sd-s42", "ema-s42", "unisd-full-s42"}
    assert {Path(k).parts[3] for k in sequential} == cells
    published = [k for k in sequential if Path(k).parts[4] != "eval"]
    assert len(published) == 4 * 4 + 3  # base/trained json and csv per cell; 3 trainings
    assert {k for k in sequential if k.endswith("eval/metrics.json")} == {
        f"metrics/study/ablation/{c}/eval/metrics.json" for c in cells
    }
    assert dask == sequential  # byte for byte
    assert cell_launchers(tmp_path / "dask") == {f"ablation:{c}": "prefect-dask" for c in cells}
    assert cell_launchers(tmp_path / "sequential") == {f"ablation:{c}": "prefect" for c in cells}
