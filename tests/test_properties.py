"""Property-based tests (hypothesis) of the three readers of outside text: the params
loader, the dataset row schema, and the answer parsers.

Each property says what must hold for every input of a kind, not for a few hand-picked
ones: a reader either returns a valid value or raises its own error naming the file,
never another exception; what the writers produce, the readers read back."""

import json
import math
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from unisd.config import Config, ConfigError, load_config
from unisd.data.convert import convert_rows
from unisd.data.embedded import mbpp_example
from unisd.data.schema import LETTERS, DataError, Example, read_examples, write_jsonl
from unisd.prompts import gold_response, mcq_response
from unisd.scoring import extract_code, parse_mcq, parse_react

# no example database: nothing is written into the repository
SETTINGS = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One folder for the module: hypothesis reruns a test body many times per fixture."""
    return tmp_path_factory.mktemp("properties")


def write(folder: Path, data: bytes, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def non_finite(obj) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return any(non_finite(v) for v in items)


# --------------------------------------------------------------------------- the params loader

SECTIONS = {
    name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
    for name, field in Config.model_fields.items()
    if name != "root"
}


@st.composite
def params_docs(draw) -> dict:
    """Known sections and keys with values of any type: valid, wrong or out of range."""
    doc = {}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=3)):
        keys = SECTIONS[name]
        doc[name] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=3)) if keys else draw(values)
    return doc


def loads_or_names_the_file(path: Path):
    """The property every params file must have: a Config, or a ConfigError whose every
    line names the file; nothing else."""
    try:
        return load_config(path)
    except ConfigError as err:
        assert all(line.startswith(f"{path}: ") for line in str(err).splitlines()), str(err)
        return None


@SETTINGS
@given(st.binary(max_size=200))
@example(b"eval:\n  limit: \xff\n")
@example(b"\xef\xbb\xbf{}")
def test_any_bytes_give_a_config_or_a_config_error(folder, data):
    loads_or_names_the_file(write(folder, data))


@SETTINGS
@given(params_docs())
def test_any_params_document_gives_a_valid_config_or_a_config_error(folder, doc):
    cfg = loads_or_names_the_file(write(folder, yaml.safe_dump(doc, allow_unicode=True).encode()))
    if cfg is not None:
        dumped = cfg.model_dump(mode="python")
        assert not non_finite(dumped) and not non_finite(cfg.method.model_dump())
        # what was accepted loads again to the same config
        again = load_config(write(folder, yaml.safe_dump(cfg.model_dump(mode="json")).encode(), "again.yaml"))
        assert again.digest() == cfg.digest()


@SETTINGS
@given(st.sampled_from(sorted(SECTIONS)), values, values)
def test_a_section_given_twice_is_named(folder, section, first, second):
    text = yaml.safe_dump({section: first}) + yaml.safe_dump({section: second})
    path = write(folder, text.encode())
    with pytest.raises(ConfigError, match=f"key '{section}' is given twice"):
        load_config(path)


@SETTINGS
@given(
    st.sampled_from(
        [
            ("generation", "temperature"),
            ("generation", "top_p"),
            ("train", "lr"),
            ("eval", "code_timeout_s"),
            ("train", "max_grad_norm"),
        ]
    ),
    st.sampled_from([".inf", "-.inf", ".nan", "inf", "nan"]),
)
def test_non_finite_numbers_are_refused_by_key(folder, field, value):
    section, key = field
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: "):
        load_config(write(folder, f"{section}:\n  {key}: {value}\n".encode()))


# --------------------------------------------------------------------------- the dataset row schema

texts = st.text(min_size=1, max_size=20).filter(str.strip)


@st.composite
def examples(draw) -> Example:
    task = draw(st.sampled_from(["mcq", "code", "tool"]))
    base = {
        "id": draw(texts),
        "benchmark": draw(texts),
        "task": task,
        "question": draw(texts),
        "context": draw(st.text(max_size=20)),
    }
    if task == "mcq":
        choices = draw(st.lists(st.text(max_size=10), min_size=2, max_size=len(LETTERS)))
        return Example(**base, choices=choices, answer=draw(st.sampled_from(LETTERS[: len(choices)])))
    if task == "code":
        return Example(**base, answer=draw(texts), tests=draw(st.lists(texts, min_size=1, max_size=3)))
    return Example(
        **base,
        answer=draw(texts),
        tools=draw(texts),
        action_input=draw(st.text(max_size=20)),
        meta={"api": draw(st.text(max_size=8))},
    )


@SETTINGS
@given(st.lists(examples(), max_size=5))
def test_examples_round_trip_through_jsonl(folder, rows):
    path = folder / "rows.jsonl"
    write_jsonl(path, rows)
    assert read_examples(path) == rows


@SETTINGS
@given(st.lists(st.one_of(values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=30)), max_size=5))
def test_any_jsonl_file_gives_examples_or_a_data_error_naming_file_and_row(folder, lines):
    data = b"\n".join(lines)
    path = write(folder, data, "rows.jsonl")
    try:
        read_examples(path)
    except DataError as err:
        message = str(err)
        assert message.startswith(f"{path}: row ") and "\n" not in message, message
        assert 1 <= int(message.split(": row ")[1].split(":")[0]) <= data.count(b"\n") + 1


def usable_tests(value) -> bool:
    """What a test list must be, written independently of the loader."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(t, str) and t.strip() for t in value)


