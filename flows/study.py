"""Prefect entrypoints of the `compare` and `ablation` flows, for Prefect's own tools, e.g.
`prefect deploy flows/study.py:compare`. The flows are `unisd.orchestration.study`
(`unisd study` and `unisd serve` use them from there); this folder is not a package."""

from unisd.orchestration.study import ablation, compare

__all__ = ["ablation", "compare"]
