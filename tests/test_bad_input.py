"""Bad input, everywhere: params, dataset files and metrics files that cannot be used end
in one line naming the file and the key, line or row, exit status 2, and nothing written.

Each case is a small hand-made file; the expected words are written out here."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow_db import empty_mlflow_db

from unisd.cli import main
from unisd.config import load_config
from unisd.data import DataError, load_benchmark
from unisd.stages.evaluate import eval_examples

FIXTURES = Path(__file__).parent / "fixtures" / "paper"


def unisd(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("unisd: error:")]


# --------------------------------------------------------------------------- params.yaml


@pytest.mark.parametrize(
    "text, words",
    [
        (b"eval:\n  limit: \xff5\n", ["line 2, column 10: byte 0xff is not UTF-8"]),
        (b"", ["no params in the file"]),
        (b"# only a comment\n", ["no params in the file"]),
        (
            b"eval:\n  limit: 3\nrun:\n  seed: 1\neval:\n  limit: 4\n",
            ["line 5", "key 'eval' is given twice (first on line 1)"],
        ),
        (b"eval:\n  limit: 3\n  limit: 4\n", ["line 3", "key 'limit' is given twice"]),
        (b"eval: {limit: 3, limit: 4}\n", ["key 'limit' is given twice"]),
        (b"generation:\n  temperature: .inf\n", ["generation.temperature: must be a finite number (got inf)"]),
        (b"generation:\n  top_p: .nan\n", ["generation.top_p"]),
        (b"generation:\n  temperature: inf\n", ["generation.temperature: must be a finite number"]),  # the string 'inf'
        (b"components: {temperature: .inf}\n", ["components.temperature: must be a finite number"]),
        (b"study:\n  size: {train.lr: .inf}\n", ["study.size.train.lr: must be a finite number"]),
        (
            b"study:\n  recipe_components: {base: {gold_mix: 0.25}}\n",
            ["study.recipe_components: base: gold_mix adds training items, but loss is 'none'"],
        ),
        (
            b"study:\n  recipe_components: {gkd: {gold_mix: 1.5}}\n",
            ["recipe_components: gkd.gold_mix: Input should be less"],
        ),
        (b"study:\n  recipe_components: {nope: {}}\n", ["study.recipe_components: unknown recipe 'nope'"]),
        (b"eval:\n  code_workers: 100000\n", ["eval.code_workers: Input should be less than or equal to 256"]),
        (b"paths:\n  artifacts: /\n", ["paths.artifacts: '/' is the project folder or a folder above it"]),
        (b"paths:\n  artifacts: .\n", ["paths.artifacts: '.' is the project folder"]),
        (b"paths:\n  metrics: ..\n", ["paths.metrics: '..' is the project folder or a folder above it"]),
        (b"paths:\n  artifacts: ''\n", ["paths.artifacts: '' is the project folder"]),
        (b"paths:\n  metrics: artifacts/metrics\n", ["paths.metrics: the metrics and artifacts folders"]),
        (b"model:\n  name: ''\n", ["model.name: String should have at least 1 character"]),
        (b"run:\n  seed: 18446744073709551616\n", ["run.seed: Input should be less than or equal to 4294967295"]),
        (b"study:\n  seeds: [1, -2]\n", ["study.seeds.1: Input should be greater than or equal to 0"]),
        (b"study:\n  seeds: [true]\n", ["study.seeds.0: Input should be a valid integer"]),
        (b"eval:\n  limit: [1, 2\n", ["not valid YAML"]),
        (b"- eval\n", ["the top level must be a mapping"]),
    ],
)
def test_bad_params_give_one_line_and_exit_2(tmp_path, capsys, text, words):
    params = tmp_path / "params.yaml"
    params.write_bytes(text)
    code, lines = unisd(capsys, "prepare", "--params", str(params))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"unisd: error: {params}: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # nothing written


@pytest.mark.parametrize(
    "override, words",
    [
        ("eval.limit=[1, 2", ["override eval.limit", "not valid YAML"]),
        ("data.sources={a: x, a: y}", ["override data.sources", "key 'a' is given twice"]),
        ("generation.temperature=.inf", ["generation.temperature: must be a finite number"]),
    ],
)
def test_bad_overrides_give_one_line_and_exit_2(tmp_path, capsys, override, words):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    code, lines = unisd(capsys, "prepare", "--params", str(params), "--set", override)
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_a_profile_with_a_repeated_key(tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    profile.write_text("eval.limit: 3\neval.limit: 4\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    code, lines = unisd(capsys, "prepare", "--params", str(tmp_path / "params.yaml"), "--profile", str(profile))
    assert code == 2 and lines == [
        f"unisd: error: {profile}: line 2, column 1: not valid YAML: key 'eval.limit' is given twice (first on line 1)"
    ]


def test_several_problems_are_one_line_each(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  limit: -1\n  code_workers: 0\n")
    code, lines = unisd(capsys, "prepare", "--params", str(params))
    assert code == 2 and len(lines) == 2
    assert ": eval.limit: " in lines[0] and ": eval.code_workers: " in lines[1]


def test_a_bom_and_an_explicit_empty_mapping_are_fine(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"\xef\xbb\xbf{}\n")
    assert load_config(params).eval.limit == 40  # params.yaml's value: the schema default


# --------------------------------------------------------------------------- dataset files


def source(tmp_path: Path, name: str, edit: dict[str, bytes]) -> Path:
    """A copy of a fixture source folder with some files replaced."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    for file, data in edit.items():
        (folder / file).write_bytes(data)
    return folder


