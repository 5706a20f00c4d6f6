"""Prefect flows: wiring and fan-out over the tasks in `tasks/`."""
