"""What the report computes from a loaded study, as plain dicts ready for report.json:
the headline with its paired gains (per run and pooled over seeds), the MCQ and code
tables, flips against the base model, the generative comparisons, the ablations, drift
and what each training run's mechanisms and teacher did. Nothing here formats or draws.

Comparisons pair a run with the reference run of the same seed (else the reference's
first run). The base model is the run of kind "base"; the best baseline is the baseline
label with the best seed-mean headline score; the plain SD base of the component
ablations is the label "sd"; leave-one-out drops are from kind "full"; agreement variants
(labels agreement_{tok,seq}_{random,retrieval,induction}) are compared through each
label's first run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any, cast

import numpy as np

from unisd.report.load import GENERATIVE, ReportError, Run, Study
from unisd.stats import (
    bootstrap_ci,
    flip_counts,
    interaction,
    overall_ci,
    paired_overall_test,
    paired_test,
    pooled_ci,
    pooled_paired_test,
    seed_summary,
)

OVERALL = "overall"
PAPER_GAIN = {"base": 5.4, "best baseline": 2.8}  # unisd-full's overall gains in the paper (Qwen2.5-7B)
DEFAULT_HEADLINE = ("sciq", "rot_acc")
AGREEMENT = re.compile(r"^agreement_(tok|seq)_(random|retrieval|induction)$")
DRIFT_KEYS = {
    "ppl_ret": "PPLret (base model's perplexity on this model's answers; lower = closer to base)",
    "gold_ppl": "Gold PPL (this model's perplexity on the references)",
    "jsd_to_base": "JSD(base, model) per token on this model's answers",
}
# with intervals from the predictions: letter-free (rot_acc; ll_acc, the only one under
# `mcq_format: open_answer`, where no letters are shown) and generative
MCQ_ACCURACIES = ("rot_acc", "ll_acc", GENERATIVE)
MCQ_STATED = (
    "circular_acc",
    "ll_norm_acc",
    "rot_gold_prob",
    "parse_rate",
    "finish_rate",
    "one_letter_baseline",
    "letter_hist",
)  # as metrics.json states them
# the filter stage's teacher diagnostics (its stats.json), per round, as the report's
# columns: (header, keys shown side by side); agreement-weight statistics are every
# other numeric key with "weight" in its name
DIAGNOSTICS = (
    ("EOS log-prob teacher / student", ("teacher_eos_logp", "student_eos_logp")),
    ("letter acc % teacher / student", ("teacher_letter_acc", "student_letter_acc")),
    ("student sample acc %", ("student_sample_acc",)),
    ("dropped truncated", ("dropped_truncated",)),
    ("filtered fraction", ("filtered_fraction",)),
    ("disagreement", ("disagreement_mean",)),
)
FILTER_KEYS = tuple(k for _, keys in DIAGNOSTICS for k in keys)


@dataclass(frozen=True)
class Headline:
    benchmark: str
    metric: str
    note: str  # why this benchmark and metric lead the report


def choose_headline(study: Study) -> Headline:
    """The benchmark and metric the report leads with: what the metrics files declare
    (`headline`), else SciQ's rotation-invariant accuracy. Every run must have it, so a
    study mixing older evaluations falls back to generative accuracy and says so."""
    declared = {(h["benchmark"], h["metric"]) for r in study.runs if (h := r.metrics.get("headline"))}
    if len(declared) > 1:
        raise ReportError(f"the runs declare different headlines: {sorted(declared)}")
    bench, metric = next(iter(declared), DEFAULT_HEADLINE)
    note = "declared by the metrics files" if declared else "the default: no metrics file declares a headline"
    if bench not in study.benchmarks:
        bench = (study.of_task("mcq") or study.benchmarks)[0]
        note += f"; {bench} stands in, the declared benchmark was not evaluated"
    lacking = [r.name for r in study.runs if bench not in r.outcomes.get(metric, {})]
    if lacking:
        who = "every run" if len(lacking) == len(study.runs) else ", ".join(lacking)
        note += (
            f"; {metric} is missing for {who} (evaluated before it existed, or with eval.choice_scores off), "
            "so generative accuracy leads"
        )
        metric = GENERATIVE
    return Headline(bench, metric, note)


def _ci(outcomes: dict[str, float], kw: dict[str, Any]) -> dict[str, float]:
    score, lo, hi = bootstrap_ci(list(outcomes.values()), **kw)
    return {"score": score, "lo": lo, "hi": hi, "n": len(outcomes)}


def _mean_ci(run: Run, metric: str, benches: list[str], kw: dict[str, Any]) -> dict[str, float]:
    """The mean of the benchmarks' scores, its interval resampling within each benchmark."""
    score, lo, hi = overall_ci({b: list(run.outcomes[metric][b].values()) for b in benches}, **kw)
    return {"score": score, "lo": lo, "hi": hi, "n": sum(len(run.outcomes[metric][b]) for b in benches)}