def mbpp_row(**fields) -> bytes:
    row = {
        "task_id": 11,
        "text": "Add.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3"],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
    return (json.dumps({**row, **fields}) + "\n").encode()


GPQA = (FIXTURES / "gpqa" / "test.jsonl").read_bytes()


def with_byte(data: bytes, row: int, byte: bytes = b"\xe9") -> bytes:
    """`data` with `byte` inserted before the end of line `row` (1-based), inside its last string."""
    lines = data.split(b"\n")
    lines[row - 1] = lines[row - 1][:-2] + byte + lines[row - 1][-2:]
    return b"\n".join(lines)


@pytest.mark.parametrize(
    "name, edit, words",
    [
        ("gpqa", {"test.jsonl": with_byte(GPQA, 2)}, ["test.jsonl: row 2: column", "byte 0xe9 is not UTF-8"]),
        ("gpqa", {"test.jsonl": b""}, ["the test split of gpqa has no examples"]),
        ("gpqa", {"test.jsonl": b"\n\n"}, ["the test split of gpqa has no examples"]),
        (
            "mbpp",
            {"test.jsonl": mbpp_row(test_list="assert add(1, 2) == 3")},
            ["test.jsonl: row 1", "test_list: expected a list of strings, got str"],
        ),
        (
            "mbpp",
            {"test.jsonl": mbpp_row(test_list={"assert add(1, 2) == 3": 1})},
            ["row 1", "test_list: expected a list of strings, got dict"],
        ),
        ("mbpp", {"test.jsonl": mbpp_row(test_list=["assert True", 3])}, ["row 1", "a list with non-text items"]),
        ("mbpp", {"test.jsonl": mbpp_row(test_list=["  "])}, ["row 1", "a blank test: it would pass any code"]),
        ("mbpp", {"test.jsonl": mbpp_row(task_id=None) * 3}, ["row 1", "task_id: expected a non-empty id, got None"]),
        (
            "mbpp",
            {"test.jsonl": mbpp_row() + mbpp_row(text="Add again.")},
            ["row 2", "id 'mbpp-11' is already the id of row 1"],
        ),
        ("mbpp", {"test.jsonl": mbpp_row(code=None)}, ["row 1", "code: expected text, got NoneType"]),
        (
            "cos_e",
            {"test.jsonl": b'{"id": "q1", "question": "Where?", "choices": "abc", "answer": "a"}\n'},
            ["row 1", "choices: expected a list of strings, got str"],
        ),
        ("toolalpaca", {"test.json": b'[{"Name": "caf\xe9"}]'}, ["test.json: column 15: byte 0xe9 is not UTF-8"]),
    ],
)
def test_bad_dataset_rows_name_the_file_and_row(tmp_path, name, edit, words):
    folder = source(tmp_path, name, edit)
    with pytest.raises(DataError) as err:
        load_benchmark("paper", name, 0, str(folder))
    message = str(err.value)
    assert message.startswith(str(folder)) and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_a_bom_at_the_start_of_a_dataset_file_is_fine(tmp_path):
    folder = source(tmp_path, "gpqa", {"test.jsonl": b"\xef\xbb\xbf" + GPQA})
    assert len(load_benchmark("paper", "gpqa", 0, str(folder))["test"]) == GPQA.count(b"\n")


