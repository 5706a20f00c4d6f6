"""Helpers that turn source rows into `Example`s, shared by every loader."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from unisd.data.schema import LETTERS, DataError, Example, validation_problems

Row = dict[str, Any]


def shuffled_mcq(key: str, correct: str, wrong: list[str]) -> tuple[list[str], str]:
    """Options in a per-example seeded order, and the gold letter."""
    options = [correct, *wrong]
    random.Random(key).shuffle(options)
    return options, LETTERS[options.index(correct)]


def clean_code(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n").rstrip() + "\n"


def text(row: Row, key: str) -> str:
    """A field that must be text (code, a prompt): None or a number is an error naming the field."""
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected text, got {type(value).__name__}")
    return value


def text_list(row: Row, key: str, optional: bool = False) -> list[str]:
    """A field that must be a list of strings (or, if `optional`, missing or null):
    `list()` would split a string into one-character items and a mapping into its keys."""
    value = row.get(key) if optional else row[key]
    if value is None and optional:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        got = type(value).__name__ if not isinstance(value, list) else "a list with non-text items"
        raise ValueError(f"{key}: expected a list of strings, got {got}")
    return list(value)


def row_id(row: Row, key: str) -> str:
    """A source id as text: a null or empty id would give several rows one id ('mbpp-None')."""
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ValueError(f"{key}: expected a non-empty id, got {value!r}")
    return str(value)


def _detail(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err}"
    if isinstance(err, ValidationError):
        return validation_problems(err)
    return str(err).splitlines()[0]


def convert_rows(
    source: str, rows: Iterable[Row], convert: Callable[[int, Row], Example | list[Example] | None]
) -> list[Example]:
    """Apply `convert` to each row; a row it cannot read is a DataError naming source and row.

    `convert` returns None for rows that are skipped on purpose (e.g. ScienceQA items
    with an image); those are not errors. A row that holds several examples (a
    ToolAlpaca API) gives a list. Two rows with one id are an error: predictions,
    contexts and negatives are matched to examples by id.
    """
    out: list[Example] = []
    first_row: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        try:
            ex = convert(i, row)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, ValidationError) as err:
            raise DataError(f"{source}: row {i}: {type(err).__name__}: {_detail(err)}") from None
        for example in ex if isinstance(ex, list) else [] if ex is None else [ex]:
            if (seen := first_row.setdefault(example.id, i)) != i:
                raise DataError(f"{source}: row {i}: id {example.id!r} is already the id of row {seen}")
            out.append(example)
    return out


def split_off(
    examples: list[Example], sizes: dict[str, int], seed: int, rest: str = "train"
) -> dict[str, list[Example]]:
    """Shuffle with `seed`, cut the named splits in order; what is left goes to `rest`."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name, n in sizes.items():
        if start + n > len(order):
            raise DataError(f"cannot cut {n} {name} examples: only {len(order) - start} left of {len(order)}")
        out[name] = order[start : start + n]
        start += n
    out[rest] = order[start:]
    return out


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order


def rotate_options(ex: Example, shift: int) -> Example:
    """The example with its options shifted cyclically: option i shows old option (i + shift) mod n.

    The gold moves from index g to (g − shift) mod n. A cyclic shift keeps the options'
    relative order (an "all of the above" stays after what it refers to, up to wrap-around).
    """
    n = len(ex.choices)
    choices = [ex.choices[(i + shift) % n] for i in range(n)]
    return ex.model_copy(update={"choices": choices, "answer": LETTERS[(ex.gold_index - shift) % n]})


def letter_blocks(key: str, n: int) -> Iterator[int]:
    """Endless gold indices for n-option items: blocks, each a seeded permutation of range(n).

    Any prefix of k items then holds every letter ⌊k/n⌋ or ⌊k/n⌋ + 1 times.
    """
    rng = random.Random(f"{key}/{n}")
    while True:
        block = list(range(n))
        rng.shuffle(block)
        yield from block


def balance_letters(examples: list[Example], key: str) -> list[Example]:
    """Rotate each MCQ's options so that its gold letter follows `letter_blocks(key, n)`.

    Items are grouped by their number of options n (ARC has 3–5), in split order, so
    every prefix of the list (eval.limit and train_set.limit take prefixes) is balanced
    within ±1 per letter in each group: a model that always answers one letter scores
    chance, not whatever the source's or a shuffle's imbalance gives. Other tasks pass through.
    """
    targets: dict[int, Iterator[int]] = {}
    out = []
    for ex in examples:
        if ex.task != "mcq":
            out.append(ex)
            continue
        n = len(ex.choices)
        target = next(targets.setdefault(n, letter_blocks(key, n)))
        out.append(rotate_options(ex, ex.gold_index - target))
    return out


def balanced_splits(splits: dict[str, list[Example]], benchmark: str, seed: int) -> dict[str, list[Example]]:
    """`balance_letters` on every split, with a sequence of its own per benchmark, split and seed."""
    return {name: balance_letters(examples, f"{benchmark}/{name}/{seed}") for name, examples in splits.items()}
