"""The stage registry is the one description of each stage: dvc.yaml's deps and params
agree with it, a stage's code version moves with exactly the modules it runs, and a
param or a data file reaches exactly the stages that read it.

Oracles: the expected stages are written out by hand from what each stage does;
dvc.yaml is read as YAML; modules are edited in a copy of the package."""

import shutil
from pathlib import Path

import pytest
import yaml
from project import REPO

from unisd.artifacts import PACKAGE, code_version
from unisd.config import build_config, load_config
from unisd.registry import COMMANDS, STAGES, dvc_deps

ALL = set(STAGES)
MODEL_FREE = ALL - {"model", "prepare"}  # the stages that load a model
FIXTURES = Path(__file__).parent / "fixtures" / "paper"


def test_dvc_yaml_stages_have_the_registrys_deps_and_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    checked = set()
    for name, stage in stages.items():
        if (command := COMMANDS.get(stage["cmd"])) is None:
            continue
        checked.add(stage["cmd"])
        code, expected = [d for d in stage["deps"] if d.startswith("unisd")], dvc_deps(command.code_files)
        assert code == expected, f"{name}: its unisd deps should be\n{yaml.safe_dump(expected)}"
        assert set(stage["params"]) == command.dvc_params, name
    assert checked == set(COMMANDS)


def rel(files) -> set[str]:
    return {f.relative_to(PACKAGE).as_posix() for f in files}


def test_each_stage_runs_its_own_modules():
    model, evaluate, train = (rel(STAGES[s].code_files) for s in ("model", "evaluate", "train"))
    assert {"stages/model.py", "assets.py"} <= model
    assert not {"losses.py", "evaluate.py", "train.py", "stages/evaluate.py", "sandbox/judge.py"} & model
    # the sandbox's child process runs inside/runner.py as a script: no import names it
    assert {"stages/evaluate.py", "evaluate.py", "scoring.py", "sandbox/inside/runner.py"} <= evaluate
    assert not {"train.py", "teachers.py", "stages/train.py", "stages/model.py"} & evaluate
    assert {"stages/train.py", "train.py", "objective.py", "losses.py", "chunked.py", "teachers.py"} <= train
    assert all("registry.py" not in rel(spec.code_files) for spec in STAGES.values())


@pytest.mark.parametrize(
    "module, changed",
    [
        ("stages/model.py", {"model"}),
        ("stages/inputs.py", {"contexts", "negatives", "generate", "filter", "train"}),
        ("losses.py", MODEL_FREE),  # before the registry, the model conversion too
        ("decode_attention.cpp", MODEL_FREE),  # compiled on first use: no import names it
        ("teachers.py", {"filter", "train"}),
        ("sandbox/inside/runner.py", MODEL_FREE - {"contexts"}),
        ("data/paper.py", ALL),  # read by the params schema every stage uses
        ("registry.py", set()),  # what it says about a stage enters the keys as values
    ],
)
def test_editing_a_module_changes_the_code_version_of_exactly_the_stages_that_run_it(tmp_path, module, changed):
    package = Path(shutil.copytree(PACKAGE, tmp_path / "unisd", ignore=shutil.ignore_patterns("__pycache__")))

    def versions() -> dict[str, str]:
        return {
            name: code_version(spec.function.__module__, ("unisd.registry",), package) for name, spec in STAGES.items()
        }

    before = versions()
    with open(package / module, "a") as fh:
        fh.write("\n# an edit\n")
    after = versions()
    assert {name for name in STAGES if before[name] != after[name]} == changed


def keys(cfg) -> dict[str, str]:
    return {name: spec.key(cfg, {}) for name, spec in STAGES.items()}


@pytest.mark.parametrize(
    "override, changed",
    [
        ({"eval.limit": 7}, {"evaluate"}),
        ({"eval.code_timeout_s": 3}, {"negatives", "evaluate"}),
        ({"eval.code_isolation": "strict"}, {"negatives", "evaluate"}),
        ({"train.lr": 3e-4}, {"train"}),
        ({"train.lora.r": 8}, {"filter", "train"}),  # the EMA teacher is built on the adapter
        ({"generation.score_tokens": 512}, {"negatives", "generate", "filter"}),
        ({"generation.backend": "vllm"}, {"contexts", "negatives", "generate", "filter"}),  # induction samples too
        ({"eval.backend": "vllm"}, {"evaluate"}),
        ({"run.seed": 7}, {"contexts", "negatives", "generate", "train"}),
        ({"run.name": "other"}, set()),
        ({"components": {"clip": {"mode": "static", "tau": 5.0}}}, {"train"}),
        ({"data.split_seed": 7}, {"prepare", "evaluate"}),
        ({"model.dtype": "bfloat16"}, ALL - {"prepare"}),
    ],
)
def test_a_param_changes_the_key_of_exactly_the_stages_that_read_it(override, changed):
    base = load_config(REPO / "params.yaml")
    other = load_config(REPO / "params.yaml", override)
    before, after = keys(base), keys(other)
    assert {name for name in STAGES if before[name] != after[name]} == changed


