"""The study: which runs make up the comparison and the ablation, and their report.

A study is a list of cells. Each cell is one recipe (plus component overrides) at one
seed, run with the study's size overrides in its own artifacts root
(`<artifacts>/study/<study>/<cell>`), so cells never overwrite each other; what cells
share (model, splits, base evaluation, round-1 trajectories, contexts, negatives) is
computed once and linked in by the cache. `run_study` runs the cells through a
launcher's `run_cell` (the Prefect flow, or the CLI that dvc.yaml calls) and writes the
report of `unisd.report`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

from unisd.config import Config, load_config
from unisd.recipes import RECIPES, deep_merge
from unisd.report import ReportError, infer_kind, write_report
from unisd.stages import Layout

log = logging.getLogger(__name__)

# What removing one mechanism from unisd-full means (leave-one-out).
WITHOUT = {
    "agreement": {"agreement": {"enabled": False}},
    "ema": {"teacher": {"kind": "frozen"}},
    "contrastive": {"contrastive": {"enabled": False}},
    "feature": {"feature": {"mode": "none"}},
}
AGREEMENT_VARIANTS = tuple(f"agreement_{lvl}_{ctx}" for lvl in ("tok", "seq")
                           for ctx in ("random", "retrieval", "induction"))


@dataclass(frozen=True)
class Cell:
    label: str  # what the report groups seeds under: a recipe, "ema+clip", "unisd-full-no-ema"
    recipe: str
    seed: int
    kind: str  # base | baseline | sd | component | pair | leave_one_out | full
    components: dict[str, Any] = field(default_factory=dict)
    parts: tuple[str, ...] = ()  # pair: its two components; leave_one_out: the removed mechanism

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"


def compare_cells(cfg: Config) -> list[Cell]:
    """Base, every baseline and unisd-full, at every study seed."""
    return [Cell(r, r, s, infer_kind(r)) for s in cfg.study.seeds for r in cfg.study.recipes]


def ablation_cells(cfg: Config) -> list[Cell]:
    """The base model (for reference; its evaluation is shared with every cell), single
    components on plain SD, every pair of them, leave-one-out from unisd-full, and
    (optionally) all agreement variants."""
    comps = cfg.study.components
    singles = list(dict.fromkeys([*comps, *(AGREEMENT_VARIANTS if cfg.study.agreement_variants else ())]))
    cells = []
    for s in cfg.study.seeds:
        cells += [Cell("base", "base", s, "base"), Cell("sd", "sd", s, "sd")]
        cells += [Cell(c, c, s, "component") for c in singles]
        cells += [Cell(f"{a}+{b}", "sd", s, "pair", deep_merge(RECIPES[a], RECIPES[b]), (a, b))
                  for a, b in combinations(comps, 2)]
        if cfg.study.leave_one_out:
            cells += [Cell(f"unisd-full-no-{m}", "unisd-full", s, "leave_one_out", WITHOUT[m], (m,))
                      for m in WITHOUT]
        cells.append(Cell("unisd-full", "unisd-full", s, "full"))
    return cells


CELLS = {"compare": compare_cells, "ablation": ablation_cells}


def cell_config(cfg: Config, params_file: Path, overrides: dict[str, Any], study: str, cell: Cell) -> Config:
    """The cell's config: the study's size (`study.size`, then `study.ablation_size` for
    the ablation), the command line's overrides on top, the cell's recipe and seed, and
    the cell's own artifacts root."""
    where = f"study/{study}/{cell.name}"
    size = {**cfg.study.size, **(cfg.study.ablation_size if study == "ablation" else {})}
    return load_config(params_file, {
        **size, **overrides, "recipe": cell.recipe, "components": cell.components, "run.seed": cell.seed,
        "paths.artifacts": f"{cfg.paths.artifacts}/{where}", "paths.metrics": f"{cfg.paths.metrics}/{where}",
    })


def report_dir(cfg: Config, study: str) -> Path:
    return cfg.root / "reports" / study


def cell_entry(cfg: Config, cell: Cell) -> dict[str, Any]:
    """The report's description of one evaluated cell."""
    layout = Layout(cfg)
    rounds = range(1, cfg.train_set.rounds + 1)
    trained = cfg.method.loss != "none"
    return {
        "eval_dir": str(layout.recipe_eval), "label": cell.label, "kind": cell.kind, "seed": cell.seed,
        "components": list(cell.parts),
        "curves": [str(layout.round(r, "train") / "curves.jsonl") for r in rounds] if trained else None,
        "filter_stats": [str(layout.round(r, "filter") / "stats.json") for r in rounds] if trained else None,
    }


def require_done(cfg: Config, cell: Cell) -> None:
    """A `run_cell` for rebuilding a report: the cell must have been run already."""
    if not (Layout(cfg).recipe_eval / "metrics.json").is_file():
        raise ReportError(f"study cell {cell.name} has not been run (no {Layout(cfg).recipe_eval}/metrics.json): "
                          f"run `unisd study` first")


def run_study(params_file: Path, overrides: dict[str, Any], study: str,
              run_cell: Callable[[Config, Cell], Any] = require_done) -> Path:
    """Run every cell of `study` ("compare" or "ablation") and write its report.

    With the default `run_cell` nothing runs: the report is rebuilt from the cells'
    outputs, keeping the wall time the last full run recorded.
    """
    cfg = load_config(params_file, overrides)
    cells = CELLS[study](cfg)
    configs = [cell_config(cfg, params_file, overrides, study, cell) for cell in cells]  # all validated first
    started = time.monotonic()
    models = {}
    for i, (cell, cell_cfg) in enumerate(zip(cells, configs), start=1):
        log.info("study %s: cell %d/%d %s", study, i, len(cells), cell.name)
        run_cell(cell_cfg, cell)
        models[cell.name] = cell_entry(cell_cfg, cell)
    sized = configs[0]
    info = {
        "title": f"UniSD {study} study", "model": sized.model.name, "split": sized.eval.split,
        "split_sizes": {"eval_limit_per_benchmark": sized.eval.limit or "all",
                        "train_examples_per_benchmark": sized.train_set.limit or "all",
                        "train_benchmarks": list(sized.train_benchmarks)},
        "seeds": list(cfg.study.seeds),
        "budget": {"rounds": sized.train_set.rounds, "lr": sized.train.lr, "epochs": sized.train.epochs,
                   "batch": sized.train.batch_size * sized.train.grad_accum, "lora_r": sized.train.lora.r},
        "wall_time_s": round(time.monotonic() - started, 1), "models": models,
    }
    previous = report_dir(cfg, study) / "report.json"
    if run_cell is require_done and previous.is_file():
        info["wall_time_s"] = json.loads(previous.read_text())["study"].get("wall_time_s")
    return write_report(info, report_dir(cfg, study))
