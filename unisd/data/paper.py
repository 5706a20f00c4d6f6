"""The paper's suite, loaded by public dataset ids (needs a hub) or from local files.

A `data.sources.<benchmark>` override may name another hub id or a local folder that
holds `<split>.jsonl` (or `.json`) files in the hub's schema; the tests use such
fixture folders. Splits without a public source (validation of CoS-E and ToolAlpaca)
are carved from train with the split seed. Every split's MCQ gold letters are then
balanced by rotating options (`balanced_splits`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unisd.data.convert import (
    Row,
    balanced_splits,
    clean_code,
    convert_rows,
    row_id,
    shuffled,
    shuffled_mcq,
    split_off,
    text,
    text_list,
)
from unisd.data.schema import DataError, Example, decode_utf8, iter_jsonl

TOOLALPACA_RAW = "https://raw.githubusercontent.com/tangqiaoyu/ToolAlpaca/main/data/"


@dataclass(frozen=True)
class Source:
    dataset: str  # hub id, or a URL of a JSON file
    config: str | None
    split: str


SOURCES: dict[str, dict[str, Source]] = {
    "scienceqa": {s: Source("derek-thomas/ScienceQA", None, s) for s in ("train", "validation", "test")},
    "gpqa": {"test": Source("Idavidrein/gpqa", "gpqa_main", "train")},
    "cos_e": {
        "train": Source("Salesforce/cos_e", "v1.11", "train"),
        "test": Source("Salesforce/cos_e", "v1.11", "validation"),
    },
    "mbpp": {
        "train": Source("google-research-datasets/mbpp", "full", "train"),
        "validation": Source("google-research-datasets/mbpp", "full", "validation"),
        "test": Source("google-research-datasets/mbpp", "sanitized", "test"),
    },
    "humaneval": {"test": Source("openai/openai_humaneval", None, "test")},
    "toolalpaca": {
        "train": Source(TOOLALPACA_RAW + "train_data.json", None, "train"),
        "test": Source(TOOLALPACA_RAW + "eval_simulated.json", None, "train"),
    },
}

VALIDATION_CARVE = 200  # at most this many train examples become validation when none is published


def scienceqa_example(i: int, row: Row, split: str) -> Example | None:
    if row.get("image"):
        return None  # the paper uses the text-only examples
    ex_id = f"scienceqa-{split}-{i:05d}"
    choices = text_list(row, "choices")
    gold = choices[int(row["answer"])]
    options, answer = shuffled_mcq(ex_id, gold, [c for k, c in enumerate(choices) if k != int(row["answer"])])
    context = "\n".join(x for x in (row.get("hint") or "", row.get("lecture") or "") if x.strip())
    return Example(
        id=ex_id,
        benchmark="scienceqa",
        task="mcq",
        question=row["question"],
        context=context,
        choices=options,
        answer=answer,
        rationale=row.get("solution") or "",
    )


def gpqa_example(i: int, row: Row, split: str) -> Example:
    ex_id = f"gpqa-{row.get('Record ID') or i}"
    wrong = [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
    options, answer = shuffled_mcq(ex_id, row["Correct Answer"].strip(), wrong)
    return Example(
        id=ex_id,
        benchmark="gpqa",
        task="mcq",
        question=row["Question"].strip(),
        choices=options,
        answer=answer,
        rationale=row.get("Explanation") or "",
    )


def cos_e_example(i: int, row: Row, split: str) -> Example:
    choices = text_list(row, "choices")
    ex_id = f"cos_e-{row_id(row, 'id')}"
    options, answer = shuffled_mcq(ex_id, row["answer"], [c for c in choices if c != row["answer"]])
    if len(options) != len(choices):
        raise ValueError(f"answer {row['answer']!r} is not one of the choices")
    return Example(
        id=ex_id,
        benchmark="cos_e",
        task="mcq",
        question=row["question"],
        choices=options,
        answer=answer,
        rationale=row.get("abstractive_explanation") or "",
    )


def mbpp_example(i: int, row: Row, split: str) -> Example:
    # "full" rows have text/test_setup_code; "sanitized" rows have prompt/test_imports.
    setup = row.get("test_setup_code") or "\n".join(text_list(row, "test_imports", optional=True))
    return Example(
        id=f"mbpp-{row_id(row, 'task_id')}",
        benchmark="mbpp",
        task="code",
        question=row.get("text") or row["prompt"],
        answer=clean_code(text(row, "code")),
        tests=text_list(row, "test_list"),
        test_setup=setup,
    )


def humaneval_example(i: int, row: Row, split: str) -> Example:
    return Example(
        id=row_id(row, "task_id").replace("/", "-"),
        benchmark="humaneval",
        task="code",
        question=row["prompt"],
        code_prompt=row["prompt"],
        answer=clean_code(text(row, "prompt") + text(row, "canonical_solution")),
        tests=[row["test"]],
        entry_point=row["entry_point"],
    )


def toolalpaca_examples(source: str, apis: list[Row], split: str) -> list[Example]:
    """One example per (API, instruction): the first gold ReAct action and its input.

    Accepts the repository's evaluation format (`Instructions` + `Golden_Answers`) and
    its training format (`Instances` with `intermediate_steps`). As in the repository's
    build_dataset.py, training runs without any step are skipped and a trailing "Hint:"
    line is cut from the input. Runs that start with the `getDetails` meta-tool are
    skipped too: it is not in the API documentation, and the later arguments come from
    the user's reply. A malformed API entry is a DataError naming its place in the list.
    """

    def first_calls(api: Row) -> list[tuple[str, str, str]]:
        """(instruction, action, action input) of each usable item."""
        if "Instances" not in api:
            return [
                (instruction, gold[0]["Action"], gold[0]["Action_Input"])
                for instruction, gold in zip(api["Instructions"], api["Golden_Answers"], strict=True)
            ]
        calls = []
        for run in api["Instances"]:
            if run.get("intermediate_steps"):
                (action, action_input, *_), _observation = run["intermediate_steps"][0]
                if action != "getDetails":
                    calls.append((run["input"].rsplit("\nHint: ", 1)[0], action, action_input))
        return calls

    def convert(i: int, api: Row) -> list[Example]:
        tools = f"{api['Name']}: {api.get('Description', '')}\n{api['NLDocumentation']}".strip()
        return [
            Example(
                id=f"toolalpaca-{split}-{i:04d}-{j:02d}",
                benchmark="toolalpaca",
                task="tool",
                question=instruction,
                tools=tools,
                answer=action,
                action_input=_canonical_json(action_input),
                meta={"api": api["Name"]},
            )
            for j, (instruction, action, action_input) in enumerate(first_calls(api), start=1)
        ]

    return convert_rows(source, apis, convert)


def _canonical_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        return text.strip()


CONVERTERS: dict[str, Callable[[int, Row, str], Example | None]] = {
    "scienceqa": scienceqa_example,
    "gpqa": gpqa_example,
    "cos_e": cos_e_example,
    "mbpp": mbpp_example,
    "humaneval": humaneval_example,
}


def _read_local(folder: Path, split: str) -> tuple[str, list[Any]]:
    lines, whole = folder / f"{split}.jsonl", folder / f"{split}.json"
    if lines.is_file():
        return str(lines), list(iter_jsonl(lines))
    if not whole.is_file():
        raise DataError(f"{folder}: no {split}.jsonl or {split}.json")
    try:
        rows = json.loads(decode_utf8(whole.read_bytes(), str(whole)))
    except json.JSONDecodeError as err:
        raise DataError(f"{whole}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{whole}: expected a JSON list of rows, got {type(rows).__name__}")
    return str(whole), rows


def _read_hub(src: Source) -> tuple[str, list[Any]]:
    from datasets import load_dataset

    if src.dataset.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(src.dataset, timeout=60) as resp:  # noqa: S310 - fixed public URL
            return src.dataset, json.loads(resp.read())
    ds = load_dataset(src.dataset, src.config, split=src.split)
    return f"{src.dataset}:{src.config or 'default'}:{src.split}", list(ds)


def load_paper(name: str, seed: int, override: str | None = None) -> dict[str, list[Example]]:
    """The splits of one paper benchmark; `override` is a hub id or a local folder."""
    splits: dict[str, list[Example]] = {}
    for split, src in SOURCES[name].items():
        if override and Path(override).is_dir():
            where, rows = _read_local(Path(override), split)
        else:
            where, rows = _read_hub(Source(override, src.config, src.split) if override else src)
        if name == "toolalpaca":
            splits[split] = toolalpaca_examples(where, rows, split)
        else:
            convert = CONVERTERS[name]
            splits[split] = convert_rows(where, rows, lambda i, r, s=split: convert(i, r, s))  # type: ignore[misc]  # noqa: B023 - used in this iteration
    if "train" in splits and "validation" not in splits:
        n_val = min(VALIDATION_CARVE, len(splits["train"]) // 10 or 1)
        splits.update(split_off(splits["train"], {"validation": n_val}, seed))
    return balanced_splits({k: shuffled(v, seed) for k, v in splits.items()}, name, seed)
