"""The study report: every evaluated model's scores with intervals, paired comparisons,
ablations, drift and training curves, as `report.md` + `report.json` + PNG figures.

Every number is read from the evaluation folders (`metrics.json`, `predictions/*.jsonl`),
training curves and filter stats named by the study; nothing is typed in. Point scores
are metrics.json's, and the per-example predictions must reproduce them (stale or mixed
folders are an error, not a footnote).

The study is a plain dict:

    {
      "title": str, "model": str, "split": str,
      "split_sizes": {...}, "seeds": [int, ...], "budget": str | {...}, "wall_time_s": float,
      "n_boot": 10000, "stats_seed": 0, "level": 0.95,          # optional
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

Comparisons between runs pair each run with the reference run of the same seed (else the
reference's first run). The base model is the run of kind "base"; the plain SD base of
the component ablations is the label "sd"; leave-one-out drops are from kind "full";
agreement variants (labels agreement_{tok,seq}_{random,retrieval,induction}) are compared
through each label's first run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from unisd.artifacts import write_json_atomic, write_text_atomic
from unisd.recipes import BASELINES, COMPONENTS
from unisd.stats import bootstrap_ci, interaction, overall_ci, paired_overall_test, paired_test, seed_summary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BASELINE_LABELS = tuple(b for b in BASELINES if b != "base")
AGREEMENT = re.compile(r"^agreement_(tok|seq)_(random|retrieval|induction)$")
CURVE_TERMS = ("loss", "divergence", "sft", "feature", "contrastive", "token_weight_mean", "seq_weight_mean",
               "clipped_frac", "grad_norm")
DRIFT_KEYS = {"ppl_ret": "PPLret (base model's perplexity on this model's answers; lower = closer to base)",
              "gold_ppl": "Gold PPL (this model's perplexity on the references)",
              "jsd_to_base": "JSD(base, model) per token on this model's answers"}
OVERALL = "overall"
PAPER_GAIN = {"base": 5.4, "best baseline": 2.8}  # unisd-full's overall gains in the paper (Qwen2.5-7B)


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


@dataclass
class Run:
    name: str
    label: str
    kind: str
    seed: int | None
    components: list[str]
    metrics: dict[str, Any]
    correct: dict[str, dict[str, bool]]  # benchmark -> example id -> correct
    curves: list[dict[str, float]] = field(default_factory=list)
    filter_stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def benchmarks(self) -> list[str]:
        return list(self.metrics["benchmarks"])


# --------------------------------------------------------------------------- loading


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


def _check_predictions(name: str, metrics: dict[str, Any], correct: dict[str, dict[str, bool]]) -> None:
    """The predictions must reproduce metrics.json, or the folder is stale or mixed."""
    for bench, m in metrics["benchmarks"].items():
        rows = correct[bench]
        if not rows:
            raise ReportError(f"{name}/{bench}: no evaluated examples")
        score = 100.0 * sum(rows.values()) / len(rows)
        if len(rows) != m["n"] or not math.isclose(score, m["score"], abs_tol=1e-6):
            raise ReportError(f"{name}/{bench}: predictions give n={len(rows)}, score={score} "
                              f"but metrics.json says n={m['n']}, score={m['score']}")
    mean = float(np.mean([m["score"] for m in metrics["benchmarks"].values()]))
    if not math.isclose(mean, metrics["overall"], abs_tol=1e-6):
        raise ReportError(f"{name}: overall {metrics['overall']} is not the mean of benchmark scores ({mean})")


def load_run(name: str, spec: dict[str, Any]) -> Run:
    """A run's metrics, per-example correctness, curves and filter stats, checked for consistency."""
    eval_dir = Path(spec["eval_dir"])
    if not (eval_dir / "metrics.json").is_file():
        raise ReportError(f"{name}: no metrics.json in {eval_dir}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    correct = {bench: {r["id"]: bool(r["correct"]) for r in _read_jsonl(eval_dir / "predictions" / f"{bench}.jsonl")}
               for bench in metrics["benchmarks"]}
    _check_predictions(name, metrics, correct)
    label = spec.get("label", name)
    return Run(name=name, label=label, kind=spec.get("kind") or infer_kind(label), seed=spec.get("seed"),
               components=list(spec.get("components") or [label]), metrics=metrics, correct=correct,
               curves=_load_curves(_paths(spec.get("curves"))),
               filter_stats=[json.loads(p.read_text()) for p in _paths(spec.get("filter_stats"))])


