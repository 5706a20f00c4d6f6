"""One `Example` schema for every benchmark, and JSONL reading that names bad rows."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unisd.data.suites import TaskType

LETTERS = "ABCDEFGHIJ"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


class Example(BaseModel):
    """A benchmark item in one shape for prompts, training and scoring.

    mcq:  `choices` in display order, `answer` the gold letter, `rationale` optional.
    code: `answer` the reference solution, `tests` assert lines (or a HumanEval `check`
          program with `entry_point`), `code_prompt` a signature to complete (HumanEval).
    tool: `tools` the API documentation, `answer` the gold action name, `action_input`
          its JSON arguments.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    benchmark: str
    task: TaskType
    question: str = Field(min_length=1)
    context: str = ""
    choices: list[str] = Field(default_factory=list)
    answer: str = Field(min_length=1)
    rationale: str = ""
    tests: list[str] = Field(default_factory=list)
    test_setup: str = ""
    entry_point: str = ""
    code_prompt: str = ""
    tools: str = ""
    action_input: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Example:
        if self.task == "mcq":
            if not 2 <= len(self.choices) <= len(LETTERS):
                raise ValueError(f"mcq needs 2..{len(LETTERS)} choices, got {len(self.choices)}")
            if self.answer not in LETTERS[: len(self.choices)]:
                raise ValueError(f"answer {self.answer!r} is not one of the {len(self.choices)} option letters")
        elif self.task == "code" and not self.tests:
            raise ValueError("code example without tests")
        elif self.task == "code" and not all(test.strip() for test in self.tests):
            raise ValueError("a blank test: it would pass any code")
        elif self.task == "tool" and not self.tools:
            raise ValueError("tool example without tool documentation")
        return self

    @property
    def gold_index(self) -> int:
        return LETTERS.index(self.answer)


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    return [_parse_row(path, i, row, Example) for i, row in enumerate(iter_jsonl(path), start=1)]


def key_path(loc: tuple[Any, ...]) -> str:
    """A validation error's location as `a.b.0`; a key that is not a plain word is quoted
    (repr), so that a key holding a newline cannot break the one-line message."""
    return ".".join(str(p) if isinstance(p, int) or str(p).isidentifier() else repr(p) for p in loc)


def validation_problems(err: ValidationError) -> str:
    return "; ".join(f"{key_path(e['loc']) or 'row'}: {e['msg']}" for e in err.errors())


def _parse_row(path: Path, lineno: int, row: Any, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(row)
    except ValidationError as err:
        raise DataError(f"{path}: row {lineno}: {validation_problems(err)}") from None


def not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    """Where `raw` stops being UTF-8: 'line L, column C: byte 0xNN is not UTF-8' (no line
    for one line of text, e.g. a JSONL row)."""
    column = err.start - raw.rfind(b"\n", 0, err.start)
    line = raw.count(b"\n", 0, err.start) + 1
    where = f"line {line}, column {column}" if b"\n" in raw.rstrip(b"\r\n") else f"column {column}"
    return f"{where}: byte 0x{raw[err.start]:02x} is not UTF-8"


def decode_utf8(raw: bytes, where: str) -> str:
    """`raw` as text, or a DataError naming `where` and the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: {not_utf8(raw, err)}") from None


def iter_jsonl(path: str | Path) -> Iterable[Any]:
    """Rows of a JSONL file; a line that is not UTF-8 or not JSON raises DataError with its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as fh:  # bytes: a bad byte is then reported with its row, not as a traceback
        for lineno, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, f"{path}: row {lineno}")
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: row {lineno}: not valid JSON ({err.msg})") from None


def write_jsonl(path: str | Path, rows: Iterable[BaseModel | dict[str, Any]]) -> int:
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for row in rows:
            data = row.model_dump(mode="json") if isinstance(row, BaseModel) else row
            fh.write(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n
