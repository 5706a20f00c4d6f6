"""Pipeline stages: plain functions `(config, input paths) -> output path`.

Each stage reads its inputs from disk, writes its output directory atomically (with a
manifest of digests and the MLflow run that produced it) and logs a nested MLflow run.
The Prefect tasks and the `unisd` CLI (called by dvc.yaml) are thin shells over these.
`STAGES` says which param sections and inputs each stage depends on: that is its cache
key, the same things dvc.yaml lists as its params and deps.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from unisd.artifacts import atomic_dir, code_version, dir_digest, read_manifest, write_json_atomic, write_text_atomic
from unisd.config import Config, digest_json
from unisd.data.schema import read_examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    sections: tuple[str, ...]  # param sections the output depends on
    inputs: tuple[str, ...]  # upstream stage outputs it reads


STAGES = {
    "model": StageSpec(("model",), ()),
    "prepare": StageSpec(("data",), ()),
    "evaluate": StageSpec(("model", "data", "prompts", "eval"), ("model", "data", "base")),
}


def cache_key(stage: str, cfg: Config, inputs: dict[str, Path]) -> str:
    """Content key of a stage run: code version, its param sections, its inputs' digests."""
    spec = STAGES[stage]
    return digest_json({
        "stage": stage, "code": code_version(), "params": cfg.section(*spec.sections),
        "inputs": {k: dir_digest(p) for k, p in sorted(inputs.items())},
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

    def eval(self, label: str) -> Path:
        return self.cfg.artifacts / "eval" / label

    def metrics(self, label: str) -> Path:
        return self.cfg.metrics_dir / f"{label}.json"

    def scores_plot(self, label: str) -> Path:
        return self.cfg.metrics_dir / f"{label}_scores.csv"


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


def _meta(stage: str, run: Any, key: str) -> dict[str, Any]:
    return {"stage": stage, "mlflow_run_id": run.run_id, "cache_key": key, "code_version": code_version()}


def model_stage(cfg: Config, out: Path, ctx: StageContext) -> Path:
    """Make the configured model loadable from disk (embedded GGUF → safetensors)."""
    from unisd.assets import materialize_model

    key = cache_key("model", cfg, {})
    with ctx.stage("model", cfg.section("model")) as run, atomic_dir(out, _meta("model", run, key)) as tmp:
        source = materialize_model(cfg.model.name, cfg.model.revision, tmp)
        run.set_tags({f"model.{k}": v for k, v in source.items() if isinstance(v, str)})
        run.log_artifacts(tmp / "source.json")
    return out


def prepare_stage(cfg: Config, out: Path, ctx: StageContext) -> Path:
    """Load each benchmark, split it deterministically, write `<benchmark>/<split>.jsonl`."""
    from unisd.data import SUITES, load_benchmark, write_jsonl

    key = cache_key("prepare", cfg, {})
    suite = SUITES[cfg.data.suite]
    splits: dict[str, dict[str, Any]] = {}
    with ctx.stage("prepare", cfg.section("data")) as run, atomic_dir(out, _meta("prepare", run, key)) as tmp:
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
    """Evaluate a model on the configured split; also writes `metrics/<label>.json`."""
    from unisd.evaluate import evaluate_model

    inputs = {"model": model, "data": data, **({"base": base} if base else {})}
    key = cache_key("evaluate", cfg, inputs)
    params = {**cfg.section("eval", "prompts"), "label": label}
    with ctx.stage(f"evaluate-{label}", params) as run, atomic_dir(out, _meta("evaluate", run, key)) as tmp:
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
    publish_metrics(cfg, label, out)
    return out


def publish_metrics(cfg: Config, label: str, out: Path) -> dict[str, Any]:
    """Copy an evaluation's metrics to `metrics/<label>.json` (+ a CSV for plots), for DVC."""
    layout = Layout(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    write_json_atomic(layout.metrics(label), metrics)
    rows = "".join(f"{b},{m['score']:.4f}\n" for b, m in metrics["benchmarks"].items())
    write_text_atomic(layout.scores_plot(label), "benchmark,score\n" + rows)
    return metrics


def stage_source_run(out: Path) -> str | None:
    manifest = read_manifest(out)
    return manifest["meta"].get("mlflow_run_id") if manifest else None


def format_table(metrics: dict[str, Any]) -> str:
    """Per-benchmark table of a metrics.json, as printed at the end of a run."""
    head = f"{'benchmark':<16}{'n':>6}{'score':>9}{'gold_ppl':>10}{'ppl_ret':>10}{'unparsed':>10}"
    lines = [f"{metrics.get('label', '')} on {metrics.get('split', '')}", head, "-" * len(head)]
    for b, m in metrics["benchmarks"].items():
        lines.append(f"{b:<16}{m['n']:>6}{m['score']:>9.1f}{m.get('gold_ppl', float('nan')):>10.2f}"
                     f"{m.get('ppl_ret', float('nan')):>10.2f}{m.get('unparseable', ''):>10}")
    lines.append(f"{'overall':<16}{'':>6}{metrics['overall']:>9.1f}")
    return "\n".join(lines)