# --------------------------------------------------------------------------- analysis


@dataclass
class Study:
    info: dict[str, Any]
    runs: list[Run]

    @property
    def stats_kw(self) -> dict[str, Any]:
        return {"n_boot": self.info.get("n_boot", 10000), "seed": self.info.get("stats_seed", 0),
                "level": self.info.get("level", 0.95)}

    @property
    def benchmarks(self) -> list[str]:
        return self.runs[0].benchmarks

    def of_kind(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]

    def partner(self, candidates: list[Run], seed: int | None) -> Run | None:
        """The candidate with this seed, else the first candidate."""
        return next((r for r in candidates if r.seed == seed), candidates[0] if candidates else None)

    def labelled(self, label: str) -> list[Run]:
        return [r for r in self.runs if r.label == label]

    @property
    def paired_kw(self) -> dict[str, Any]:
        return {**self.stats_kw, "n_perm": self.stats_kw["n_boot"]}

    def paired_overall(self, a: Run, b: Run) -> dict[str, Any]:
        return paired_overall_test(a.correct, b.correct, **self.paired_kw)

    def compare(self, a: Run, b: Run) -> dict[str, dict[str, Any]]:
        """Paired a − b per benchmark and overall."""
        out = {bench: paired_test(a.correct[bench], b.correct[bench], **self.paired_kw) for bench in self.benchmarks}
        return {**out, OVERALL: self.paired_overall(a, b)}


def scores(study: Study) -> dict[str, dict[str, dict[str, float]]]:
    """Per run, benchmark and overall: the score with its bootstrap interval."""
    kw = study.stats_kw
    out = {}
    for run in study.runs:
        row = {}
        for bench, m in run.metrics["benchmarks"].items():
            _, lo, hi = bootstrap_ci(list(run.correct[bench].values()), **kw)
            row[bench] = {"score": m["score"], "lo": lo, "hi": hi, "n": m["n"]}
        _, lo, hi = overall_ci({b: list(c.values()) for b, c in run.correct.items()}, **kw)
        row[OVERALL] = {"score": run.metrics["overall"], "lo": lo, "hi": hi, "n": sum(r["n"] for r in row.values())}
        out[run.name] = row
    return out


def seed_table(study: Study) -> dict[str, dict[str, dict[str, float]]]:
    """Mean ± sample std over seeds, for labels run with several seeds."""
    out = {}
    for label in dict.fromkeys(r.label for r in study.runs):
        runs = [r for r in study.runs if r.label == label]
        if len(runs) < 2:
            continue
        row = {}
        for bench in [*study.benchmarks, OVERALL]:
            values = [r.metrics["overall"] if bench == OVERALL else r.metrics["benchmarks"][bench]["score"]
                      for r in runs]
            mean, std = seed_summary(values)
            row[bench] = {"mean": mean, "std": std, "n_seeds": len(runs)}
        out[label] = row
    return out


def best_baseline(study: Study) -> Run | None:
    """The baseline run with the highest overall score on this split (a selection on test data)."""
    runs = study.of_kind("baseline")
    return max(runs, key=lambda r: r.metrics["overall"]) if runs else None


def gains(study: Study, runs: list[Run], reference: Callable[[Run], Run | None],
          reverse: bool = False) -> dict[str, dict[str, Any]]:
    """Each run against its reference run: run − reference (reference − run if `reverse`)."""
    out = {}
    for run in runs:
        ref = reference(run)
        if ref is not None and ref is not run:
            a, b = (ref, run) if reverse else (run, ref)
            out[run.name] = {"reference": ref.name, **study.compare(a, b)}
    return out