def _has(run: Run, metric: str, benches: list[str]) -> bool:
    return all(b in run.outcomes.get(metric, {}) for b in benches)


def _value(run: Run, hl: Headline) -> float:
    return run.metrics["benchmarks"][hl.benchmark][hl.metric]


def best_baseline(study: Study, hl: Headline) -> str | None:
    """The baseline label with the best seed-mean headline score on this split: a selection
    on the evaluation data in the baseline's favour, so comparing with it is demanding."""
    labels = [label for label in study.labels if study.labelled(label)[0].kind == "baseline"]
    return max(labels, key=lambda label: np.mean([_value(r, hl) for r in study.labelled(label)]), default=None)


def _references(kind: str, base: str | None, best: str | None) -> dict[str, str]:
    """The labels a model of this kind is compared with: the base model for every other
    model, the best baseline for every model that is neither base nor baseline."""
    refs = {
        "vs_base": base if kind != "base" else None,
        "vs_best_baseline": best if kind not in ("base", "baseline") else None,
    }
    return {key: label for key, label in refs.items() if label is not None}


def headline(study: Study, hl: Headline, base: str | None, best: str | None) -> dict[str, Any]:
    """The headline per run (with its interval, generative accuracy on the same benchmark
    beside it) and its paired gains over the base model and the best baseline; then the
    same per label, pooled over seeds (`unisd.stats.pooled_paired_test`)."""
    kw, paired = study.stats_kw, study.paired_kw

    def outcomes(run: Run, metric: str = hl.metric) -> dict[str, float]:
        return run.outcomes[metric][hl.benchmark]

    runs = {}
    for run in study.runs:
        row: dict[str, Any] = {"value": _ci(outcomes(run), kw), "generative": _ci(outcomes(run, GENERATIVE), kw)}
        for key, label in _references(run.kind, base, best).items():
            ref = cast(Run, study.partner(study.labelled(label), run.seed))  # every reference has a run
            row[key] = {"reference": ref.name, **paired_test(outcomes(run), outcomes(ref), **paired)}
        runs[run.name] = row
    pooled = {}
    for label in study.labels:
        group = [outcomes(r) for r in study.labelled(label)]
        value, lo, hi = pooled_ci(group, **kw)
        row = {"seeds": len(group), "value": {"score": value, "lo": lo, "hi": hi}}
        for key, ref_label in _references(study.labelled(label)[0].kind, base, best).items():
            row[key] = {
                "reference": ref_label,
                **pooled_paired_test(group, [outcomes(r) for r in study.labelled(ref_label)], **paired),
            }
        pooled[label] = row
    return {
        "benchmark": hl.benchmark,
        "metric": hl.metric,
        "note": hl.note,
        "best_baseline": best,
        "runs": runs,
        "pooled": pooled,
    }


