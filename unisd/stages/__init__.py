"""What every pipeline stage shares: where outputs live, how a stage logs and writes.

A stage is a plain function `(config, input paths) -> output path`, one per module of
this package (`unisd.stages.model`, ... `unisd.stages.train`), so that the code
version of a stage covers exactly the modules it runs (`unisd.registry`). It reads its
inputs from disk, writes its output directory atomically through `stage_output` (with
a manifest of digests, the cache key and the MLflow run that produced it) and logs a
nested MLflow run. The Prefect tasks and the `unisd` CLI (called by dvc.yaml) are thin
shells over these functions, both derived from `unisd.registry.STAGES`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisd.artifacts import atomic_dir, dir_digest, write_json_atomic, write_text_atomic
from unisd.config import Config, digest_json


@dataclass(frozen=True)
class Layout:
    """Where stage outputs live by default (the same paths dvc.yaml declares)."""

    cfg: Config

    @property
    def model(self) -> Path:
        return self.cfg.artifacts / "model"

    @property
    def data(self) -> Path:
        return self.cfg.artifacts / "data"

    @property
    def base_eval(self) -> Path:
        return self.cfg.artifacts / "eval" / "base"

    @property
    def base_metrics(self) -> Path:
        return self.cfg.metrics_dir / "base.json"

    @property
    def recipe_eval(self) -> Path:
        """The evaluation of the recipe's trained model (for `base`, a copy of the base's)."""
        return self.cfg.artifacts / "eval" / "recipes" / self.cfg.recipe

    @property
    def trained_metrics(self) -> Path:
        """The trained model's metrics, whatever the recipe (it is recorded inside): the
        same path in every DVC experiment, so `dvc metrics diff` and `dvc exp show` compare
        recipes. Every recipe's own copy stays in its evaluation folder (`recipe_eval`)."""
        return self.cfg.metrics_dir / "trained.json"

    @property
    def run(self) -> Path:
        """The recipe's folder: its contexts, negatives and rounds."""
        return self.cfg.artifacts / "runs" / self.cfg.recipe

    def round(self, index: int, step: str) -> Path:
        return self.run / f"round-{index}" / step

    def resume(self, key: str) -> Path:
        """Resumable state of the unfinished stage run with cache key `key` (a training
        round's checkpoint). It lives outside every stage output: `dvc repro` empties a
        stage's outputs before running it, and would take the checkpoint with them."""
        return self.cfg.artifacts / ".resume" / key[:16]


class _NullRun:
    run_id = model_id = None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


@dataclass
class StageContext:
    """Where a stage logs: a Tracker and parent run, or nowhere (tracker None)."""

    tracker: Any = None
    parent_run: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
        if self.tracker is None:
            yield _NullRun()
            return
        with self.tracker.stage(self.parent_run, name, params, self.tags, system_metrics=True) as run:
            yield run


def cache_key(stage: str, cfg: Config, inputs: Mapping[str, Path | None], extra: dict[str, Any] | None = None) -> str:
    """The cache key of a run of `stage` (`unisd.registry.StageSpec.key`)."""
    from unisd.registry import STAGES  # here, not at the top: the registry imports every stage module

    return STAGES[stage].key(cfg, inputs, extra)


def stage_code(stage: str) -> str:
    """The code version of `stage` (`unisd.registry.StageSpec.code`)."""
    from unisd.registry import STAGES

    return STAGES[stage].code


def lineage_file(cfg: Config, out: Path) -> Path:
    """Record naming the MLflow run that produced `out`. It lives in `<artifacts>/.lineage/`,
    outside every stage output, so outputs stay byte-identical whichever launcher made them."""
    out = Path(out).resolve()
    try:
        rel = out.relative_to(cfg.artifacts).as_posix()
    except ValueError:
        rel = digest_json(str(out))[:16]
    return cfg.artifacts / ".lineage" / f"{rel.replace('/', '__')}.json"


@contextlib.contextmanager
def stage_output(
    ctx: StageContext,
    run_name: str,
    stage: str,
    cfg: Config,
    inputs: Mapping[str, Path | None],
    out: Path,
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, Path]]:
    """A logged stage run writing `out` atomically: yields (MLflow run, scratch dir)."""
    meta = {"stage": stage, "cache_key": cache_key(stage, cfg, inputs, extra), "code_version": stage_code(stage)}
    with ctx.stage(run_name, params) as run:
        with atomic_dir(out, meta) as tmp:
            yield run, tmp
        write_json_atomic(
            lineage_file(cfg, out),
            {
                "mlflow_run_id": run.run_id,
                "mlflow_model_id": run.model_id,
                "stage": run_name,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


def log_read(run: Any, name: str, path: Path, context: str, n_rows: int) -> None:
    """Record in a stage's MLflow run that it reads `n_rows` rows of the JSON-lines file
    `path` in the role `context` (training, evaluation)."""
    run.log_dataset(name, path, dir_digest(path), context, n_rows)


def publish_metrics(out: Path, metrics_file: Path, recipe: str | None = None) -> dict[str, Any]:
    """Copy an evaluation's metrics to the metrics file DVC tracks (with the `recipe` that
    trained the model, if given), plus a per-benchmark CSV beside it (`<name>_scores.csv`)
    for `dvc plots`."""
    metrics = json.loads((out / "metrics.json").read_text())
    if recipe is not None:
        metrics["recipe"] = recipe
    write_json_atomic(metrics_file, metrics)
    rows = "".join(f"{b},{m['score']:.4f}\n" for b, m in metrics["benchmarks"].items())
    write_text_atomic(metrics_file.with_name(f"{metrics_file.stem}_scores.csv"), "benchmark,score\n" + rows)
    return metrics


def lineage(cfg: Config, out: Path) -> dict[str, Any]:
    """What `lineage_file` recorded about `out` (empty when nothing did, e.g. a local model
    folder, or an output made without tracking)."""
    path = lineage_file(cfg, out)
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_source_run(cfg: Config, out: Path) -> str | None:
    return lineage(cfg, out).get("mlflow_run_id")


def format_table(metrics: dict[str, Any]) -> str:
    """Per-benchmark table of a metrics.json, as printed at the end of a run."""
    head = f"{'benchmark':<16}{'n':>6}{'score':>9}{'gold_ppl':>10}{'ppl_ret':>10}{'unparsed':>10}"
    lines = [f"{metrics.get('label', '')} on {metrics.get('split', '')}", head, "-" * len(head)]
    for b, m in metrics["benchmarks"].items():
        lines.append(
            f"{b:<16}{m['n']:>6}{m['score']:>9.1f}{m.get('gold_ppl', float('nan')):>10.2f}"
            f"{m.get('ppl_ret', float('nan')):>10.2f}{m.get('unparseable', ''):>10}"
        )
    lines.append(f"{'overall':<16}{'':>6}{metrics['overall']:>9.1f}")
    return "\n".join(lines)