def interactions(study: Study) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Overall interaction of each pair run over `sd`, and why any pair was skipped."""
    out, skipped = {}, []
    for run in study.of_kind("pair"):
        if len(run.components) != 2:
            skipped.append(f"{run.name}: a pair needs two components, has {run.components}")
            continue
        parts = [study.partner(study.labelled(label), run.seed) for label in ("sd", *run.components)]
        if any(p is None for p in parts):
            skipped.append(f"{run.name}: missing one of sd, {', '.join(run.components)}")
            continue
        sd, a, b = parts
        result = interaction(sd.correct, a.correct, b.correct, run.correct, **study.stats_kw)
        out[run.name] = {"a": a.name, "b": b.name, "sd": sd.name, **result}
    return out, skipped


def agreement_variants(study: Study) -> dict[str, Any]:
    """Overall paired differences: token vs sequence per context, and between contexts per level."""
    found = {AGREEMENT.match(r.label).groups(): study.labelled(r.label)[0]
             for r in study.runs if AGREEMENT.match(r.label)}
    pairs = [((("tok", ctx), ("seq", ctx)), f"token − sequence ({ctx})")
             for ctx in ("random", "retrieval", "induction")]
    pairs += [(((lvl, c1), (lvl, c2)), f"{c1} − {c2} ({lvl})") for lvl in ("tok", "seq")
              for c1, c2 in combinations(("retrieval", "induction", "random"), 2)]
    out = {}
    for (ka, kb), name in pairs:
        if ka in found and kb in found:
            a, b = found[ka], found[kb]
            out[name] = {"a": a.name, "b": b.name, **study.paired_overall(a, b)}
    return out


def drift(study: Study) -> dict[str, dict[str, dict[str, float]]]:
    """Per run and drift metric: per benchmark values and their mean over benchmarks."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run in study.runs:
        for key in DRIFT_KEYS:
            values = {b: m[key] for b, m in run.metrics["benchmarks"].items() if m.get(key) is not None}
            if values:
                out.setdefault(run.name, {})[key] = {**values, "mean": float(np.nanmean(list(values.values())))}
    return out


def _step_mean(curves: list[dict[str, float]], key: str) -> float | None:
    values = [c[key] for c in curves if key in c]
    return float(np.mean(values)) if values else None


def training(study: Study) -> dict[str, dict[str, Any]]:
    """Per run with curves or filter stats: steps, final loss, and what each mechanism did
    to the loss — how often the EMA teacher moved, the mean and smallest agreement token
    weight, the fraction of tokens whose divergence was clipped (mean over steps), the
    mean teacher disagreement and the filtered fraction per round. A mechanism whose
    weights stay near 1 or that clips nothing cannot change the result."""
    return {r.name: {"steps": len(r.curves), "final_loss": r.curves[-1]["loss"] if r.curves else None,
                     "teacher_updates": sum(c.get("ema_update", 0) for c in r.curves),
                     "token_weight_mean": _step_mean(r.curves, "token_weight_mean"),
                     "token_weight_min": min((c["token_weight_min"] for c in r.curves if "token_weight_min" in c),
                                             default=None),
                     "clipped_frac": _step_mean(r.curves, "clipped_frac"),
                     "disagreement": [s.get("disagreement_mean") for s in r.filter_stats],
                     "filtered_fraction": [s.get("filtered_fraction") for s in r.filter_stats]}
            for r in study.runs if r.curves or r.filter_stats}


