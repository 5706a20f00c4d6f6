"""What a tiny `sd` run leaves in MLflow, read back through MLflow's own API: the trained
model loads with one call and answers like the trained weights do, it is registered
under its recipe, the evaluation is linked to it, datasets are `mlflow.data` datasets
with the files' digests, runs carry MLflow's standard source tags, and a stage that
runs long enough has system metrics.

Oracles: answers from the train stage's merged model decoded with plain
`transformers` greedy generation; digests with hashlib."""

import hashlib

import pytest
from mlflow_db import empty_mlflow_db
from project import tiny_params

from unisd.chain import direct_runner, run_recipe
from unisd.config import build_config
from unisd.stages import Layout, StageContext
from unisd.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [
    "Question: Which gas do plants absorb? Options: A. oxygen B. carbon dioxide",
    "Write a function that adds two numbers.",
]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """The `sd` recipe run once on the tiny model, tracked in a fresh MLflow store."""
    root = tmp_path_factory.mktemp("project")
    empty_mlflow_db(tmp_path_factory, root / "mlflow.db")
    cfg = build_config({**tiny_params(tiny_model_dir), "recipe": "sd"}, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
        tracker = Tracker(cfg)
        parent = tracker.start_pipeline("test:sd", {"unisd.launcher": "test"})
        run_recipe(cfg, direct_runner(cfg, StageContext(tracker, parent)))
        tracker.end(parent)
        runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        yield cfg, tracker.client, {r.info.run_name: r for r in runs}


def test_the_registered_model_loads_with_one_call_and_answers_like_the_trained_weights(tracked_run):
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, client, runs = tracked_run
    version = client.get_model_version("sd", "1")  # the recipe's final round, registered under the recipe
    assert version.run_id == runs["train-r1"].info.run_id
    answers = mlflow.pyfunc.load_model("models:/sd/latest").predict(PROMPTS)

    merged = Layout(cfg).round(1, "train") / "model"
    tok, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    for prompt, answer in zip(PROMPTS, answers):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=cfg.eval.max_new_tokens.mcq, do_sample=False, pad_token_id=tok.pad_token_id
            )
        assert answer == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_evaluation_is_linked_to_the_model_it_evaluated(tracked_run):
    _, client, runs = tracked_run
    model_id = client.get_model_version("sd", "1").source.removeprefix("models:/")
    evaluation = client.get_run(runs["evaluate-sd"].info.run_id)  # search_runs leaves model inputs out
    assert [m.model_id for m in evaluation.inputs.model_inputs] == [model_id]
    assert evaluation.data.tags["unisd.model_source_run_id"] == runs["train-r1"].info.run_id
    assert "overall" in {m.key for m in client.get_logged_model(model_id).metrics}
    base = runs["evaluate-base"]  # the base model is no LoggedModel: its producer run is named
    assert base.data.tags["unisd.model_source_run_id"] == runs["model"].info.run_id


def test_an_evaluation_under_another_store_names_the_model_in_tags_only(tracked_run, tmp_path_factory, tiny_model_dir):
    """Artifacts made under one MLflow store, evaluated under another (a second clone that
    pulled them): the evaluation runs and logs its metrics; the trained model, which the
    second store does not hold, is named in its tags and is no model input there."""
    from unisd.stages import lineage
    from unisd.stages.evaluate import evaluate_stage

    cfg, _, _ = tracked_run
    root = tmp_path_factory.mktemp("second-clone")
    empty_mlflow_db(tmp_path_factory, root / "mlflow.db")
    paths = {"artifacts": str(cfg.artifacts), "metrics": str(root / "metrics")}
    other = build_config({**tiny_params(tiny_model_dir), "recipe": "sd", "paths": paths}, root)
    layout = Layout(other)
    trained = layout.round(1, "train")
    made_by = lineage(other, trained)["mlflow_model_id"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracker = Tracker(other)
        parent = tracker.start_pipeline("test:second", {"unisd.launcher": "test"})
        evaluate_stage(other, trained, layout.data, root / "eval", StageContext(tracker, parent), "sd", layout.model)
        tracker.end(parent)
        (found,) = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        evaluation = tracker.client.get_run(found.info.run_id)
    assert evaluation.data.tags["unisd.model_id"] == made_by
    assert evaluation.inputs.model_inputs == []
    assert "overall" in evaluation.data.metrics


def test_stages_log_the_files_they_read_as_mlflow_datasets(tracked_run):
    cfg, _, runs = tracked_run
    layout = Layout(cfg)
    expected = {
        "evaluate-base": {"sciq/test": layout.data / "sciq" / "test.jsonl"},
        "generate-r1": {
            "sciq/train": layout.data / "sciq" / "train.jsonl",
            "mbpp/train": layout.data / "mbpp" / "train.jsonl",
        },
        "filter-r1": {"trajectories/round-1": layout.round(1, "generate") / "trajectories.jsonl"},
        "train-r1": {"filtered/round-1": layout.round(1, "filter") / "filtered.jsonl"},
    }
    for run_name, files in expected.items():
        logged = {d.dataset.name: d.dataset for d in runs[run_name].inputs.dataset_inputs}
        for name, path in files.items():
            assert logged[name].source_type == "local" and str(path) in logged[name].source
            assert logged[name].digest == hashlib.sha256(path.read_bytes()).hexdigest()[:36]


def test_runs_carry_mlflows_source_tags_and_long_stages_system_metrics(tracked_run):
    _, _, runs = tracked_run
    for run in runs.values():
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"]
        assert run.data.tags["mlflow.user"]
    # sampled every 0.1 s here: every stage that ran for several intervals has them (how
    # long a tiny stage runs depends on the machine, so the stages are chosen by duration)
    long = [run for run in runs.values() if run.info.end_time - run.info.start_time > 500]
    if not long:
        pytest.skip("no stage ran longer than 0.5 s on this machine")
    for run in long:
        assert "system/cpu_utilization_percentage" in run.data.metrics, run.info.run_name
