"""A study's runs read from disk and checked against each other.

Every number the report shows comes from here: an evaluation folder's `metrics.json`
and `predictions/<benchmark>.jsonl`, a run's training curves and its filter stats. Point
scores are metrics.json's, and the per-example predictions must reproduce every accuracy
metrics.json states (stale or mixed folders are an error, not a footnote). Metrics that
older evaluations did not write (rotation-invariant accuracy, log-likelihood accuracy,
parse and finish rates, ...) are optional: a run without them simply has none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unisd.data.suites import SUITES
from unisd.recipes import BASELINES, COMPONENTS

BASELINE_LABELS = tuple(b for b in BASELINES if b != "base")
GENERATIVE = "score"
# metrics.json's per-benchmark accuracy (%) -> the per-example field of predictions/<benchmark>.jsonl
OUTCOMES = {
    GENERATIVE: "correct",
    "rot_acc": "rot_correct",
    "circular_acc": "circular_correct",
    "ll_acc": "ll_correct",
    "ll_norm_acc": "ll_norm_correct",
}
# metrics.json's aggregates: (task whose benchmarks it averages, None for all; the per-benchmark metric)
AGGREGATES = {
    "overall": (None, GENERATIVE),
    "mcq_overall": ("mcq", GENERATIVE),
    "mcq_rot_overall": ("mcq", "rot_acc"),
    "code_overall": ("code", GENERATIVE),
}
TASKS = {b.name: b.task for suite in SUITES.values() for b in suite.benchmarks}


class ReportError(ValueError):
    """The study's files are missing or disagree with each other."""


def infer_kind(label: str) -> str:
    """The role of a recipe label in the study, when the study does not say."""
    if label == "base":
        return "base"
    if label in BASELINE_LABELS:
        return "baseline"
    if label == "unisd-full":
        return "full"
    if label in COMPONENTS:
        return "component"
    return "sd" if label == "sd" else "other"


def task_of(benchmark: str) -> str:
    """mcq, code or tool: what a benchmark's score measures, from the suites' registry."""
    if benchmark not in TASKS:
        raise ReportError(f"unknown benchmark {benchmark!r} (not in any suite of unisd.data.suites)")
    return TASKS[benchmark]


Outcomes = dict[str, dict[str, float]]  # benchmark -> example id -> credit in [0, 1] (a bool, or a tie's share)


@dataclass
class Run:
    name: str
    label: str
    kind: str
    seed: int | None
    components: list[str]
    metrics: dict[str, Any]
    outcomes: dict[str, Outcomes]  # metric (a key of OUTCOMES) -> the benchmarks that have it
    curves: list[dict[str, float]] = field(default_factory=list)
    filter_stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def benchmarks(self) -> list[str]:
        return list(self.metrics["benchmarks"])

    @property
    def correct(self) -> Outcomes:
        """Generative correctness (accuracy of the parsed answer, pass@1), every benchmark."""
        return self.outcomes[GENERATIVE]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _paths(value: Any) -> list[Path]:
    """None, one path or a list of paths (one per round)."""
    if value is None:
        return []
    return [Path(v) for v in value] if isinstance(value, (list, tuple)) else [Path(value)]


def _load_curves(paths: list[Path]) -> list[dict[str, float]]:
    """Rounds' curves end to end, steps counted across rounds."""
    points, offset = [], 0
    for path in paths:
        rows = _read_jsonl(path)
        points += [{**r, "step": r["step"] + offset} for r in rows]
        offset += rows[-1]["step"] if rows else 0
    return points


def _outcomes(name: str, metrics: dict[str, Any], eval_dir: Path) -> dict[str, Outcomes]:
    """Per metric that metrics.json states for a benchmark, that benchmark's per-example outcomes."""
    out: dict[str, Outcomes] = {}
    for bench, m in metrics["benchmarks"].items():
        records = _read_jsonl(eval_dir / "predictions" / f"{bench}.jsonl")
        for metric, key in OUTCOMES.items():
            if m.get(metric) is None:
                continue
            if any(key not in r for r in records):
                raise ReportError(f"{name}/{bench}: metrics.json has {metric} but predictions lack {key}")
            out.setdefault(metric, {})[bench] = {r["id"]: float(r[key]) for r in records}
    return out


