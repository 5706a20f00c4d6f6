"""params.yaml validation: bad params fail before any work, naming the file and key path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unisd.config import ConfigError, apply_overrides, build_config, load_config, parse_override, profile_overrides

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str, overrides=()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert str(path) in message, message
    return message


def test_repository_params_and_defaults_are_valid(tmp_path):
    cfg = load_config(REPO / "params.yaml")
    assert cfg.root == REPO
    assert cfg.data.suite == "embedded"
    # An empty mapping is all defaults; relative paths are taken from the params file's folder.
    cfg = load_config(write(tmp_path, "{}\n"))
    assert cfg.eval.limit == 40 and cfg.eval.max_new_tokens.code == 384
    assert cfg.artifacts == tmp_path.resolve() / "artifacts"
    assert cfg.data.benchmarks == ("sciq", "arc_challenge", "commonsense_qa", "mbpp", "humaneval")


def leaves(data, path=""):
    """{dotted key: value} of every leaf of nested params (a mapping's keys as given)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in leaves(value, f"{path}.{key}" if path else key).items()}
    return {path: list(data) if isinstance(data, tuple) else data}


def test_every_schema_default_is_the_value_of_params_yaml(tmp_path):
    """params.yaml is the single source: a key left out of a params file means what it
    means there. Read as YAML, not through the schema, so the file is the oracle."""
    import yaml

    given = leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    defaults = leaves(load_config(write(tmp_path, "{}\n")).model_dump(mode="json"))
    assert {k: defaults.get(k, "<no default>") for k in given} == given
    assert set(defaults) == set(given), "a param with a schema default is missing from params.yaml"


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("eval:\n  limitt: 5\n", "eval.limitt", "Extra inputs"),
        ("evaluation:\n  limit: 5\n", "evaluation", "Extra inputs"),
        ("eval:\n  max_new_tokens: {mcq: 10, cod: 5}\n", "eval.max_new_tokens.cod", "Extra inputs"),
        ("model:\n  name: x\n  revison: main\n", "model.revison", "Extra inputs"),
    ],
)
def test_unknown_keys(tmp_path, text, key, words):
    message = config_error(tmp_path, text)
    assert f": {key}: " in message and words in message


@pytest.mark.parametrize(
    "text, key",
    [
        ("eval:\n  limit: many\n", "eval.limit"),
        ("eval:\n  batch_size: 2.5\n", "eval.batch_size"),
        ("eval:\n  limit: true\n", "eval.limit"),  # a boolean is not a count
        ("eval:\n  code_timeout_s: yes\n", "eval.code_timeout_s"),  # YAML 1.1 `yes` is a boolean
        ("run:\n  seed: [1]\n", "run.seed"),
        ("eval:\n  ppl: maybe\n", "eval.ppl"),
        ("eval: 5\n", "eval"),
        ("data:\n  benchmarks: sciq\n", "data.benchmarks"),
        ("data:\n  sources: [a, b]\n", "data.sources"),
        ("model:\n  dtype: float64\n", "model.dtype"),
        ("model:\n  template: jinja\n", "model.template"),
        ("data:\n  suite: papers\n", "data.suite"),
        ("run:\n  name: my run\n", "run.name"),  # names folders: no spaces
    ],
)
def test_wrong_types(tmp_path, text, key):
    assert f": {key}: " in config_error(tmp_path, text)


@pytest.mark.parametrize(
    "text, key, bound",
    [
        ("eval:\n  limit: -1\n", "eval.limit", "greater than or equal to 0"),
        ("eval:\n  limits: {sciq: -2}\n", "eval.limits.sciq", "greater than or equal to 0"),
        ("eval:\n  batch_size: 0\n", "eval.batch_size", "greater than or equal to 1"),
        ("eval:\n  code_timeout_s: 0\n", "eval.code_timeout_s", "greater than 0"),
        ("eval:\n  code_timeout_s: 601\n", "eval.code_timeout_s", "less than or equal to 600"),
        ("eval:\n  max_new_tokens: {mcq: 0}\n", "eval.max_new_tokens.mcq", "greater than or equal to 1"),
        ("prompts:\n  max_prompt_tokens: 8\n", "prompts.max_prompt_tokens", "greater than or equal to 32"),
        ("run:\n  seed: -3\n", "run.seed", "greater than or equal to 0"),
    ],
)
def test_out_of_range(tmp_path, text, key, bound):
    message = config_error(tmp_path, text)
    assert f": {key}: " in message and bound in message


