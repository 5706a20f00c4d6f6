"""Each kind of recipe runs through the chain of stage functions on the tiny model, and
bad inputs fail before any work."""

import json
from pathlib import Path

import pytest
from project import tiny_params

from unisd.chain import direct_runner, distill_chain
from unisd.config import ConfigError, build_config
from unisd.stages import Layout, StageContext
from unisd.stages.train import train_stage
from unisd.train import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def run_chain(
    tmp_path: Path, model_dir: Path, recipe: str, limit: int = 4, components: dict | None = None, **sections
) -> tuple[Path, Layout]:
    # the tiny random model hardly ever stops within 8 tokens: keep its truncated samples unless told otherwise
    sections["train_set"] = {"keep_truncated": True, "limit": limit, **sections.get("train_set", {})}
    params = tiny_params(model_dir, **sections)
    params.update(recipe=recipe, components=components or {})
    cfg = build_config(params, tmp_path)
    layout, step = Layout(cfg), direct_runner(cfg, StageContext())
    model = step("model", out=layout.model)
    data = step("prepare", out=layout.data)
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


DIAGNOSTICS = {
    "eos_trajectories",
    "teacher_eos_logp",
    "student_eos_logp",
    "letter_items",
    "teacher_letter_acc",
    "student_letter_acc",
    "sampled_mcq",
    "student_sample_acc",
}


def test_filter_stage_records_the_teacher_diagnostics(tmp_path, tiny_model_dir):
    _, layout = run_chain(tmp_path, tiny_model_dir, "sd", prompts={"teacher_template": "assistant_turn"})
    trajectories = read_jsonl(layout.round(1, "generate") / "trajectories.jsonl")
    stats = json.loads((layout.round(1, "filter") / "stats.json").read_text())
    assert set(stats) >= DIAGNOSTICS
    assert stats["trajectories"] == stats["kept"] == len(trajectories) and stats["dropped_truncated"] == 0
    sciq = [t for t in trajectories if t["benchmark"] == "sciq"]  # one sample per prompt
    n = len(sciq)
    assert n >= 2 and stats["letter_items"] == len({t["example_id"] for t in sciq}) == n == stats["sampled_mcq"]
    for key in ("teacher_letter_acc", "student_letter_acc", "student_sample_acc"):
        assert 0 <= stats[key] <= 100 and stats[key] * n / 100 == pytest.approx(round(stats[key] * n / 100))
    ended = [t for t in trajectories if t["finished"] and t["completion_ids"][-1] == 2]  # <|im_end|>
    assert stats["eos_trajectories"] == len(ended)


def test_truncated_samples_are_dropped_and_gold_mix_items_still_train(tmp_path, tiny_model_dir):
    trained, layout = run_chain(
        tmp_path, tiny_model_dir, "sd", components={"gold_mix": 0.5}, train_set={"keep_truncated": False}
    )
    trajectories = read_jsonl(layout.round(1, "generate") / "trajectories.jsonl")
    prompts = json.loads((layout.round(1, "generate") / "stats.json").read_text())["sampled"]  # one sample each
    truncated = [t for t in trajectories if not t["finished"]]
    gold = [t for t in trajectories if t["sft"]]
    assert len(gold) == round(prompts / 2) and all(t["source"] == "gold" and t["finished"] for t in gold)
    stats = json.loads((layout.round(1, "filter") / "stats.json").read_text())
    assert stats["trajectories"] == len(trajectories) and stats["dropped_truncated"] == len(truncated) > 0
    kept = read_jsonl(layout.round(1, "filter") / "filtered.jsonl")
    assert stats["kept"] == len(kept) == len(trajectories) - len(truncated) and all(t["finished"] for t in kept)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["items"] == len(kept) and metrics["sft_items"] == len(gold)
    assert "sft" in json.loads((trained / "curves.jsonl").read_text().splitlines()[0])


def test_two_rounds_sample_from_the_latest_student(tmp_path, tiny_model_dir):
    trained, layout = run_chain(tmp_path, tiny_model_dir, "sdft", train_set={"rounds": 2, "prompts_per_round": 3})
    assert trained == layout.round(2, "train")
    r1, r2 = ([t["example_id"] for t in read_jsonl(layout.round(r, "generate") / "trajectories.jsonl")] for r in (1, 2))
    # a seeded subset per round (prompts over the tiny tokenizer's budget are dropped and counted)
    for r, ids in ((1, r1), (2, r2)):
        stats = json.loads((layout.round(r, "generate") / "stats.json").read_text())
        assert len(ids) + stats["dropped_over_budget"] == 3 and len(ids) >= 2
    assert r1 != r2
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
        train_stage(
            cfg,
            filtered=layout.round(1, "filter"),
            base=layout.model,
            data=layout.data,
            out=tmp_path / "again",
            ctx=StageContext(),
            round_idx=2,
            previous=trained,
        )
    assert not (tmp_path / "again").exists()  # nothing half-written


@pytest.mark.parametrize(
    "override, key",
    [
        ({"recipe": "nope"}, "recipe"),
        ({"components": {"agreement": {"enabled": True, "k": 1}}}, "components.agreement"),
        ({"components": {"bogus": 1}}, "components.bogus"),
    ],
)
def test_bad_recipes_fail_before_work(tmp_path, tiny_model_dir, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({**tiny_params(tiny_model_dir), **override}, tmp_path)
    assert not (tmp_path / "artifacts").exists()
