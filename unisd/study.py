"""The study: which runs make up the comparison and the ablation, and their report.

A study is a list of cells. Each cell is one recipe (plus component overrides) at one
seed, run with the study's size overrides in its own artifacts root
(`<artifacts>/study/<study>/<cell>`), so cells never overwrite each other; what cells
share (model, splits, base evaluation, round-1 trajectories, contexts, negatives) is
computed once and copied in by the cache. `run_study` runs the cells that are not done
through a launcher's `run_cell` (the Prefect flow), publishes each cell as it finishes
(`<metrics>/study/<study>/<cell>/`: what the report reads of it, and `cell.json`, its
record), and writes the report of `unisd.report`, which also covers a study still under
way. The published cells are small text files committed to git, so a fresh clone on
another machine resumes the study where it stopped and rebuilds its report, while the
models and checkpoints stay in the artifacts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from unisd.artifacts import atomic_dir, write_json_atomic
from unisd.config import Config, digest_json, load_config
from unisd.recipes import RECIPES, deep_merge
from unisd.report import ReportError, infer_kind, write_report
from unisd.stages import Layout, stage_code

log = logging.getLogger(__name__)

# What removing one mechanism from unisd-full means (leave-one-out).
WITHOUT: dict[str, dict[str, Any]] = {
    "agreement": {"agreement": {"enabled": False}},
    "ema": {"teacher": {"kind": "frozen"}},
    "contrastive": {"contrastive": {"enabled": False}},
    "feature": {"feature": {"mode": "none"}},
}
AGREEMENT_VARIANTS = tuple(
    f"agreement_{lvl}_{ctx}" for lvl in ("tok", "seq") for ctx in ("random", "retrieval", "induction")
)


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


def study_seeds(cfg: Config, study: str) -> tuple[int, ...]:
    """The seeds a study's cells run at: `study.seeds`, or for the ablation `study.ablation_seeds` when set."""
    own = cfg.study.ablation_seeds if study == "ablation" else None
    return own if own is not None else cfg.study.seeds


def compare_cells(cfg: Config) -> list[Cell]:
    """Base, every baseline and unisd-full, at every study seed."""
    return [Cell(r, r, s, infer_kind(r)) for s in cfg.study.seeds for r in cfg.study.recipes]


def ablation_cells(cfg: Config) -> list[Cell]:
    """The base model (for reference; its evaluation is shared with every cell), single
    components on plain SD, every pair of them, leave-one-out from unisd-full, and
    (optionally) all agreement variants."""
    comps = cfg.study.components
    singles = list(dict.fromkeys([*comps, *(AGREEMENT_VARIANTS if cfg.study.agreement_variants else ())]))

    def settings(component: str) -> dict:
        """The component's recipe with its study settings (`study.recipe_components`), as its single cell runs it."""
        return deep_merge(RECIPES[component], cfg.study.recipe_components.get(component, {}))

    cells = []
    for s in study_seeds(cfg, "ablation"):
        cells += [Cell("base", "base", s, "base"), Cell("sd", "sd", s, "sd")]
        cells += [Cell(c, c, s, "component") for c in singles]
        cells += [
            Cell(f"{a}+{b}", "sd", s, "pair", deep_merge(settings(a), settings(b)), (a, b))
            for a, b in combinations(comps, 2)
        ]
        if cfg.study.leave_one_out:
            cells += [Cell(f"unisd-full-no-{m}", "unisd-full", s, "leave_one_out", WITHOUT[m], (m,)) for m in WITHOUT]
        cells.append(Cell("unisd-full", "unisd-full", s, "full"))
    return cells


CELLS = {"compare": compare_cells, "ablation": ablation_cells}


def cell_config(cfg: Config, params_file: Path, overrides: dict[str, Any], study: str, cell: Cell) -> Config:
    """The cell's config: the study's size (`study.size`, then `study.ablation_size` for
    the ablation), the command line's overrides on top, the cell's recipe and seed, its
    components (the cell's own over `study.recipe_components` of its recipe), and the
    cell's own artifacts root."""
    where = f"study/{study}/{cell.name}"
    size = {**cfg.study.size, **(cfg.study.ablation_size if study == "ablation" else {})}
    return load_config(
        params_file,
        {
            **size,
            **overrides,
            "recipe": cell.recipe,
            "components": deep_merge(cfg.study.recipe_components.get(cell.recipe, {}), cell.components),
            "run.seed": cell.seed,
            "paths.artifacts": f"{cfg.paths.artifacts}/{where}",
            "paths.metrics": f"{cfg.paths.metrics}/{where}",
        },
    )


def report_dir(cfg: Config, study: str) -> Path:
    return cfg.root / "reports" / study


def published_eval(cfg: Config) -> Path:
    """The cell's published evaluation: metrics.json, predictions/ and each round's curves
    and filter stats, beside its record."""
    return cfg.metrics_dir / "eval"


