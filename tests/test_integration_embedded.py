"""The real embedded model (SmolLM2-135M-Instruct from its pinned wheel) through the whole
chain on a handful of items: every benchmark of the embedded suite, unisd-full's stages,
and the evaluation of the trained model against the base."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project import REPO, copy_project

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def test_unisd_full_on_the_embedded_model(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["recipe"] = "unisd-full"
    params["eval"].update(limit=2, batch_size=8, max_new_tokens={"mcq": 24, "code": 48, "tool": 24})
    params["train_set"].update(limit=4)
    params["generation"].update(batch_size=8, max_new_tokens={"mcq": 24, "code": 48, "tool": 24})
    params["train"].update(batch_size=2, grad_accum=1, lr=1e-4, lora={**params["train"]["lora"], "r": 8, "alpha": 16})
    project = copy_project(tmp_path / "project", params)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    run = subprocess.run([str(BIN / "unisd"), "run"], cwd=project, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]

    base = json.loads((project / "metrics" / "base.json").read_text())
    trained = json.loads((project / "metrics" / "trained.json").read_text())
    assert trained["recipe"] == "unisd-full"
    suite = {"sciq", "arc_challenge", "commonsense_qa", "mbpp", "humaneval"}
    for metrics in (base, trained):
        assert set(metrics["benchmarks"]) == suite
        for m in metrics["benchmarks"].values():
            assert m["n"] == 2 and 0 <= m["score"] <= 100 and m["gold_ppl"] > 1 and m["ppl_ret"] > 1
    rounds = project / "artifacts" / "runs" / "unisd-full"
    filtered = [json.loads(line) for line in (rounds / "round-1" / "filter" / "filtered.jsonl").open()]
    assert filtered and all(len(t["agreement_scores"]) == 3 for t in filtered)
    assert (rounds / "round-1" / "train" / "adapter" / "adapter_model.safetensors").is_file()
    curves = [json.loads(line) for line in (rounds / "round-1" / "train" / "curves.jsonl").open()]
    assert curves and all(k in curves[0] for k in ("divergence", "feature", "contrastive", "token_weight_mean"))
    # the trained model's answers are scored by the base model (PPLret), not by itself
    assert trained["model_digest"] != base["model_digest"]