# --------------------------------------------------------------------------- figures


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new figure. matplotlib is imported here, not at the top: every `unisd` command
    imports this module (for `ReportError`), and only the report draws."""
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
        ax.bar(np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, ys, width, yerr=err, capsize=2,
               label=name, color=colors[name])
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
            ax.text(j, i, _signed(v), ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * limit else "black")  # readable on the saturated ends
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
        ax.errorbar(x, cell["score"], yerr=[[cell["score"] - cell["lo"]], [cell["hi"] - cell["score"]]], fmt="o",
                    capsize=2, color=colors[name])
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
                ax.plot([p["step"] for p in points], [p[term] for p in points], label=run.name, lw=1,
                        color=colors[run.name])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in axes[len(terms):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=6)
    return _save(fig, out / "curves.png")


# --------------------------------------------------------------------------- markdown


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float) -> str:
    """+1.0 / -1.0, and 0.0 for float noise around zero (never -0.0)."""
    return f"{round(x, 9) + 0.0:+.1f}"


def _ci(c: dict[str, float]) -> str:
    return f"{c['score']:.1f} [{c['lo']:.1f}, {c['hi']:.1f}]"


def _diff(t: dict[str, Any]) -> str:
    return f"{_signed(t['diff_pct'])} [{_signed(t['lo'])}, {_signed(t['hi'])}] p={t['p_value']:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return str(value)


def _comparison_md(title: str, note: str, comp: dict, cols: list[str], ref_header: str = "reference") -> list[str]:
    rows = [[name, c["reference"], *(_diff(c[col]) for col in cols)] for name, c in comp.items()]
    return [f"## {title}", "", note, "", *_table(["model", ref_header, *cols], rows)]


def _header_md(study: Study) -> list[str]:
    info, kw = study.info, study.stats_kw
    wall = info.get("wall_time_s")
    lines = [f"# {info.get('title', 'UniSD study')}", "",
             f"- model: {info.get('model', '—')}",
             f"- evaluation split: {info.get('split', '—')}",
             f"- split sizes: {_describe(info.get('split_sizes', '—'))}",
             f"- seeds: {_describe(info.get('seeds', '—'))}",
             f"- budget: {_describe(info.get('budget', '—'))}",
             f"- wall time: {'—' if wall is None else f'{wall:.0f} s ({wall / 3600:.2f} h)'}",
             f"- runs: {len(study.runs)}; evaluated examples per benchmark: "
             + ", ".join(f"{b} {m['n']}" for b, m in study.runs[0].metrics["benchmarks"].items()), "",
             f"Scores are percentages with {kw['level']:.0%} percentile-bootstrap intervals ({kw['n_boot']} "
             f"resamples of the evaluated examples, seed {kw['seed']}). The overall score is the mean of the "
             "benchmark scores; its interval resamples examples within each benchmark. Differences are paired "
             "on the same examples: a paired bootstrap interval, a two-sided sign-flip permutation p-value, "
             "and per benchmark the McNemar counts (b10: model right and reference wrong; b01: the reverse) "
             "with the exact McNemar p in report.json. p-values are not adjusted for the number of "
             "comparisons. A run is compared with the reference run of the same seed when there is one.", ""]
    return lines


def _scores_md(study: Study, table: dict, seeds: dict) -> list[str]:
    cols = [*study.benchmarks, OVERALL]
    lines = ["## Scores", "", *_table(["model", "kind", *cols],
                                      [[r.name, r.kind, *(_ci(table[r.name][c]) for c in cols)] for r in study.runs])]
    if seeds:
        rows = [[label, str(row[OVERALL]["n_seeds"]), *(f"{row[c]['mean']:.1f} ± {row[c]['std']:.1f}" for c in cols)]
                for label, row in seeds.items()]
        lines += ["### Over seeds", "", "Mean ± sample standard deviation (n − 1) over seeds; labels run with "
                  "a single seed have no spread estimate and are not listed.", "",
                  *_table(["label", "seeds", *cols], rows)]
    return lines


def _drift_md(study: Study, drift_: dict) -> list[str]:
    lines = ["## Drift and fit", ""] + ([] if drift_ else ["No perplexities in the metrics.", ""])
    for key, title in DRIFT_KEYS.items():
        rows = [[name, *(_f(d[key].get(b), 3) for b in [*study.benchmarks, "mean"])]
                for name, d in drift_.items() if key in d]
        if rows:
            lines += [f"### {title}", "", *_table(["model", *study.benchmarks, "mean"], rows)]
    return lines


def _ablation_md(study: Study, comp: dict, inter: dict, skipped: list[str], loo: dict, agree: dict) -> list[str]:
    cols = [*study.benchmarks, OVERALL]
    lines: list[str] = []
    if comp:
        lines += _comparison_md("Component gains", "Each single component against the plain SD base `sd` "
                                "(component − sd).", comp, cols)
    if inter or skipped:
        rows = [[name, p["a"], p["b"], _signed(p["gain_a"]), _signed(p["gain_b"]), _signed(p["gain_ab"]),
                 f"{_signed(p['interaction'])} [{_signed(p['lo'])}, {_signed(p['hi'])}]"] for name, p in inter.items()]
        lines += ["## Interactions", "", "Overall gains over `sd`; interaction = gain(A+B) − gain(A) − gain(B), "
                  "with a bootstrap interval resampling the four models' answers jointly (0: additive).", "",
                  *_table(["pair", "A", "B", "gain(A)", "gain(B)", "gain(A+B)", "interaction"], rows),
                  *(f"- skipped {s}" for s in skipped), ""]
    if loo:
        removed = {r.name: ", ".join(r.components) for r in study.of_kind("leave_one_out")}
        rows = [[name, removed[name], c["reference"], *(_diff(c[col]) for col in cols)] for name, c in loo.items()]
        lines += ["## Leave-one-out", "", "Drop = full − (full without the component): positive means the "
                  "component helps.", "", *_table(["model", "removed", "full", *cols], rows)]
    if agree:
        rows = [[name, a["a"], a["b"], _diff(a)] for name, a in agree.items()]
        lines += ["## Agreement variants", "", "Overall paired differences between agreement settings.", "",
                  *_table(["comparison", "A", "B", "A − B (overall)"], rows)]
    return lines


def _training_md(train: dict) -> list[str]:
    def per_round(values: list[float | None]) -> str:
        return ", ".join(_f(v, 3) for v in values) or "—"

    rows = [[name, str(t["steps"]), _f(t["final_loss"], 4), str(t["teacher_updates"]),
             _f(t["token_weight_mean"], 3), _f(t["token_weight_min"], 3), _f(t["clipped_frac"], 4),
             per_round(t["disagreement"]), per_round(t["filtered_fraction"])] for name, t in train.items()]
    return ["## Training", "", "What each mechanism did: EMA teacher updates, agreement token weights (mean over "
            "steps, and the smallest), the fraction of tokens whose divergence was clipped (mean over steps), the "
            "mean teacher disagreement of the kept trajectories and the filtered fraction, per round; — where the "
            "mechanism is off.", "",
            *_table(["model", "steps", "final loss", "teacher updates", "token weight mean", "token weight min",
                     "clipped fraction", "disagreement per round", "filtered fraction per round"], rows)]


# --------------------------------------------------------------------------- entry point


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


def _figures(study: Study, data: dict, out: Path) -> tuple[dict[str, str], dict[str, str]]:
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


def _best_note(s: Study, best: Run) -> str:
    candidates = ", ".join(r.name for r in s.of_kind("baseline"))
    return (f"The best baseline is `{best.name}`, the baseline run (of {candidates}) with the best overall score "
            f"on this {s.info.get('split', 'evaluation')} split ({best.metrics['overall']:.1f}). Choosing it on the "
            "evaluation split is itself a selection in the baseline's favour, so this is the most demanding "
            "comparison.")


def _paper_md(s: Study, data: dict) -> list[str]:
    """The paper's headline gaps against this study's, in words: reached or not."""
    rows = []
    for run in s.of_kind("full"):
        for what, table, target in (("base", data["vs_base"], PAPER_GAIN["base"]),
                                    ("best baseline", data["vs_best_baseline"], PAPER_GAIN["best baseline"])):
            if run.name in table:
                t = table[run.name]["overall"]
                verdict = "reached" if t["diff_pct"] >= target else "**not reached**"
                rows.append([f"{run.name} − {what} ({table[run.name]['reference']})", _signed(target), _diff(t),
                             verdict])
    if not rows:
        return []
    return ["## Against the paper", "", f"The paper reports unisd-full {_signed(PAPER_GAIN['base'])} points over "
            f"the base model and {_signed(PAPER_GAIN['best baseline'])} over the strongest baseline (GKD), overall, "
            "on Qwen2.5-7B. Reached means this study's point estimate is at least the paper's gap.", "",
            *_table(["gap (overall)", "paper", "here", "verdict"], rows)]


def _markdown(s: Study, data: dict, base: Run | None, best: Run | None) -> list[str]:
    cols = [*s.benchmarks, OVERALL]
    lines = [*_header_md(s), *_paper_md(s, data), *_scores_md(s, data["scores"], data["seeds"])]
    if base:
        lines += _comparison_md("Gain over the base model", "model − base, paired on the same examples.",
                                data["vs_base"], cols, "base")
    if best:
        lines += _comparison_md("Gain over the best baseline", _best_note(s, best), data["vs_best_baseline"], cols,
                                "best baseline")
    lines += _drift_md(s, data["drift"])
    lines += _ablation_md(s, data["components"], data["interactions"], data["skipped_pairs"],
                          data["leave_one_out"], data["agreement"])
    if data["training"]:
        lines += _training_md(data["training"])
    lines += ["## Figures", ""]
    lines += [f"![{name}]({path})\n" for name, path in data["figures"].items()]
    lines += [f"- {name}: skipped ({why})" for name, why in data["skipped_figures"].items()]
    return lines + [""]


def load_study(study: dict[str, Any]) -> Study:
    """The study's runs, loaded and checked to share one set of benchmarks."""
    runs = [load_run(name, spec) for name, spec in study["models"].items()]
    if not runs:
        raise ReportError("the study has no models")
    for run in runs[1:]:
        if run.benchmarks != runs[0].benchmarks:
            raise ReportError(f"{run.name} was evaluated on {run.benchmarks}, {runs[0].name} on {runs[0].benchmarks}")
    return Study({k: v for k, v in study.items() if k != "models"}, runs)


