"""Pipeline stages: plain functions `(config, input paths) -> output path`.

Each stage reads its inputs from disk, writes its output directory atomically (with a
manifest of digests and the MLflow run that produced it) and logs a nested MLflow run.
The Prefect tasks and the `unisd` CLI (called by dvc.yaml) are thin shells over these.
`STAGE_PARAMS` says which params each stage depends on; with the digests of its input
directories and the code version that is its cache key (dvc.yaml lists the same
things, at the granularity of params.yaml sections, as params and deps).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from unisd.artifacts import atomic_dir, code_version, dir_digest, write_json_atomic, write_text_atomic
from unisd.config import Config, digest_json
from unisd.data.schema import read_examples

log = logging.getLogger(__name__)


def _method(cfg: Config, *fields: str) -> dict[str, Any]:
    data = cfg.method.model_dump(mode="json")
    return {f: data[f] for f in fields}


STAGE_PARAMS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "model": lambda c: c.section("model"),
    "prepare": lambda c: c.section("data"),
    "contexts": lambda c: {**c.section("model", "prompts", "train_set"), **_method(c, "agreement"),
                           "seed": c.run.seed},
    "negatives": lambda c: {**c.section("model", "prompts", "train_set", "generation", "eval"),
                            **_method(c, "contrastive"), "seed": c.run.seed},
    "generate": lambda c: {**c.section("model", "prompts", "train_set", "generation"),
                           **_method(c, "loss", "data", "on_policy_fraction", "sample_temperature", "sample_top_p", "gold_mix"),
                           "seed": c.run.seed},
    "filter": lambda c: {**c.section("model", "prompts", "train_set", "generation", "train"),
                         **_method(c, "agreement", "teacher")},
    "train": lambda c: {**c.section("model", "prompts", "train"), "method": c.method.model_dump(mode="json"),
                        "seed": c.run.seed},
    "evaluate": lambda c: c.section("model", "data", "prompts", "eval"),
}


def stage_code(stage: str) -> str:
    """Version of the code a stage runs: the module defining it and what that imports."""
    return code_version("unisd.stages" if stage in ("model", "prepare", "evaluate") else "unisd.distill")


def cache_key(stage: str, cfg: Config, inputs: dict[str, Path], extra: dict[str, Any] | None = None) -> str:
    """Content key of a stage run: code version, its params, its inputs' digests."""
    return digest_json({
        "stage": stage, "code": stage_code(stage), "params": STAGE_PARAMS[stage](cfg), "extra": extra or {},
        "inputs": {k: dir_digest(p) for k, p in sorted(inputs.items()) if p is not None},
    })


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
    def recipe_metrics(self) -> Path:
        return self.cfg.metrics_dir / "recipes" / f"{self.cfg.recipe}.json"

    @property
    def run(self) -> Path:
        """The recipe's folder: its contexts, negatives and rounds."""
        return self.cfg.artifacts / "runs" / self.cfg.recipe

    def round(self, index: int, step: str) -> Path:
        return self.run / f"round-{index}" / step


