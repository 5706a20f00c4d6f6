"""Helpers that turn source rows into `Example`s, shared by every loader."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from unisd.data.schema import LETTERS, DataError, Example

Row = dict[str, Any]


def shuffled_mcq(key: str, correct: str, wrong: list[str]) -> tuple[list[str], str]:
    """Options in a per-example seeded order, and the gold letter."""
    options = [correct, *wrong]
    random.Random(key).shuffle(options)
    return options, LETTERS[options.index(correct)]


def clean_code(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n").rstrip() + "\n"


def convert_rows(source: str, rows: Iterable[Row],
                 convert: Callable[[int, Row], Example | list[Example] | None]) -> list[Example]:
    """Apply `convert` to each row; a row it cannot read is a DataError naming source and row.

    `convert` returns None for rows that are skipped on purpose (e.g. ScienceQA items
    with an image); those are not errors. A row that holds several examples (a
    ToolAlpaca API) gives a list.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            ex = convert(i, row)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, ValidationError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
            raise DataError(f"{source}: row {i}: {type(err).__name__}: {detail}") from None
        if isinstance(ex, list):
            out.extend(ex)
        elif ex is not None:
            out.append(ex)
    return out


def split_off(examples: list[Example], sizes: dict[str, int], seed: int, rest: str = "train") -> dict[str, list[Example]]:
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
