"""One empty, migrated MLflow database per test session, copied where a test needs one:
creating a database runs every schema migration, seconds on two busy cores."""

from __future__ import annotations

import shutil
from pathlib import Path

_template: list[Path] = []


def empty_mlflow_db(tmp_path_factory, dest: Path) -> Path:
    """Copy the session's empty MLflow database (made on first use) to `dest`."""
    if not _template:
        from mlflow import MlflowClient

        db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the schema
        _template.append(db)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template[0], dest)
    return dest