class _NullRun:
    run_id = None

    def __getattr__(self, name: str):
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
        with self.tracker.stage(self.parent_run, name, params, self.tags) as run:
            yield run


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
def stage_output(ctx: StageContext, run_name: str, stage: str, cfg: Config, inputs: dict[str, Path], out: Path,
                 params: dict[str, Any], extra: dict[str, Any] | None = None) -> Iterator[tuple[Any, Path]]:
    """A logged stage run writing `out` atomically: yields (MLflow run, scratch dir)."""
    meta = {"stage": stage, "cache_key": cache_key(stage, cfg, inputs, extra), "code_version": stage_code(stage)}
    with ctx.stage(run_name, params) as run:
        with atomic_dir(out, meta) as tmp:
            yield run, tmp
        write_json_atomic(lineage_file(cfg, out), {"mlflow_run_id": run.run_id, "stage": run_name,
                                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def model_stage(cfg: Config, out: Path, ctx: StageContext) -> Path:
    """Make the configured model loadable from disk (embedded GGUF → safetensors)."""
    from unisd.assets import materialize_model

    with stage_output(ctx, "model", "model", cfg, {}, out, cfg.section("model")) as (run, tmp):
        source = materialize_model(cfg.model.name, cfg.model.revision, tmp)
        run.set_tags({f"model.{k}": v for k, v in source.items() if isinstance(v, str)})
        run.log_artifacts(tmp / "source.json")
    return out


def prepare_stage(cfg: Config, out: Path, ctx: StageContext) -> Path:
    """Load each benchmark, split it deterministically, write `<benchmark>/<split>.jsonl`."""
    from unisd.data import SUITES, load_benchmark, write_jsonl

    suite = SUITES[cfg.data.suite]
    splits: dict[str, dict[str, Any]] = {}
    with stage_output(ctx, "prepare", "prepare", cfg, {}, out, cfg.section("data")) as (run, tmp):
        for name in cfg.data.benchmarks:
            log.info("prepare: loading %s", name)
            bench = suite[name]
            parts = load_benchmark(cfg.data.suite, name, cfg.data.split_seed, cfg.data.sources.get(name))
            (tmp / name).mkdir()
            for split, examples in sorted(parts.items()):
                path = tmp / name / f"{split}.jsonl"
                write_jsonl(path, examples)
                digest = dir_digest(path)
                splits.setdefault(name, {})[split] = {"n": len(examples), "sha256": digest}
                run.log_dataset(f"{name}/{split}", digest, cfg.data.sources.get(name) or bench.source,
                                context=split, n_rows=len(examples))
            splits[name]["_source"] = {"source": cfg.data.sources.get(name) or bench.source,
                                       "license": bench.license, "task": bench.task}
        write_json_atomic(tmp / "splits.json", splits)
        run.log_artifacts(tmp / "splits.json")
        run.log_metrics({f"{b}.{s}.n": v["n"] for b, d in splits.items() for s, v in d.items() if s != "_source"})
    return out


def evaluate_stage(cfg: Config, model: Path, data: Path, out: Path, ctx: StageContext, label: str = "base",
                   base: Path | None = None) -> Path:
    """Evaluate a model on the configured split: predictions and metrics.json in `out`."""
    from unisd.evaluate import evaluate_model

    inputs = {"model": model, "data": data, "base": base}
    params = {**cfg.section("eval", "prompts"), "label": label}
    extra = {"label": label}
    with stage_output(ctx, f"evaluate-{label}", "evaluate", cfg, inputs, out, params, extra) as (run, tmp):
        splits = (data / "splits.json")
        for bench in cfg.data.benchmarks:
            examples = read_examples(data / bench / f"{cfg.eval.split}.jsonl")
            n = min(len(examples), cfg.eval.limit or len(examples))
            run.log_dataset(f"{bench}/{cfg.eval.split}", dir_digest(data / bench / f"{cfg.eval.split}.jsonl"),
                            str(splits), context="evaluation", n_rows=n)
        metrics = evaluate_model(cfg, model, data, tmp, base_dir=base)
        metrics.update(label=label, model_digest=dir_digest(model))
        write_json_atomic(tmp / "metrics.json", metrics)
        run.log_metrics(metrics)
        run.log_artifacts(tmp / "predictions", "predictions")
        run.log_artifacts(tmp / "metrics.json")
    return out


def publish_metrics(out: Path, metrics_file: Path) -> dict[str, Any]:
    """Copy an evaluation's metrics to the metrics file DVC tracks, plus a per-benchmark
    CSV beside it (`<name>_scores.csv`) for `dvc plots`."""
    metrics = json.loads((out / "metrics.json").read_text())
    write_json_atomic(metrics_file, metrics)
    rows = "".join(f"{b},{m['score']:.4f}\n" for b, m in metrics["benchmarks"].items())
    write_text_atomic(metrics_file.with_name(f"{metrics_file.stem}_scores.csv"), "benchmark,score\n" + rows)
    return metrics


def stage_source_run(cfg: Config, out: Path) -> str | None:
    path = lineage_file(cfg, out)
    return json.loads(path.read_text()).get("mlflow_run_id") if path.is_file() else None


def format_table(metrics: dict[str, Any]) -> str:
    """Per-benchmark table of a metrics.json, as printed at the end of a run."""
    head = f"{'benchmark':<16}{'n':>6}{'score':>9}{'gold_ppl':>10}{'ppl_ret':>10}{'unparsed':>10}"
    lines = [f"{metrics.get('label', '')} on {metrics.get('split', '')}", head, "-" * len(head)]
    for b, m in metrics["benchmarks"].items():
        lines.append(f"{b:<16}{m['n']:>6}{m['score']:>9.1f}{m.get('gold_ppl', float('nan')):>10.2f}"
                     f"{m.get('ppl_ret', float('nan')):>10.2f}{m.get('unparseable', ''):>10}")
    lines.append(f"{'overall':<16}{'':>6}{metrics['overall']:>9.1f}")
    return "\n".join(lines)
