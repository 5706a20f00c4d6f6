"""Recipes resolve to the component sets docs/method.md §1–§3 state.

The expected values below are written from docs/method.md, not copied from
unisd/recipes.py: a recipe is checked through `build_config(recipe=...)`, the same path
params.yaml takes.
"""

import pytest
import yaml
from project import REPO, tiny_params

from unisd.config import ConfigError, build_config, load_config
from unisd.recipes import BASELINES, COMPONENTS, RECIPES, recipe_table

# docs/method.md §1: plain on-policy self-distillation, the base every component ablation adds to:
# student samples at T=0.7, frozen initial teacher with the gold demonstration, forward KL
# at T=0.7, no agreement weights, no contrastive term, no feature matching, no clipping.
PLAIN = {
    "loss": "distill",
    "data": "on_policy",
    "divergence": "forward_kl",
    "temperature": 0.7,
    "teacher": "frozen",
    "agreement": None,
    "contrastive": None,
    "feature": None,
    "clip": None,
}
EMA_REFERENCE = ("ema", 10, 0.9)  # §2.2: every N=10 steps, β=0.9


def agreement(level, contexts):  # §2.1: K=3 auxiliary contexts, γ=0.01 in the reference's agreement runs
    return {**PLAIN, "agreement": (level, contexts, 3, 0.01)}


EXPECTED = {
    "sd": PLAIN,
    # §3 baselines
    "sdft": {**PLAIN, "teacher": EMA_REFERENCE},  # on-policy, EMA teacher, full-vocabulary forward KL
    "gkd": {**PLAIN, "divergence": ("jsd", 0.5), "data": ("mixed", 0.5)},  # JSD β=0.5, λ=0.5 on-policy, frozen
    "opsd": {**PLAIN, "divergence": ("jsd", 0.5)},  # JSD β=0.5 on student rollouts, fixed initial teacher
    # §2 components on top of plain SD
    **{
        f"agreement_{lvl[:3]}_{ctx}": agreement(lvl, ctx)
        for lvl in ("token", "sequence")
        for ctx in ("random", "retrieval", "induction")
    },
    "ema": {**PLAIN, "teacher": EMA_REFERENCE},
    "contrastive": {**PLAIN, "contrastive": (0.1, 0.5)},  # §2.3 reference: λ_c=0.1, margin 0.5
    "match_joint": {**PLAIN, "feature": ("joint", 0.1)},  # §2.4: L_KL + 0.1·L_feat
    "match_repr": {**PLAIN, "feature": "repr"},  # §2.4: MSE only
    "clip": {**PLAIN, "clip": ("static", 10.0)},  # §2.5: static min(ℓ, τ), τ=10 nats
    # §2.6 UniSD*
    "unisd-full": {
        **PLAIN,
        "agreement": ("token", "retrieval", 3, 0.001),
        "teacher": ("ema", 10, 0.98),
        "feature": ("joint", 0.01),
        "contrastive": (0.01, 0.1),
    },
}


def config(tmp_path, model_dir, recipe, components=None, **sections):
    params = tiny_params(model_dir, **sections)
    params["recipe"] = recipe
    if components is not None:
        params["components"] = components
    return build_config(params, root=tmp_path)


def summary(m) -> dict:
    """The settings that distinguish recipes, in docs/method.md's terms."""
    a, c, f, cl, t = m.agreement, m.contrastive, m.feature, m.clip, m.teacher
    return {
        "loss": m.loss,
        "data": (m.data, m.on_policy_fraction) if m.data == "mixed" else m.data,
        "divergence": (m.divergence, m.alpha) if m.divergence == "jsd" else m.divergence,
        "temperature": m.temperature,
        "teacher": (t.kind, t.ema_every, t.ema_beta) if t.kind == "ema" else t.kind,
        "agreement": (a.level, a.contexts, a.k, a.gamma) if a.enabled else None,
        "contrastive": (c.weight, c.margin) if c.enabled else None,
        "feature": None if f.mode == "none" else "repr" if f.mode == "repr" else (f.mode, f.weight),
        "clip": (cl.mode, cl.tau) if cl.mode == "static" else (cl.mode, cl.q) if cl.mode == "quantile" else None,
    }