def test_one_byte_of_a_local_benchmark_file_changes_the_prepare_key_only(tmp_path):
    source = Path(shutil.copytree(FIXTURES / "gpqa", tmp_path / "gpqa"))
    params = {"data": {"suite": "paper", "benchmarks": ["gpqa"], "sources": {"gpqa": str(source)}}}
    cfg = build_config(params, tmp_path)
    before = keys(cfg)
    data = bytearray((source / "test.jsonl").read_bytes())
    data[data.index(b"a")] = ord("b")  # same size
    (source / "test.jsonl").write_bytes(bytes(data))
    after = keys(cfg)
    assert {name for name in STAGES if before[name] != after[name]} == {"prepare"}


def test_tasks_retry_what_may_pass_next_time():
    from prefect.states import Failed

    from unisd.data.schema import DataError
    from unisd.orchestration.tasks import TASKS, worth_retrying

    assert {name: task.retries for name, task in TASKS.items()} == {
        **dict.fromkeys(STAGES, 0),
        "model": 2,
        "prepare": 2,
        "train": 1,
    }  # downloads; a round that resumes
    assert TASKS["model"].retry_delay_seconds == [10, 20]  # growing
    assert not worth_retrying(TASKS["model"], None, Failed(data=DataError("row 3: not JSON")))
    assert worth_retrying(TASKS["model"], None, Failed(data=OSError("connection reset")))


def test_run_names_say_stage_round_and_label():
    assert STAGES["generate"].run_name({"round_idx": 2, "out": "x"}) == "generate-r2"
    assert STAGES["evaluate"].run_name({"label": "base"}) == "evaluate-base"
    assert STAGES["model"].run_name({"out": "x"}) == "model"


STEPS = {"model", "prepare", "evaluate-base", "generate-r1", "filter-r1", "train-r1", "evaluate-sd"}
# each step's upstream steps: the outputs passed to it (docs: the pipeline's DAG)
UPSTREAM = {
    "model": set(),
    "prepare": set(),
    "evaluate-base": {"model", "prepare"},
    "generate-r1": {"model", "prepare"},
    "filter-r1": {"generate-r1", "model", "prepare"},
    "train-r1": {"filter-r1", "model", "prepare"},
    "evaluate-sd": {"train-r1", "model", "prepare"},
}


def task_runs_of(flow_run_id) -> dict[str, set[str]]:
    """The flow run's task runs by name, each with the names of the task runs Prefect
    recorded as its inputs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.id: run.name for run in runs}
    return {
        run.name: {names[i.id] for inputs in run.task_inputs.values() for i in inputs if i.id in names} for run in runs
    }


def test_the_flow_reruns_exactly_the_stages_a_change_reaches(
    tmp_path, tmp_path_factory, tiny_model_dir, monkeypatch, one_thread, prefect_storage
):
    """Through Prefect's cache on the tiny model: nothing, then one byte of a benchmark
    file, one param, the code of one stage."""
    from mlflow_db import empty_mlflow_db
    from project import tiny_params

    from unisd.orchestration.pipeline import pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = Path(shutil.copytree(FIXTURES / "scienceqa", tmp_path / "scienceqa"))
    params = tiny_params(
        tiny_model_dir, data={"suite": "paper", "benchmarks": ["scienceqa"], "sources": {"scienceqa": str(source)}}
    )
    params.update(recipe="sd")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    empty_mlflow_db(tmp_path_factory, project / "mlflow.db")

    def ran(**overrides) -> set[str]:
        cached = pipeline(str(project / "params.yaml"), overrides)["cached"]
        assert set(cached) == STEPS
        return {step for step, hit in cached.items() if not hit}

    first = pipeline(str(project / "params.yaml"), {}, return_state=True)
    assert first.result()["cached"] == dict.fromkeys(STEPS, False)
    # task runs named by stage, round and label, linked to the runs whose outputs they read
    assert task_runs_of(first.state_details.flow_run_id) == UPSTREAM
    assert ran() == set()
    test_split = source / "test.jsonl"
    test_split.write_bytes(test_split.read_bytes().replace(b"thunder", b"thundar"))
    assert ran() == STEPS - {"model"}
    assert ran(**{"eval.limit": 1}) == {"evaluate-base", "evaluate-sd"}
    monkeypatch.setitem(STAGES["train"].__dict__, "code", "edited")  # what an edit of unisd/train.py does
    # the round trains again and writes the same bytes: its evaluation stays cached
    assert ran(**{"eval.limit": 1}) == {"train-r1"}
