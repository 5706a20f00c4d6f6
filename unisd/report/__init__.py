"""The study report: the headline with paired gains, MCQ and code tables, flips,
ablations, drift, training diagnostics and wall times, as `report.md` + `report.json` +
PNG figures, and the few numbers DVC compares across runs of a study as `metrics.json`.

Every number is read from the evaluation folders (`metrics.json`, `predictions/*.jsonl`),
training curves and filter stats named by the study; nothing is typed in (`load`). What
is computed from them lives in `analysis`, the figures in `figures`, the text in
`markdown`; this module writes the three outputs.

The study is a plain dict:

    {
      "title": str, "model": str, "split": str,
      "split_sizes": {...}, "seeds": [int, ...], "budget": str | {...}, "wall_time_s": float | None,
      "n_boot": 10000, "stats_seed": 0, "level": 0.95,          # optional
      "cells": {"<cell>": {"status": "done" | "unrecorded" | "missing" | "stale",   # optional:
                           "wall_time_s": float | None, "computed": bool,         # every cell of the
                           "finished": str, "code": {...}}},                       # study, run or not
      "models": {                                            # one entry per evaluated run
        "<run name>": {
          "eval_dir": path,                 # metrics.json + predictions/<benchmark>.jsonl
          "label": str,                     # recipe; runs sharing it are seeds (default: run name)
          "kind": "base" | "baseline" | "sd" | "component" | "pair" | "leave_one_out" | "full" | "other",
                                            # default: inferred from the label (infer_kind)
          "seed": int | None,
          "components": [str, ...],         # pair: the two component labels; leave_one_out:
                                            # the removed component
          "curves": path | [path per round] | None,        # curves.jsonl
          "filter_stats": path | [path per round] | None,  # filter stats.json
        }
      }
    }
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from unisd.artifacts import write_json_atomic, write_text_atomic
from unisd.report.analysis import (
    OVERALL,
    agreement_variants,
    best_baseline,
    choose_headline,
    drift,
    elsewhere,
    flips,
    gains,
    headline,
    interactions,
    mcq_table,
    scores,
    seed_table,
    task_table,
    training,
)
from unisd.report.figures import figures
from unisd.report.load import ReportError, Study, infer_kind, load_study
from unisd.report.markdown import markdown

__all__ = ["ReportError", "infer_kind", "write_report"]


def _clean(value: Any) -> Any:
    """JSON without NaN: NaN becomes null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, Path):
        return str(value)
    return value.item() if isinstance(value, np.generic) else value


def analyse(s: Study) -> dict[str, Any]:
    """Everything report.json holds, except the figures."""
    hl = choose_headline(s)
    base = next((r.label for r in s.of_kind("base")), None)
    best = best_baseline(s, hl)
    others = [r for r in s.runs if r.kind not in ("base", "baseline")]
    inter, skipped_pairs = interactions(s)
    return {
        "study": s.info,
        "runs": {r.name: {"label": r.label, "kind": r.kind, "seed": r.seed} for r in s.runs},
        "headline": headline(s, hl, base, best),
        "best_baseline": best,
        "elsewhere": elsewhere(s, hl, base),
        "mcq": mcq_table(s),
        **{task: task_table(s, task) for task in s.tasks if task != "mcq"},
        "flips": flips(s, hl, base),
        "scores": scores(s),
        "seeds": seed_table(s, hl),
        "vs_base": gains(s, s.runs, lambda r: s.partner(s.labelled(base), r.seed) if base else None),
        "vs_best_baseline": gains(s, others, lambda r: s.partner(s.labelled(best), r.seed) if best else None),
        "drift": drift(s),
        "components": gains(s, s.of_kind("component"), lambda r: s.partner(s.labelled("sd"), r.seed)),
        "interactions": inter,
        "skipped_pairs": skipped_pairs,
        "leave_one_out": gains(
            s, s.of_kind("leave_one_out"), lambda r: s.partner(s.of_kind("full"), r.seed), reverse=True
        ),
        "agreement": agreement_variants(s),
        "training": training(s),
    }


def dvc_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """The study's metrics for `dvc metrics show|diff` and `dvc exp show`, one small
    table of report.json's numbers: per run, the headline with its interval, the
    generative score per benchmark and overall, and the overall gain over the base model."""
    head, runs = data["headline"], {}
    for name, row in head["runs"].items():
        runs[name] = {
            "headline": {k: row["value"][k] for k in ("score", "lo", "hi")},
            "score": {bench: cell["score"] for bench, cell in data["scores"][name].items()},
        }
        if name in data["vs_base"]:
            runs[name]["gain_over_base"] = data["vs_base"][name][OVERALL]["diff_pct"]
    return {"headline": f"{head['benchmark']} {head['metric']}", "runs": runs}


def write_report(study: dict[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/report.md`, `out_dir/report.json`, `out_dir/metrics.json` and
    `out_dir/figures/*.png`; return report.md."""
    out_dir = Path(out_dir)
    s = load_study(study)
    data = analyse(s)
    data["figures"], data["skipped_figures"] = figures(s, data, out_dir / "figures")
    write_json_atomic(out_dir / "report.json", _clean(data))
    write_json_atomic(out_dir / "metrics.json", _clean(dvc_metrics(data)))
    write_text_atomic(out_dir / "report.md", markdown(s, data))
    return out_dir / "report.md"
