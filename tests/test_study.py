"""Both study flows at the smallest size on the tiny model: the report's tables and
figures exist and its numbers are the metrics files' numbers."""

import json
from pathlib import Path

import pytest
import yaml

from project import tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    params = tiny_params(tiny_model_dir)
    params["study"] = {"recipes": ["base", "sft", "unisd-full"], "seeds": [42], "components": ["ema", "clip"],
                       "agreement_variants": False, "leave_one_out": True, "size": {"train_set.limit": 4},
                       "ablation_size": {"train.lr": 5.0e-5}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def check_report(report: Path, expected_labels: set[str]) -> dict:
    data = json.loads((report.parent / "report.json").read_text())
    assert {r["label"] for r in data["runs"].values()} == expected_labels
    for name in data["runs"]:
        cell = report.parent.parents[1] / "artifacts" / "study" / report.parent.name / name
        (metrics_file,) = (cell / "eval" / "recipes").glob("*/metrics.json")  # the cell's trained model
        metrics = json.loads(metrics_file.read_text())
        row = data["scores"][name]
        assert row["overall"]["score"] == pytest.approx(metrics["overall"])
        for bench, m in metrics["benchmarks"].items():
            assert row[bench]["score"] == pytest.approx(m["score"])
            assert row[bench]["lo"] <= m["score"] <= row[bench]["hi"]
    for fig in data["figures"].values():
        png = report.parent / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "95%" in text and "seed" in text.lower()
    return data


def test_compare_and_ablation_flows(project):
    from flows.study import ablation, compare

    report = Path(compare(str(project / "params.yaml")))
    data = check_report(report, {"base", "sft", "unisd-full"})
    assert data["best_baseline"] == "sft-s42"
    assert set(data["vs_base"]) >= {"sft-s42", "unisd-full-s42"}
    assert data["study"]["split_sizes"]["train_examples_per_benchmark"] == 4  # study.size
    assert data["study"]["budget"]["lr"] != 5.0e-5

    report = Path(ablation(str(project / "params.yaml")))
    data = check_report(report, {"base", "sd", "ema", "clip", "ema+clip", "unisd-full", "unisd-full-no-agreement",
                                 "unisd-full-no-ema", "unisd-full-no-contrastive", "unisd-full-no-feature"})
    assert set(data["components"]) == {"ema-s42", "clip-s42"}
    assert list(data["interactions"]) == ["ema+clip-s42"]
    assert len(data["leave_one_out"]) == 4
    assert set(data["vs_base"]) >= {"sd-s42", "unisd-full-s42"}
    assert data["study"]["split_sizes"]["train_examples_per_benchmark"] == 4
    assert data["study"]["budget"]["lr"] == 5.0e-5  # study.ablation_size, on top of study.size
