"""Each kind of recipe runs through the chain of stage functions on the tiny model, and
bad inputs fail before any work."""

import json
from pathlib import Path

import pytest

from project import tiny_params
from unisd.chain import STAGE_FUNCTIONS, distill_chain
from unisd.config import ConfigError, build_config
from unisd.stages import Layout, StageContext
from unisd.train import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def run_chain(tmp_path: Path, model_dir: Path, recipe: str, limit: int = 4, **sections) -> tuple[Path, Layout]:
    params = tiny_params(model_dir, **sections)
    params["recipe"] = recipe
    params["train_set"].update(limit=limit)
    cfg = build_config(params, tmp_path)
    layout, ctx = Layout(cfg), StageContext()

    def step(stage, name, **kwargs):
        return STAGE_FUNCTIONS[stage](cfg, ctx=ctx, **kwargs)

    model = step("model", "model", out=layout.model)
    data = step("prepare", "prepare", out=layout.data)
    return distill_chain(cfg, model, data, step), layout


@pytest.mark.parametrize("recipe", ["sft", "ssd", "gkd", "opsd", "agreement_seq_induction", "match_repr", "clip"])
def test_recipe_runs_through_the_chain(tmp_path, tiny_model_dir, recipe):
    # induction needs (K+1) x 3 demonstrations per benchmark
    trained, layout = run_chain(tmp_path, tiny_model_dir, recipe, limit=12 if "induction" in recipe else 4)
    info = json.loads((trained / "train_info.json").read_text())
    assert info["recipe"] == recipe and info["steps"] >= 1
    trajectories = [json.loads(x) for x in (layout.round(1, "generate") / "trajectories.jsonl").open()]
    sources = {t["source"] for t in trajectories}
    assert sources == {"sft": {"gold"}, "gkd": {"gold", "sampled"}}.get(recipe, {"sampled"})
    assert (trained / "model" / "model.safetensors").is_file()


def test_two_rounds_sample_from_the_latest_student(tmp_path, tiny_model_dir):
    trained, layout = run_chain(tmp_path, tiny_model_dir, "sdft", train_set={"rounds": 2, "prompts_per_round": 3})
    assert trained == layout.round(2, "train")
    r1 = [json.loads(x)["example_id"] for x in (layout.round(1, "generate") / "trajectories.jsonl").open()]
    r2 = [json.loads(x)["example_id"] for x in (layout.round(2, "generate") / "trajectories.jsonl").open()]
    assert len(r1) == len(r2) == 3 and r1 != r2  # a seeded subset per round
    assert json.loads((layout.round(2, "train") / "train_info.json").read_text())["steps"] >= 1


def test_base_recipe_trains_nothing(tmp_path, tiny_model_dir):
    trained, _ = run_chain(tmp_path, tiny_model_dir, "base")
    assert trained is None


def test_a_previous_round_from_another_model_is_rejected(tmp_path, tiny_model_dir):
    trained, layout = run_chain(tmp_path, tiny_model_dir, "sd")
    info = json.loads((trained / "train_info.json").read_text())
    info["base_digest"] = "0" * 64
    (trained / "train_info.json").write_text(json.dumps(info))
    cfg = build_config({**tiny_params(tiny_model_dir), "recipe": "sd"}, tmp_path)
    with pytest.raises(TrainingError, match="different model"):
        STAGE_FUNCTIONS["train"](cfg, filtered=layout.round(1, "filter"), base=layout.model, data=layout.data,
                                 out=tmp_path / "again", ctx=StageContext(), round_idx=2, previous=trained)
    assert not (tmp_path / "again").exists()  # nothing half-written


@pytest.mark.parametrize("override, key", [
    ({"recipe": "nope"}, "recipe"),
    ({"components": {"agreement": {"enabled": True, "k": 1}}}, "components.agreement"),
    ({"components": {"bogus": 1}}, "components.bogus"),
])
def test_bad_recipes_fail_before_work(tmp_path, tiny_model_dir, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({**tiny_params(tiny_model_dir), **override}, tmp_path)
    assert not (tmp_path / "artifacts").exists()