def test_every_error_is_reported_at_once(tmp_path):
    message = config_error(tmp_path, "eval:\n  limit: -1\n  batch_size: 0\nrun:\n  seed: x\n")
    for key in ("eval.limit", "eval.batch_size", "run.seed"):
        assert f": {key}: " in message


@pytest.mark.parametrize(
    "text, key, name",
    [
        ("data:\n  benchmarks: [sciq, gpqa]\n", "data.benchmarks", "'gpqa'"),
        ("data:\n  suite: paper\n", "data.benchmarks", "'sciq'"),  # the default list is the embedded suite's
        ("data:\n  suite: paper\n  benchmarks: [gpqa, cos_e]\n  sources: {sciq: /x}\n", "data.sources", "'sciq'"),
        ("data:\n  sources: {foo: /x}\n", "data.sources", "'foo'"),
        ("eval:\n  limits: {sciqq: 10}\n", "eval.limits", "'sciqq'"),
    ],
)
def test_unknown_benchmarks_for_the_suite(tmp_path, text, key, name):
    message = config_error(tmp_path, text)
    assert f": {key}: " in message and f"unknown benchmark {name}" in message


def test_paper_suite_with_its_own_benchmarks_is_valid(tmp_path):
    cfg = load_config(
        write(tmp_path, "data:\n  suite: paper\n  benchmarks: [gpqa, toolalpaca]\n  sources: {gpqa: fixtures/gpqa}\n")
    )
    assert cfg.data.benchmarks == ("gpqa", "toolalpaca") and cfg.data.sources == {"gpqa": "fixtures/gpqa"}


def test_a_benchmark_without_the_eval_split(tmp_path):
    message = config_error(tmp_path, "eval:\n  split: validation\n")
    assert ": eval.split: 'humaneval' has no 'validation' split (only test)" in message
    cfg = load_config(write(tmp_path, "eval:\n  split: validation\ndata:\n  benchmarks: [sciq, arc_challenge]\n"))
    assert cfg.eval.split == "validation"


def test_per_benchmark_limits_over_the_common_one(tmp_path):
    cfg = load_config(write(tmp_path, "eval:\n  limit: 0\n  limits: {arc_challenge: 150, humaneval: 3}\n"))
    assert [cfg.eval.limit_of(b) for b in ("sciq", "arc_challenge", "humaneval")] == [0, 150, 3]


def test_empty_benchmark_list(tmp_path):
    assert ": data.benchmarks: " in config_error(tmp_path, "data:\n  benchmarks: []\n")


def test_root_is_not_a_param(tmp_path):
    message = config_error(tmp_path, "root: /somewhere/else\n")
    assert "root" in message and "not a param" in message
    with pytest.raises(ConfigError, match="root"):
        build_config({"root": "/x"}, tmp_path)


@pytest.mark.parametrize("text", ["- eval\n- limit\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    assert "mapping" in config_error(tmp_path, text)


def test_bad_yaml(tmp_path):
    assert "not valid YAML" in config_error(tmp_path, "eval:\n  limit: [1, 2\n")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("eval.limit=5", ["eval", "limit"], 5),
        ("eval.code_timeout_s=2.5", ["eval", "code_timeout_s"], 2.5),
        ("eval.ppl=false", ["eval", "ppl"], False),
        ("model.revision=null", ["model", "revision"], None),
        ("data.benchmarks=[sciq, mbpp]", ["data", "benchmarks"], ["sciq", "mbpp"]),
        ("data.sources={mbpp: /data/mbpp}", ["data", "sources"], {"mbpp": "/data/mbpp"}),
        ("model.name=Qwen/Qwen2.5-0.5B-Instruct", ["model", "name"], "Qwen/Qwen2.5-0.5B-Instruct"),
        ("run.name=a=b", ["run", "name"], "a=b"),  # only the first '=' separates
        ("run.name=", ["run", "name"], ""),
        (" eval.limit =7", ["eval", "limit"], 7),
    ],
)
def test_parse_override_is_yaml_typed(item, key, value):
    assert parse_override(item) == (key, value)


