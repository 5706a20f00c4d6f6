"""The study's figures: scores, component gains and interactions, drift, training curves.

matplotlib is imported inside the functions, not at the top: every `unisd` command
imports `unisd.report` (for `ReportError`), and only the report draws.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unisd.report.analysis import OVERALL
from unisd.report.load import Run, Study

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_TERMS = (
    "loss",
    "divergence",
    "sft",
    "feature",
    "contrastive",
    "token_weight_mean",
    "seq_weight_mean",
    "clipped_frac",
    "grad_norm",
)


def signed(x: float) -> str:
    """+1.0 / -1.0, and 0.0 for float noise around zero (never -0.0)."""
    return f"{round(x, 9) + 0.0:+.1f}"


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _colors(runs: list[Run]) -> dict[str, Any]:
    """One colour per run, the same in every figure (tab20: distinct for up to 20 runs)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {r.name: cmap(i % cmap.N) for i, r in enumerate(runs)}


def _save(fig: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return f"figures/{path.name}"


def fig_scores(study: Study, table: dict, out: Path) -> str:
    """Grouped bars: one group per benchmark and overall, one bar per run, 95% CI whiskers."""
    groups = [*study.benchmarks, OVERALL]
    names, colors = [r.name for r in study.runs], _colors(study.runs)
    width = 0.8 / len(names)
    fig = _figure((max(6.0, 2.0 + 0.2 * len(groups) * len(names)), 4.5))
    ax = fig.subplots()
    for i, name in enumerate(names):
        cells = [table[name][g] for g in groups]
        ys = np.array([c["score"] for c in cells])
        err = np.array([[y - c["lo"] for y, c in zip(ys, cells)], [c["hi"] - y for y, c in zip(ys, cells)]])
        ax.bar(
            np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width,
            ys,
            width,
            yerr=err,
            capsize=2,
            label=name,
            color=colors[name],
        )
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=7, ncol=max(1, len(names) // 8), bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, out / "scores.png")


def _heatmap(fig: Figure, ax, values: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    values = np.round(values, 9) + 0.0  # float noise and -0.0 would set the colour scale
    limit = (float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0) or 1.0
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                signed(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(v) > 0.6 * limit else "black",
            )  # readable on the saturated ends
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)


def fig_components(study: Study, comp: dict, inter: dict, out: Path) -> str:
    """Component gains over sd (per benchmark) and, when pairs exist, the pairwise interactions."""
    fig = _figure((12 if inter else 6.5, 0.5 * max(len(comp), 4) + 2))
    axes = fig.subplots(1, 2 if inter else 1, squeeze=False)[0]
    cols = [*study.benchmarks, OVERALL]
    gains_ = np.array([[comp[name][c]["diff_pct"] for c in cols] for name in comp])
    _heatmap(fig, axes[0], gains_, list(comp), cols, "gain over sd (points)")
    if inter:
        labels = sorted({inter[p][k] for p in inter for k in ("a", "b")})
        matrix = np.full((len(labels), len(labels)), np.nan)
        for p in inter.values():
            i, j = labels.index(p["a"]), labels.index(p["b"])
            matrix[i, j] = matrix[j, i] = p["interaction"]
        _heatmap(fig, axes[1], matrix, labels, labels, "interaction: gain(A+B) − gain(A) − gain(B), overall")
    return _save(fig, out / "components.png")


def fig_drift(study: Study, table: dict, drift_: dict, out: Path) -> str:
    """Overall score against mean PPLret: accuracy gained vs distance from the base model."""
    colors = _colors(study.runs)
    fig = _figure((6.5, 4.5))
    ax = fig.subplots()
    for name, d in drift_.items():
        x, cell = d["ppl_ret"]["mean"], table[name][OVERALL]
        ax.errorbar(
            x,
            cell["score"],
            yerr=[[cell["score"] - cell["lo"]], [cell["hi"] - cell["score"]]],
            fmt="o",
            capsize=2,
            color=colors[name],
        )
        ax.annotate(name, (x, cell["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PPLret, mean over benchmarks (lower = closer to base)")
    ax.set_ylabel("overall score (%)")
    return _save(fig, out / "drift.png")


def fig_curves(study: Study, out: Path) -> str:
    """One subplot per loss term / diagnostic, one line per trained run."""
    runs, colors = [r for r in study.runs if r.curves], _colors(study.runs)
    terms = [t for t in CURVE_TERMS if any(t in p for r in runs for p in r.curves)]
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = _figure((4.2 * ncols, 3.0 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, term in zip(axes, terms):
        for run in runs:
            points = [p for p in run.curves if term in p]
            if points:
                ax.plot(
                    [p["step"] for p in points], [p[term] for p in points], label=run.name, lw=1, color=colors[run.name]
                )
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in axes[len(terms) :]:
        ax.set_axis_off()
    axes[0].legend(fontsize=6)
    return _save(fig, out / "curves.png")


def figures(study: Study, data: dict, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Draw the figures whose inputs exist; say why the others were skipped (and remove their old PNGs)."""
    made, skipped = {"scores": fig_scores(study, data["scores"], out)}, {}
    if data["components"]:
        made["components"] = fig_components(study, data["components"], data["interactions"], out)
    else:
        skipped["components"] = "no component runs with an `sd` run to compare against"
    with_ret = {n: d for n, d in data["drift"].items() if "ppl_ret" in d}
    if with_ret:
        made["drift"] = fig_drift(study, data["scores"], with_ret, out)
    else:
        skipped["drift"] = "no PPLret in the metrics (eval.ppl off)"
    if any(r.curves for r in study.runs):
        made["curves"] = fig_curves(study, out)
    else:
        skipped["curves"] = "no training curves given"
    for name in skipped:
        (out / f"{name}.png").unlink(missing_ok=True)
    return made, skipped