def test_every_recipe_is_covered():
    assert set(RECIPES) == set(EXPECTED) | {"base", "sft", "ssd"}
    assert set(BASELINES) == {"base", "sft", "ssd", "sdft", "gkd", "opsd"}
    assert set(COMPONENTS) == {
        f"agreement_{lvl}_{ctx}" for lvl in ("tok", "seq") for ctx in ("random", "retrieval", "induction")
    } | {"ema", "contrastive", "match_joint", "match_repr", "clip"}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_distillation_recipes_resolve_to_the_spec_components(tmp_path, tiny_model_dir, recipe):
    m = config(tmp_path, tiny_model_dir, recipe).method
    assert summary(m) == EXPECTED[recipe]
    assert m.samples  # every distillation recipe trains on the student's own samples
    if m.agreement.enabled:
        assert m.agreement.stat == "var"  # §2.1: d_t = Var_k(s_{k,t})
        # §2.1 defect fix: not the per-sequence Σw normalisation under which sequence weights cancel
        assert m.agreement.normalize in ("tokens", "weight")
        assert m.agreement.filter_quantile == 1.0  # filtering is opt-in


def test_unisd_full_is_the_paper_recipe(tmp_path, tiny_model_dir):
    """§2.6 spelled out: L = weighted KL + 0.01·L_feat + 0.01·L_con, no clipping."""
    m = config(tmp_path, tiny_model_dir, "unisd-full").method
    assert (m.agreement.enabled, m.agreement.contexts, m.agreement.level) == (True, "retrieval", "token")
    assert m.agreement.k == 3 and m.agreement.gamma == 0.001
    assert (m.teacher.kind, m.teacher.ema_every, m.teacher.ema_beta) == ("ema", 10, 0.98)
    assert (m.feature.mode, m.feature.weight) == ("joint", 0.01)
    assert (m.contrastive.enabled, m.contrastive.weight, m.contrastive.margin) == (True, 0.01, 0.1)
    assert m.divergence == "forward_kl" and m.clip.mode == "none"


def test_non_distillation_baselines(tmp_path, tiny_model_dir):
    base = config(tmp_path, tiny_model_dir, "base").method
    assert base.loss == "none" and not base.samples  # the untouched model
    sft = config(tmp_path, tiny_model_dir, "sft").method
    assert (sft.loss, sft.data) == ("sft", "gold") and not sft.samples  # cross-entropy on gold completions
    cfg = config(tmp_path, tiny_model_dir, "ssd")
    ssd = cfg.method
    assert (ssd.loss, ssd.data) == ("sft", "self_sample") and ssd.samples  # SFT on the model's own samples
    # ... sampled at a raised temperature with top-p
    assert ssd.sample_temperature is not None and ssd.sample_temperature > cfg.generation.temperature
    assert ssd.sample_top_p is not None and ssd.sample_top_p < 1.0
    for m in (base, sft, ssd):  # no teacher, so no teacher-based component
        assert m.teacher.kind == "frozen" and not m.agreement.enabled and not m.contrastive.enabled
        assert m.feature.mode == "none" and m.clip.mode == "none"


def test_the_readme_recipes_table_is_the_one_made_from_recipes():
    readme = (REPO / "README.md").read_text()
    table = recipe_table()
    assert table in readme, f"README.md's recipes table should be recipe_table()'s output:\n{table}"
    assert [line for line in table.splitlines()[2:] if line.split("|")[1].strip(" `") not in RECIPES] == []
    assert len(table.splitlines()) == 2 + len(RECIPES)


def test_recipe_from_params_yaml(tmp_path, tiny_model_dir):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tiny_model_dir)))
    cfg = load_config(path, ["recipe=gkd", "components.teacher.kind=ema"])
    assert summary(cfg.method) == {**EXPECTED["gkd"], "teacher": EMA_REFERENCE}


# --- components on top of a recipe ---------------------------------------------------------


@pytest.mark.parametrize(
    "components, changed",
    [
        ({"clip": {"mode": "static"}}, {"clip": ("static", 10.0)}),
        ({"clip": {"mode": "quantile", "q": 0.95}}, {"clip": ("quantile", 0.95)}),
        ({"agreement": {"enabled": False}}, {"agreement": None}),
        ({"agreement": {"level": "sequence", "contexts": "random"}}, {"agreement": ("sequence", "random", 3, 0.001)}),
        ({"teacher": {"ema_beta": 0.9}}, {"teacher": ("ema", 10, 0.9)}),  # merged: kind and N stay
        ({"teacher": {"kind": "frozen"}}, {"teacher": "frozen"}),
        ({"contrastive": {"enabled": False}, "feature": {"mode": "none"}}, {"contrastive": None, "feature": None}),
        ({"divergence": "reverse_kl"}, {"divergence": "reverse_kl"}),
    ],
)
def test_components_switch_on_and_off_on_top_of_unisd_full(tmp_path, tiny_model_dir, components, changed):
    m = config(tmp_path, tiny_model_dir, "unisd-full", components).method
    assert summary(m) == {**EXPECTED["unisd-full"], **changed}