def test_parse_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("eval.limit")


def test_apply_overrides_creates_and_replaces():
    data = {"eval": {"limit": 100, "batch_size": 4}}
    out = apply_overrides(data, ["eval.limit=5", "model.dtype=bfloat16", "eval.max_new_tokens.code=9"])
    assert out == {"eval": {"limit": 5, "batch_size": 4, "max_new_tokens": {"code": 9}}, "model": {"dtype": "bfloat16"}}
    assert apply_overrides({}, {"eval.limit": 3, "run.seed": 7}) == {"eval": {"limit": 3}, "run": {"seed": 7}}


def test_apply_overrides_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="eval.limit.x"):
        apply_overrides({"eval": {"limit": 5}}, ["eval.limit.x=1"])


def test_load_config_with_overrides(tmp_path):
    path = write(tmp_path, "eval:\n  limit: 100\n  ppl: true\n")
    cfg = load_config(path, ["eval.limit=5", "eval.ppl=false", "data.benchmarks=[mbpp]"])
    assert (cfg.eval.limit, cfg.eval.ppl, cfg.data.benchmarks) == (5, False, ("mbpp",))
    assert load_config(path, {"eval.limit": 7}).eval.limit == 7
    # Overrides are validated like the file.
    assert ": eval.limit: " in config_error(tmp_path, "eval:\n  limit: 100\n", ["eval.limit=-1"])
    assert ": eval.limitt: " in config_error(tmp_path, "{}\n", ["eval.limitt=5"])


def test_digests_follow_the_params(tmp_path):
    path = write(tmp_path, "{}\n")
    a, b = load_config(path), load_config(path, ["eval.limit=5"])
    assert a.section("data") == b.section("data")
    assert a.section("eval") != b.section("eval") and a.digest() != b.digest()


def test_cli_rejects_bad_params_before_any_work(tmp_path):
    bad = write(tmp_path, "eval:\n  limit: -1\n  limitt: 3\n")
    env = {**os.environ, "UNISD_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "unisd.cli", "prepare", "--params", str(bad)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "eval.limit" in proc.stderr and "eval.limitt" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no artifacts, metrics, runs or cache


def test_cli_rejects_a_bad_override(tmp_path):
    good = write(tmp_path, "{}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "unisd.cli", "prepare", "--params", str(good), "--set", "eval.batch_size=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "eval.batch_size" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_paper_profile_sets_the_papers_hyperparameters():
    cfg = load_config(REPO / "params.yaml", profile_overrides(REPO / "profiles" / "paper.yaml"))
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2e-5, 8, 4, 1)
    assert cfg.prompts.teacher_template == "spec" and cfg.eval.limit == 0 and cfg.generation.max_new_tokens.mcq == 1024


def test_a_profile_comes_before_the_command_line(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("eval.limit: 7\ntrain.lr: 3.0e-4\ncomponents: {clip: {mode: static}}\n")
    cfg = load_config(REPO / "params.yaml", profile_overrides(profile) + ["eval.limit=9"])
    assert (cfg.eval.limit, cfg.train.lr, cfg.components) == (9, 3e-4, {"clip": {"mode": "static"}})


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "1: 2\n"])
def test_a_profile_must_map_keys_to_values(tmp_path, text):
    profile = tmp_path / "p.yaml"
    profile.write_text(text)
    with pytest.raises(ConfigError, match=f"{profile}: a profile must be a mapping"):
        profile_overrides(profile)
    with pytest.raises(ConfigError, match="profile not found"):
        profile_overrides(tmp_path / "missing.yaml")
