"""Prefect tasks: thin wrappers over the stage functions of `unisd.stages`."""