def test_components_on_top_of_plain_sd(tmp_path, tiny_model_dir):
    m = config(tmp_path, tiny_model_dir, "sd", {"teacher": {"kind": "ema"}, "agreement": {"enabled": True}}).method
    s = summary(m)
    assert s["teacher"] == EMA_REFERENCE
    assert s["agreement"][:3] == ("token", "retrieval", 3)
    assert {k: v for k, v in s.items() if k not in ("teacher", "agreement")} == {
        k: v for k, v in PLAIN.items() if k not in ("teacher", "agreement")
    }


def test_recipes_are_not_mutated_by_overrides(tmp_path, tiny_model_dir):
    config(tmp_path, tiny_model_dir, "unisd-full", {"teacher": {"ema_beta": 0.5}, "clip": {"mode": "static"}})
    assert summary(config(tmp_path, tiny_model_dir, "unisd-full").method) == EXPECTED["unisd-full"]


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - {"base"}))
def test_gold_mix_is_offered_to_every_training_recipe(tmp_path, tiny_model_dir, recipe):
    m = config(tmp_path, tiny_model_dir, recipe, {"gold_mix": 0.25}).method
    assert m.gold_mix == 0.25
    assert summary(m) == summary(config(tmp_path, tiny_model_dir, recipe).method)  # nothing else changes


def test_format_components_are_off_by_default(tmp_path, tiny_model_dir):
    for recipe in RECIPES:
        m = config(tmp_path, tiny_model_dir, recipe).method
        assert (m.gold_mix, m.skip_first_tokens) == (0.0, 0)


# --- bad input fails before any work, naming the key ----------------------------------------


@pytest.mark.parametrize(
    "recipe, components, words",
    [
        ("nope", None, ["recipe", "unknown recipe 'nope'"]),
        ("unisd-full", {"agreemnt": {"enabled": True}}, ["components.agreemnt", "Extra inputs"]),
        ("unisd-full", {"agreement": {"k": 1}}, ["components.agreement", "at least 2"]),
        ("agreement_seq_random", {"agreement": {"k": 0}}, ["components.agreement", "at least 2"]),
        ("sd", {"agreement": {"enabled": True, "k": 1}}, ["components.agreement", "at least 2"]),
        ("unisd-full", {"clip": {"mode": "sometimes"}}, ["components.clip.mode"]),
        ("unisd-full", {"teacher": {"ema_beta": 1.5}}, ["components.teacher.ema_beta"]),
        ("unisd-full", {"agreement": {"gamma": -1}}, ["components.agreement.gamma"]),
        ("sft", {"contrastive": {"enabled": True}}, ["components", "contrastive", "needs a teacher"]),
        ("sft", {"feature": {"mode": "joint"}}, ["components", "feature", "needs a teacher"]),
        ("sft", {"teacher": {"kind": "ema"}}, ["components", "ema teacher", "needs a teacher"]),
        ("sft", {"agreement": {"enabled": True}}, ["components", "agreement", "needs a teacher"]),
        ("ssd", {"clip": {"mode": "static"}}, ["components", "clip", "needs a teacher"]),
        ("base", {"agreement": {"enabled": True}}, ["components", "agreement", "needs a teacher"]),
        ("sft", {"skip_first_tokens": 2}, ["components", "skip_first_tokens", "needs a teacher"]),
        ("sd", {"skip_first_tokens": -1}, ["components.skip_first_tokens"]),
        ("base", {"gold_mix": 0.5}, ["components", "gold_mix", "trains nothing"]),
        ("gkd", {"gold_mix": 1.0}, ["components.gold_mix", "less than 1"]),
        ("sd", {"gold_mix": -0.1}, ["components.gold_mix"]),
    ],
)
def test_bad_components_fail_with_config_error(tmp_path, tiny_model_dir, recipe, components, words):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, tiny_model_dir, recipe, components)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("bench", ["humaneval", "arc_challenge"])
def test_evaluation_only_benchmark_cannot_be_trained_on(tmp_path, tiny_model_dir, bench):
    data = {"benchmarks": ["sciq", "mbpp", bench]}
    assert config(tmp_path, tiny_model_dir, "sd", data=data).train_benchmarks == ("sciq", "mbpp")
    with pytest.raises(ConfigError, match=rf"train_set.benchmarks: '{bench}' is evaluation-only"):
        config(tmp_path, tiny_model_dir, "sd", data=data, train_set={"benchmarks": ["sciq", bench]})
    with pytest.raises(ConfigError, match=r"train_set.benchmarks: 'commonsense_qa' is not in data.benchmarks"):
        config(tmp_path, tiny_model_dir, "sd", train_set={"benchmarks": ["commonsense_qa"]})


def test_bad_recipe_in_params_yaml_fails_on_load(tmp_path, tiny_model_dir):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**tiny_params(tiny_model_dir), "recipe": "unisd_full"}))
    with pytest.raises(ConfigError, match=r"params.yaml: recipe: unknown recipe 'unisd_full'"):
        load_config(path)
