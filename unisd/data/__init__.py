"""Benchmark data: one `Example` schema, loaders per suite, deterministic splits."""

from __future__ import annotations

from unisd.data.schema import DataError, Example, read_examples, write_jsonl
from unisd.data.suites import SPLITS, SUITES

__all__ = ["DataError", "Example", "SPLITS", "SUITES", "load_benchmark", "read_examples", "write_jsonl"]


def load_benchmark(suite: str, name: str, seed: int, source: str | None = None) -> dict[str, list[Example]]:
    """All available splits of one benchmark, each a list in a seeded order and none
    empty: an empty test split would be scored NaN and an empty train split train nothing."""
    if suite == "embedded":
        from unisd.data.embedded import load_embedded

        splits = load_embedded(name, seed)
    else:
        from unisd.data.paper import load_paper

        splits = load_paper(name, seed, source)
    for split, examples in splits.items():
        if not examples:
            raise DataError(f"{source or f'the {suite} suite'}: the {split} split of {name} has no examples")
    return splits