def test_a_bad_dataset_file_through_the_cli(tmp_path, tmp_path_factory, capsys, monkeypatch):
    empty_mlflow_db(tmp_path_factory, tmp_path / "mlflow.db")
    folder = source(tmp_path, "gpqa", {"test.jsonl": with_byte(GPQA, 1)})
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"suite": "paper", "benchmarks": ["gpqa"], "sources": {"gpqa": str(folder)}},
                "eval": {"split": "test"},
            }
        )
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, lines = unisd(capsys, "prepare", "--params", str(params))
    column = GPQA.index(b"\n") - 1
    assert code == 2 and lines == [f"unisd: error: {folder}/test.jsonl: row 1: column {column}: byte 0xe9 is not UTF-8"]
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.jsonl"))
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unisd").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs if r.info.run_name == "prepare"} == {"prepare": "FAILED"}


def test_an_empty_evaluation_split_is_an_error_before_the_stage(tmp_path):
    cfg = load_config(FIXTURES.parent.parent.parent / "params.yaml")
    (tmp_path / "sciq").mkdir()
    (tmp_path / "sciq" / "test.jsonl").write_text("")
    with pytest.raises(DataError, match=r"sciq/test.jsonl: the test split of sciq has no examples"):
        eval_examples(cfg, tmp_path, "sciq")


# --------------------------------------------------------------------------- metrics files


@pytest.mark.parametrize(
    "data, words",
    [
        (b'{"benchmarks": \xff}', ["column 16: byte 0xff is not UTF-8"]),
        (b'{"benchmarks": ', ["not valid JSON"]),
        (b"[1, 2]", ["not a metrics file"]),
        (b'{"benchmarks": {"sciq": {"n": 1}}}', ["not a metrics file", "score"]),
    ],
)
def test_unisd_table_on_a_bad_file(tmp_path, capsys, data, words):
    path = tmp_path / "m.json"
    path.write_bytes(data)
    code, lines = unisd(capsys, "table", str(path))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"unisd: error: {path}: ")
    assert all(w in lines[0] for w in words), lines
    code, lines = unisd(capsys, "table", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot be read: No such file or directory" in lines[0]


def test_prefect_logs_a_run_failed_on_bad_input_without_a_traceback(tmp_path, capsys):
    """`unisd run`: Prefect logs a failed task with its traceback; for bad input the
    message alone is kept (the error line names the problem), for a bug the traceback."""
    unisd(capsys, "table", str(tmp_path / "missing.json"))  # every command sets this up
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        for err in (DataError("f.jsonl: row 1: bad"), RuntimeError("a bug")):
            try:
                raise err
            except Exception:
                logger.exception("Task run failed with exception: %r", err)
    finally:
        logger.removeHandler(handler)
    assert [r.exc_info is None for r in records] == [True, False]