def _trained_rounds(cfg: Config) -> range:
    return range(1, cfg.train_set.rounds + 1) if cfg.method.loss != "none" else range(0)


def publish_cell(cfg: Config) -> None:
    """Copy what the report reads of a finished cell from its artifacts into
    `published_eval` (atomically, with a manifest of digests)."""
    layout = Layout(cfg)
    with atomic_dir(published_eval(cfg)) as tmp:
        shutil.copy2(layout.recipe_eval / "metrics.json", tmp / "metrics.json")
        shutil.copytree(layout.recipe_eval / "predictions", tmp / "predictions")
        for r in _trained_rounds(cfg):
            shutil.copy2(layout.round(r, "train") / "curves.jsonl", tmp / f"round-{r}-curves.jsonl")
            shutil.copy2(layout.round(r, "filter") / "stats.json", tmp / f"round-{r}-filter.json")


def cell_entry(cfg: Config, cell: Cell) -> dict[str, Any]:
    """The report's description of one published cell."""
    where, rounds = published_eval(cfg), _trained_rounds(cfg)
    return {
        "eval_dir": str(where),
        "label": cell.label,
        "kind": cell.kind,
        "seed": cell.seed,
        "components": list(cell.parts),
        "curves": [str(where / f"round-{r}-curves.jsonl") for r in rounds] or None,
        "filter_stats": [str(where / f"round-{r}-filter.json") for r in rounds] or None,
    }


def result_digest(cfg: Config) -> str:
    """Digest of the params a cell's result depends on: not the study section (adding a
    seed or a recipe must not invalidate the cells already run), the folders or the name
    of the MLflow run."""
    params = cfg.model_dump(mode="json")
    params["run"].pop("name")
    return digest_json({k: v for k, v in params.items() if k not in ("study", "paths")})


def record_path(cfg: Config) -> Path:
    """The cell's record, beside its published metrics (so it is committed with them)."""
    return cfg.metrics_dir / "cell.json"


def cell_status(cfg: Config) -> dict[str, Any]:
    """The cell's record (if any) and its status: done (published under these params),
    unrecorded (published, its record not yet written), stale (published under other
    params) or missing (not published)."""
    path = record_path(cfg)
    record = json.loads(path.read_text()) if path.is_file() else None
    if not (published_eval(cfg) / "metrics.json").is_file():
        status = "missing"
    elif record is None:
        status = "unrecorded"
    else:
        status = "done" if record["params"] == result_digest(cfg) else "stale"
    return {**(record or {}), "status": status}


def study_status(params_file: Path, overrides: dict[str, Any], study: str) -> list[dict[str, Any]]:
    """Each cell of `study`: its name, status (`cell_status`), wall time and when it
    finished, read from the cells' records alone: how far a study is, with no score read
    (a study on test is read once, when it is complete)."""
    cfg = load_config(params_file, overrides)
    rows = []
    for cell in CELLS[study](cfg):
        state = cell_status(cell_config(cfg, params_file, overrides, study, cell))
        rows.append({"cell": cell.name, **{k: state.get(k) for k in ("status", "wall_time_s", "finished")}})
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """`study_status` as a table, and how many cells are done."""
    width = max(len(r["cell"]) for r in rows) + 2
    lines = [f"{'cell':<{width}}{'status':<12}{'wall time':>10}  finished"]
    for r in rows:
        minutes = "" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f} min"
        lines.append(f"{r['cell']:<{width}}{r['status']:<12}{minutes:>10}  {r['finished'] or ''}".rstrip())
    done = sum(r["status"] == "done" for r in rows)
    return "\n".join([*lines, f"{done} of {len(rows)} cells done"])


def _evaluated_since(cfg: Config, since: float) -> bool:
    """Whether the cell's metrics.json was written after `since` (a wall-clock time; less a
    second, since file times come from a coarser clock). An evaluation served by the
    cache, here or copied in from another place, keeps its original modification time
    (the verified copy preserves it)."""
    return (Layout(cfg).recipe_eval / "metrics.json").stat().st_mtime >= since - 1.0


def run_cell_recorded(cfg: Config, cell: Cell, run_cell: Callable[[Config, Cell], Any]) -> dict[str, Any]:
    """Run one cell, publish it and record it the moment it finishes: its wall time, whether
    it computed its evaluation or found it cached, and the code it ran."""
    since, started = time.time(), time.monotonic()
    run_cell(cfg, cell)
    publish_cell(cfg)
    record = {
        "params": result_digest(cfg),
        "wall_time_s": round(time.monotonic() - started, 1),
        "computed": _evaluated_since(cfg, since),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": {"evaluate": stage_code("evaluate")[:12], "train": stage_code("train")[:12]},
    }
    write_json_atomic(record_path(cfg), record)
    return {**record, "status": "done"}