def elsewhere(study: Study, hl: Headline, base: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """The headline's metric on every other benchmark that all runs have it for, each label
    pooled over its seeds and paired against the base model: what training for the
    headline costs elsewhere (significant harm: the interval's upper end below zero)."""
    if base is None:
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in study.benchmarks:
        if bench == hl.benchmark or not all(bench in r.outcomes.get(hl.metric, {}) for r in study.runs):
            continue
        ref = [r.outcomes[hl.metric][bench] for r in study.labelled(base)]
        out[bench] = {
            label: {
                "seeds": len(group := [r.outcomes[hl.metric][bench] for r in study.labelled(label)]),
                **pooled_paired_test(group, ref, **study.paired_kw),
            }
            for label in study.labels
            if label != base
        }
    return out


def scores(study: Study) -> dict[str, dict[str, dict[str, float]]]:
    """Per run, benchmark and overall (the mean over every benchmark, MCQ and code): the
    generative score with its bootstrap interval."""
    kw = study.stats_kw
    return {
        run.name: {
            **{b: _ci(run.correct[b], kw) for b in study.benchmarks},
            OVERALL: _mean_ci(run, GENERATIVE, study.benchmarks, kw),
        }
        for run in study.runs
    }


def mcq_table(study: Study) -> dict[str, Any]:
    """Per MCQ benchmark and run: rotation-invariant, option log-likelihood and generative
    accuracy with intervals, the other accuracies and rates as metrics.json states them;
    those accuracies pooled over the MCQ benchmarks (their mean); the gold letters' histogram."""
    kw, benches = study.stats_kw, study.of_task("mcq")
    runs = {}
    for run in study.runs:
        row: dict[str, Any] = {}
        for b in benches:
            stated = run.metrics["benchmarks"][b]
            row[b] = {
                **{m: _ci(run.outcomes[m][b], kw) for m in MCQ_ACCURACIES if _has(run, m, [b])},
                **{k: stated[k] for k in MCQ_STATED if stated.get(k) is not None},
            }
        row["pooled"] = {m: _mean_ci(run, m, benches, kw) for m in MCQ_ACCURACIES if _has(run, m, benches)}
        runs[run.name] = row
    gold = {
        b: next(
            (
                r.metrics["benchmarks"][b]["gold_hist"]
                for r in study.runs
                if r.metrics["benchmarks"][b].get("gold_hist")
            ),
            None,
        )
        for b in benches
    }
    return {"benchmarks": benches, "runs": runs, "gold_hist": gold}


def task_table(study: Study, task: str) -> dict[str, Any]:
    """Per benchmark of a non-MCQ task (code: pass@1) and run: the score with its
    interval, and the mean over the task's benchmarks."""
    kw, benches = study.stats_kw, study.of_task(task)
    return {
        "benchmarks": benches,
        "runs": {
            run.name: {
                **{b: _ci(run.correct[b], kw) for b in benches},
                "pooled": _mean_ci(run, GENERATIVE, benches, kw),
            }
            for run in study.runs
        },
    }


def flips(study: Study, hl: Headline, base: str | None) -> dict[str, dict[str, Any]]:
    """Per run and benchmark, against the base run of its seed: examples that went wrong →
    right and right → wrong (a tie's share counts as that share), on the headline metric
    (where the benchmark has it) and on generative accuracy."""
    out = {}
    for run in study.runs:
        ref = study.partner(study.labelled(base), run.seed) if base else None
        if ref is None or run.label == base:
            continue
        out[run.name] = {
            "reference": ref.name,
            "benchmarks": {
                b: {
                    m: flip_counts(run.outcomes[m][b], ref.outcomes[m][b])
                    for m in dict.fromkeys((hl.metric, GENERATIVE))
                    if _has(run, m, [b]) and _has(ref, m, [b])
                }
                for b in study.benchmarks
            },
        }
    return out


def seed_table(study: Study, hl: Headline) -> dict[str, dict[str, dict[str, float]]]:
    """Mean ± sample std over seeds of the headline and the generative scores, for labels
    run with several seeds."""

    def values(run: Run) -> dict[str, float]:
        per_bench = {b: m[GENERATIVE] for b, m in run.metrics["benchmarks"].items()}
        return {"headline": _value(run, hl), **per_bench, OVERALL: float(np.mean(list(per_bench.values())))}

    out = {}
    for label in study.labels:
        rows = [values(r) for r in study.labelled(label)]
        if len(rows) > 1:
            out[label] = {
                col: dict(zip(("mean", "std"), seed_summary([r[col] for r in rows])), n_seeds=len(rows))
                for col in rows[0]
            }
    return out


def compare(study: Study, a: Run, b: Run) -> dict[str, dict[str, Any]]:
    """Paired a − b in generative accuracy per benchmark and overall."""
    out = {bench: paired_test(a.correct[bench], b.correct[bench], **study.paired_kw) for bench in study.benchmarks}
    return {**out, OVERALL: paired_overall_test(a.correct, b.correct, **study.paired_kw)}


def gains(
    study: Study, runs: list[Run], reference: Callable[[Run], Run | None], reverse: bool = False
) -> dict[str, dict[str, Any]]:
    """Each run against its reference run: run − reference (reference − run if `reverse`)."""
    out = {}
    for run in runs:
        ref = reference(run)
        if ref is not None and ref is not run:
            a, b = (ref, run) if reverse else (run, ref)
            out[run.name] = {"reference": ref.name, **compare(study, a, b)}
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
        sd, a, b = cast(list[Run], parts)
        result = interaction(sd.correct, a.correct, b.correct, run.correct, **study.stats_kw)
        out[run.name] = {"a": a.name, "b": b.name, "sd": sd.name, **result}
    return out, skipped


def agreement_variants(study: Study) -> dict[str, Any]:
    """Overall paired differences: token vs sequence per context, and between contexts per level."""
    found = {match.groups(): study.labelled(r.label)[0] for r in study.runs if (match := AGREEMENT.match(r.label))}
    pairs = [
        ((("tok", ctx), ("seq", ctx)), f"token − sequence ({ctx})") for ctx in ("random", "retrieval", "induction")
    ]
    pairs += [
        (((lvl, c1), (lvl, c2)), f"{c1} − {c2} ({lvl})")
        for lvl in ("tok", "seq")
        for c1, c2 in combinations(("retrieval", "induction", "random"), 2)
    ]
    out = {}
    for (ka, kb), name in pairs:
        if ka in found and kb in found:
            a, b = found[ka], found[kb]
            out[name] = {"a": a.name, "b": b.name, **paired_overall_test(a.correct, b.correct, **study.paired_kw)}
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


def _round_keys(filter_stats: list[dict[str, Any]]) -> list[str]:
    """The filter diagnostics some round states: FILTER_KEYS, then agreement-weight statistics."""
    stated = {k for s in filter_stats for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [k for k in FILTER_KEYS if k in stated] + sorted(k for k in stated - set(FILTER_KEYS) if "weight" in k)


def training(study: Study) -> dict[str, dict[str, Any]]:
    """Per run with curves or filter stats: steps, final loss, what each mechanism did to
    the loss — how often the EMA teacher moved, the mean and smallest agreement token
    weight, the fraction of tokens whose divergence was clipped (mean over steps) — and,
    per round, what the filter stage measured of its teacher: end-of-turn log-probs of
    teacher and student, their letter accuracies, how many truncated trajectories were
    dropped and what fraction was filtered, and the agreement weights. A mechanism whose
    weights stay near 1 or that clips nothing cannot change the result; a teacher that
    gives the end of turn less probability than the student teaches it to keep talking."""
    return {
        r.name: {
            "steps": len(r.curves),
            "final_loss": r.curves[-1]["loss"] if r.curves else None,
            "teacher_updates": sum(c.get("ema_update", 0) for c in r.curves),
            "token_weight_mean": _step_mean(r.curves, "token_weight_mean"),
            "token_weight_min": min((c["token_weight_min"] for c in r.curves if "token_weight_min" in c), default=None),
            "clipped_frac": _step_mean(r.curves, "clipped_frac"),
            "rounds": {k: [s.get(k) for s in r.filter_stats] for k in _round_keys(r.filter_stats)},
        }
        for r in study.runs
        if r.curves or r.filter_stats
    }