def write_report(study: dict[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/report.md`, `out_dir/report.json` and `out_dir/figures/*.png`; return report.md."""
    out_dir = Path(out_dir)
    s = load_study(study)
    runs = s.runs
    base, best = next(iter(s.of_kind("base")), None), best_baseline(s)
    others = [r for r in runs if r.kind not in ("base", "baseline")]
    inter, skipped_pairs = interactions(s)
    data: dict[str, Any] = {
        "study": s.info, "runs": {r.name: {"label": r.label, "kind": r.kind, "seed": r.seed} for r in runs},
        "scores": scores(s), "seeds": seed_table(s),
        "vs_base": gains(s, runs, lambda r: base),
        "best_baseline": best.name if best else None,
        "vs_best_baseline": gains(s, others, lambda r: best),
        "drift": drift(s),
        "components": gains(s, s.of_kind("component"), lambda r: s.partner(s.labelled("sd"), r.seed)),
        "interactions": inter, "skipped_pairs": skipped_pairs,
        "leave_one_out": gains(s, s.of_kind("leave_one_out"), lambda r: s.partner(s.of_kind("full"), r.seed),
                               reverse=True),
        "agreement": agreement_variants(s), "training": training(s),
    }
    data["figures"], data["skipped_figures"] = _figures(s, data, out_dir / "figures")
    write_json_atomic(out_dir / "report.json", _clean(data))
    write_text_atomic(out_dir / "report.md", "\n".join(_markdown(s, data, base, best)))
    return out_dir / "report.md"