def _check(name: str, metrics: dict[str, Any], outcomes: dict[str, Outcomes]) -> None:
    """The predictions must reproduce metrics.json, or the folder is stale or mixed."""
    benchmarks = metrics["benchmarks"]
    for metric, per_bench in outcomes.items():
        for bench, rows in per_bench.items():
            if not rows:
                raise ReportError(f"{name}/{bench}: no evaluated examples")
            value, stated = 100.0 * sum(rows.values()) / len(rows), benchmarks[bench][metric]
            if len(rows) != benchmarks[bench]["n"] or not math.isclose(value, stated, abs_tol=1e-6):
                raise ReportError(
                    f"{name}/{bench}: predictions give n={len(rows)}, {metric}={value} "
                    f"but metrics.json says n={benchmarks[bench]['n']}, {metric}={stated}"
                )
    for key, (task, metric) in AGGREGATES.items():
        if metrics.get(key) is None or math.isnan(metrics[key]):  # not stated, or no such benchmark
            continue
        values = [
            m[metric]
            for b, m in benchmarks.items()
            if (task is None or task_of(b) == task) and m.get(metric) is not None and not math.isnan(m[metric])
        ]
        if not values or not math.isclose(float(np.mean(values)), metrics[key], abs_tol=1e-6):
            raise ReportError(
                f"{name}: {key} {metrics[key]} is not the mean of the {task or 'all'} benchmarks' {metric} ({values})"
            )


def load_run(name: str, spec: dict[str, Any]) -> Run:
    """A run's metrics, per-example outcomes, curves and filter stats, checked for consistency."""
    eval_dir = Path(spec["eval_dir"])
    if not (eval_dir / "metrics.json").is_file():
        raise ReportError(f"{name}: no metrics.json in {eval_dir}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    outcomes = _outcomes(name, metrics, eval_dir)
    _check(name, metrics, outcomes)
    label = spec.get("label", name)
    return Run(
        name=name,
        label=label,
        kind=spec.get("kind") or infer_kind(label),
        seed=spec.get("seed"),
        components=list(spec.get("components") or [label]),
        metrics=metrics,
        outcomes=outcomes,
        curves=_load_curves(_paths(spec.get("curves"))),
        filter_stats=[json.loads(p.read_text()) for p in _paths(spec.get("filter_stats"))],
    )


@dataclass
class Study:
    info: dict[str, Any]
    runs: list[Run]

    @property
    def stats_kw(self) -> dict[str, Any]:
        return {
            "n_boot": self.info.get("n_boot", 10000),
            "seed": self.info.get("stats_seed", 0),
            "level": self.info.get("level", 0.95),
        }

    @property
    def paired_kw(self) -> dict[str, Any]:
        return {**self.stats_kw, "n_perm": self.stats_kw["n_boot"]}

    @property
    def benchmarks(self) -> list[str]:
        return self.runs[0].benchmarks

    def of_task(self, task: str) -> list[str]:
        return [b for b in self.benchmarks if task_of(b) == task]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(task_of(b) for b in self.benchmarks))

    @property
    def split(self) -> str:
        """The evaluated split, as the metrics files name it."""
        return self.runs[0].metrics.get("split") or self.info.get("split", "evaluation")

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.runs))

    def of_kind(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]

    def labelled(self, label: str) -> list[Run]:
        return [r for r in self.runs if r.label == label]

    def partner(self, candidates: list[Run], seed: int | None) -> Run | None:
        """The candidate with this seed, else the first candidate."""
        return next((r for r in candidates if r.seed == seed), candidates[0] if candidates else None)


def load_study(study: dict[str, Any]) -> Study:
    """The study's runs, loaded and checked to share one set of benchmarks and one split."""
    runs = [load_run(name, spec) for name, spec in study["models"].items()]
    if not runs:
        raise ReportError("the study has no models")
    for run in runs[1:]:
        if run.benchmarks != runs[0].benchmarks:
            raise ReportError(f"{run.name} was evaluated on {run.benchmarks}, {runs[0].name} on {runs[0].benchmarks}")
        if run.metrics.get("split") != runs[0].metrics.get("split"):
            raise ReportError(
                f"{run.name} was evaluated on the {run.metrics.get('split')} split, "
                f"{runs[0].name} on the {runs[0].metrics.get('split')} split"
            )
    return Study({k: v for k, v in study.items() if k != "models"}, runs)
