"""Prefect entrypoint of the `pipeline` flow, for Prefect's own tools, e.g.
`prefect deploy flows/pipeline.py:pipeline`. The flow is `unisd.orchestration.pipeline`
(`unisd run` and `unisd serve` use it from there); this folder is not a package."""

from unisd.orchestration.pipeline import pipeline

__all__ = ["pipeline"]