@SETTINGS
@given(values)
@example("assert f(1) == 2")
@example({"assert f(1) == 2": 1})
@example(["assert f(1) == 2"])
def test_mbpp_test_lists_are_used_as_given_or_refused(test_list):
    row = {"task_id": 7, "text": "Do it.", "code": "def f(x):\n    return x + 1", "test_list": test_list}
    if usable_tests(test_list):
        (ex,) = convert_rows("src", [row], mbpp_example)
        assert ex.tests == test_list
    else:
        with pytest.raises(DataError, match=r"^src: row 1: "):
            convert_rows("src", [row], mbpp_example)


@SETTINGS
@given(values)
def test_mbpp_ids_are_never_made_up(task_id):
    row = {"task_id": task_id, "text": "Do it.", "code": "pass", "test_list": ["assert True"]}
    usable = not isinstance(task_id, bool) and isinstance(task_id, (int, str)) and str(task_id).strip()
    if usable:
        assert convert_rows("src", [row], mbpp_example)[0].id == f"mbpp-{task_id}"
    else:
        with pytest.raises(DataError, match="task_id"):
            convert_rows("src", [row], mbpp_example)


# --------------------------------------------------------------------------- the answer parsers


@SETTINGS
@given(
    st.integers(2, len(LETTERS)).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))),
    st.text(),
    st.sampled_from(["reason_first", "answer_first"]),
)
@example((4, 1), "not answer C, the answer is D", "answer_first")
@example((4, 1), "Answer: C", "reason_first")
def test_what_mcq_response_writes_parse_mcq_reads(n_gold, reasoning, fmt):
    n, gold = n_gold
    choices = [f"option {i}" for i in range(n)]
    assert parse_mcq(mcq_response(reasoning, LETTERS[gold], fmt), choices) == LETTERS[gold]


@SETTINGS
@given(st.text(), st.lists(st.text(max_size=8), min_size=2, max_size=len(LETTERS)))
def test_parse_mcq_returns_a_valid_letter_or_none(text, choices):
    assert parse_mcq(text, choices) in (None, *LETTERS[: len(choices)])


code_lines = st.text(alphabet=string.ascii_letters + string.digits + " =+()[]:,'\"_\t#", max_size=30)


@SETTINGS
@given(st.lists(code_lines, min_size=1, max_size=6).map("\n".join))
def test_extract_code_reads_the_gold_code_block(code):
    assume(code.strip())
    ex = Example(id="x", benchmark="b", task="code", question="q", answer=code, tests=["assert True"])
    assert extract_code(gold_response(ex)) == code.strip() + "\n"


identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
json_args = st.dictionaries(identifiers, st.one_of(st.integers(), st.text(max_size=10), st.booleans()), max_size=3)


@SETTINGS
@given(identifiers, json_args)
def test_parse_react_reads_the_gold_action_and_input(action, args):
    action_input = json.dumps(args, sort_keys=True)
    ex = Example(
        id="x", benchmark="b", task="tool", question="q", answer=action, tools="doc", action_input=action_input
    )
    assert parse_react(gold_response(ex)) == (action, action_input)


@SETTINGS
@given(st.text())
def test_parsers_take_any_text(text):
    assert isinstance(extract_code(text), str)
    name, raw = parse_react(text)
    assert name is None or isinstance(name, str)
    assert raw is None or isinstance(raw, str)