def _wall_time(cells: dict[str, dict[str, Any]], previous: Path) -> float | None:
    """The study's wall time: the sum of the recorded times of its done cells; for a study
    whose cells kept no records, what its previous report said."""
    times = [c["wall_time_s"] for c in cells.values() if c["status"] == "done"]
    if times:
        return round(sum(times), 1)
    return json.loads(previous.read_text())["study"].get("wall_time_s") if previous.is_file() else None


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: left alone), restored after."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Runs the given cells (all pending, none done) somewhere, together: for each, its record
# (`run_cell_recorded`'s) or the exception it failed with. A failed cell fails alone.
CellMap = Callable[[list[tuple[Config, Cell]]], list["dict[str, Any] | BaseException"]]


class StudyError(RuntimeError):
    """Cells of a study failed; the others are recorded and in the report."""


def run_study(
    params_file: Path,
    overrides: dict[str, Any],
    study: str,
    run_cell: Callable[[Config, Cell], Any] | None = None,
    map_cells: CellMap | None = None,
) -> Path:
    """Run the cells of `study` ("compare" or "ablation") that are not done, then write its report.

    Resumable cell by cell: a cell evaluated under the same params is skipped, whatever
    code changed since (its record names the code it ran), and each cell is recorded as
    soon as it finishes, so an interrupted study loses only the cell in progress (whose
    stages resume from the cache and its last checkpoint). Without `run_cell` nothing
    runs: the report covers the cells evaluated so far and names the others.

    Cells run one after another in this process with `study.threads` torch threads, or,
    given `map_cells`, all pending cells are handed to it at once (a Dask cluster); there
    a failed cell fails alone: the report is written with the others, then StudyError.
    """
    cfg = load_config(params_file, overrides)
    cells = CELLS[study](cfg)
    configs = [cell_config(cfg, params_file, overrides, study, cell) for cell in cells]  # all validated first
    states: dict[str, dict[str, Any]] = {}
    pending: list[tuple[Config, Cell]] = []
    for i, (cell, cell_cfg) in enumerate(zip(cells, configs), start=1):
        state = cell_status(cell_cfg)
        if run_cell is not None and state["status"] == "done":
            log.info(
                "study %s: cell %d/%d %s finished %s; skipped (delete %s to rerun it)",
                study,
                i,
                len(cells),
                cell.name,
                state["finished"],
                record_path(cell_cfg),
            )
        elif run_cell is not None and map_cells is not None:
            pending.append((cell_cfg, cell))
        elif run_cell is not None:
            log.info("study %s: cell %d/%d %s", study, i, len(cells), cell.name)
            with torch_threads(cfg.study.threads):
                state = run_cell_recorded(cell_cfg, cell, run_cell)
        states[cell.name] = state
    failed: dict[str, BaseException] = {}
    if pending and map_cells is not None:
        log.info("study %s: %d of %d cells submitted", study, len(pending), len(cells))
        for (cell_cfg, cell), result in zip(pending, map_cells(pending)):
            if isinstance(result, BaseException):
                failed[cell.name] = result
                states[cell.name] = {**cell_status(cell_cfg), "error": f"{type(result).__name__}: {result}"}
            else:
                states[cell.name] = result
    present = [(c, k) for c, k in zip(cells, configs) if states[c.name]["status"] in ("done", "unrecorded")]
    if not present and failed:
        raise StudyError(f"{study}: every cell run failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    if not present:
        raise ReportError(f"no cell of the {study} study has been evaluated yet: run `unisd study {study}` first")
    models = {cell.name: cell_entry(cell_cfg, cell) for cell, cell_cfg in present}
    sized = configs[0]
    info = {
        "title": f"UniSD {study} study",
        "model": sized.model.name,
        "split": sized.eval.split,
        "split_sizes": {
            "eval_limit_per_benchmark": sized.eval.limit or "all",
            "train_examples_per_benchmark": sized.train_set.limit or "all",
            "train_benchmarks": list(sized.train_benchmarks),
        },
        "seeds": list(study_seeds(cfg, study)),
        "budget": {
            "rounds": sized.train_set.rounds,
            "lr": sized.train.lr,
            "epochs": sized.train.epochs,
            "batch": sized.train.batch_size * sized.train.grad_accum,
            "lora_r": sized.train.lora.r,
            **({"recipe_components": cfg.study.recipe_components} if cfg.study.recipe_components else {}),
        },
        "wall_time_s": _wall_time(states, report_dir(cfg, study) / "report.json"),
        "cells": states,
        "models": models,
    }
    report = write_report(info, report_dir(cfg, study))
    if failed:
        raise StudyError(
            f"{study}: {len(failed)} cell(s) failed, the others are recorded and reported ({report}): "
            + "; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in failed.items())
        )
    return report
