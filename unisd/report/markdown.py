"""report.md: the report's numbers as tables and the sentences that say how to read them.

Sections, in order: the header (what was run, on which split, which cells are
missing), the headline, against the paper, MCQ benchmarks, code (and tool) benchmarks,
flips against the base model, seeds, generative gains over the base model and the best
baseline, drift, the ablations, training with the teacher diagnostics, wall time per
cell, figures. A section whose inputs the study lacks is left out.
"""

from __future__ import annotations

import math
from typing import Any

from unisd.report.analysis import DIAGNOSTICS, DRIFT_KEYS, FILTER_KEYS, MCQ_ACCURACIES, OVERALL, PAPER_GAIN
from unisd.report.figures import signed
from unisd.report.load import GENERATIVE, Study

METRIC_NAMES = {
    GENERATIVE: "generative accuracy",
    "rot_acc": "rotation-invariant letter accuracy (rot_acc)",
    "ll_acc": "option log-likelihood accuracy (ll_acc)",
}
SHORT = {GENERATIVE: "gen", "rot_acc": "rot", "ll_acc": "LL"}
SPLIT_NOTE = {
    "validation": "the split the studies diagnose and choose on; its numbers are not final results",
    "test": "held out: the numbers to report; only the best baseline is chosen on it",
}
TASK_TITLES = {"code": "Code benchmarks (pass@1 %)", "tool": "Tool-use benchmarks (full-call accuracy %)"}
# MCQ columns beyond the accuracies with intervals: (header, metrics.json key, format)
MCQ_COLUMNS = (
    ("circular", "circular_acc", "pct"),
    ("LL norm", "ll_norm_acc", "pct"),
    ("gold prob (rot)", "rot_gold_prob", "pct"),
    ("parsed", "parse_rate", "rate"),
    ("finished", "finish_rate", "rate"),
    ("one-letter baseline", "one_letter_baseline", "pct"),
    ("answer letters", "letter_hist", "hist"),
)


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _g(x: Any) -> str:
    """A diagnostic whose scale varies (log-probs, fractions, counts): three significant digits."""
    return "—" if x is None else str(x) if isinstance(x, int) else f"{x:.3g}"


def _ci(c: dict[str, float] | None) -> str:
    return "—" if c is None else f"{c['score']:.1f} [{c['lo']:.1f}, {c['hi']:.1f}]"


def _diff(t: dict[str, Any] | None) -> str:
    if t is None:
        return "—"
    return f"{signed(t['diff_pct'])} [{signed(t['lo'])}, {signed(t['hi'])}] p={t['p_value']:.3g}"


def _hist(h: dict[str, int]) -> str:
    return " · ".join(f"{k} {v}" for k, v in h.items())


def _stated(value: Any, fmt: str) -> str:
    """An MCQ column as metrics.json states it: a percentage, a rate in [0, 1] shown as a
    percentage, or a letter histogram."""
    if value is None:
        return "—"
    return {"pct": lambda: _f(value), "rate": lambda: f"{100 * value:.0f}%", "hist": lambda: _hist(value)}[fmt]()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return str(value)


def _metric(name: str) -> str:
    return METRIC_NAMES.get(name, name)


def _cells_line(cells: dict[str, dict[str, Any]]) -> str:
    absent = [f"{name} ({c['status']})" for name, c in cells.items() if c["status"] in ("missing", "stale")]
    line = f"- cells: {len(cells) - len(absent)} of {len(cells)} evaluated"
    return line + (f"; not in this report: {', '.join(absent)}" if absent else "")


def header_md(s: Study) -> list[str]:
    info, kw = s.info, s.stats_kw
    wall = info.get("wall_time_s")
    cells = info.get("cells")
    return [
        f"# {info.get('title', 'UniSD study')}",
        "",
        f"- model: {info.get('model', '—')}",
        f"- evaluation split: **{s.split}** ({SPLIT_NOTE.get(s.split, 'as named by the metrics files')})",
        f"- split sizes: {_describe(info.get('split_sizes', '—'))}",
        f"- seeds: {_describe(info.get('seeds', '—'))}",
        f"- budget: {_describe(info.get('budget', '—'))}",
        f"- wall time: {'—' if wall is None else f'{wall:.0f} s ({wall / 3600:.2f} h)'}",
        *([_cells_line(cells)] if cells else []),
        f"- runs: {len(s.runs)}; evaluated examples per benchmark: "
        + ", ".join(f"{b} {m['n']}" for b, m in s.runs[0].metrics["benchmarks"].items()),
        "",
        f"Scores are percentages on the {s.split} split with {kw['level']:.0%} percentile-bootstrap intervals "
        f"({kw['n_boot']} resamples of the evaluated examples, seed {kw['seed']}). A mean over benchmarks "
        "(MCQ, code, overall) is the mean of their scores; its interval resamples examples within each "
        "benchmark. MCQ and code are reported apart; the overall mean of both appears only in the generative "
        "comparisons further down. Differences are paired on the same examples: a paired bootstrap interval, "
        "a two-sided sign-flip permutation p-value, and per benchmark the McNemar counts (b10: model right and "
        "reference wrong; b01: the reverse) with the exact McNemar p in report.json. p-values are not adjusted "
        "for the number of comparisons. A run is compared with the reference run of the same seed when there "
        "is one.",
        "",
    ]


def headline_md(s: Study, hl: dict[str, Any]) -> list[str]:
    metric = _metric(hl["metric"])
    gains = [
        (key, title)
        for key, title in (("vs_base", "− base"), ("vs_best_baseline", f"− best baseline ({hl['best_baseline']})"))
        if any(key in r for r in hl["runs"].values())
    ]
    beside = hl["metric"] != GENERATIVE  # generative accuracy in its own column, unless it is the headline
    rows = [
        [name, _ci(r["value"]), *([_ci(r["generative"])] if beside else []), *(_diff(r.get(key)) for key, _ in gains)]
        for name, r in hl["runs"].items()
    ]
    lines = [
        f"## Headline: {hl['benchmark']} {metric}",
        "",
        f"The headline is {metric} on {hl['benchmark']} ({hl['note']}), on the {s.split} split. Each run's "
        "value has its interval over the examples"
        + (f"; generative accuracy on {hl['benchmark']} stands beside it, with its own" if beside else "")
        + "; gains are paired on the same examples. The best baseline is the baseline with the best "
        "seed-mean headline score on this split, a selection in its favour.",
        "",
        *_table(["model", metric, *(["generative"] if beside else []), *(t for _, t in gains)], rows),
    ]
    if any(p["seeds"] > 1 for p in hl["pooled"].values()):
        rows = [
            [label, str(p["seeds"]), _ci(p["value"]), *(_diff(p.get(key)) for key, _ in gains)]
            for label, p in hl["pooled"].items()
        ]
        lines += [
            "### Pooled over seeds",
            "",
            "Each example's correctness is averaged over a model's seeds, and the gain is the mean over "
            "examples of the difference of those averages (the difference of seed-mean scores). Its interval "
            "is a paired bootstrap that redraws examples, seeds held fixed: it measures example sampling, "
            "and seed-to-seed spread only through the averaging.",
            "",
            *_table(["model", "seeds", metric, *(t for _, t in gains)], rows),
        ]
    return lines


def paper_md(s: Study, hl: dict[str, Any]) -> list[str]:
    """The paper's headline gaps against this study's pooled headline gains: reached or not."""
    rows = []
    for label, p in hl["pooled"].items():
        if s.labelled(label)[0].kind != "full":
            continue
        for what, key in (("base", "vs_base"), ("best baseline", "vs_best_baseline")):
            if key in p:
                t, target = p[key], PAPER_GAIN[what]
                big, resolved = t["diff_pct"] >= target, t["lo"] > 0
                verdict = "reached" if big and resolved else "not resolved" if big else "**not reached**"
                seeds = f" ({p['seeds']} seeds)" if p["seeds"] > 1 else ""
                rows.append(
                    [
                        f"{label}{seeds} − {what} ({t['reference']})",
                        signed(target),
                        _diff(t),
                        "yes" if big else "no",
                        "yes" if resolved else "no",
                        verdict,
                    ]
                )
    if not rows:
        return []
    return [
        "## Against the paper",
        "",
        f"The paper reports unisd-full {signed(PAPER_GAIN['base'])} points over the base model and "
        f"{signed(PAPER_GAIN['best baseline'])} over the strongest baseline (GKD), on Qwen2.5-7B. Here the gap "
        f"is measured on the headline ({hl['benchmark']} {_metric(hl['metric'])}, {s.split} split), each model "
        "pooled over its seeds. A gap is **reached** when the point estimate is at least the paper's gap "
        "**and** its 95% paired interval lies above zero; a point estimate at the paper's gap whose interval "
        "reaches zero is not resolved.",
        "",
        *_table(["gap", "paper", "here", "≥ paper", "interval above 0", "verdict"], rows),
    ]


def elsewhere_md(s: Study, hl: dict[str, Any], other: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Each model against the base model on the benchmarks other than the headline's."""
    if not other:
        return []
    benches, labels = list(other), list(next(iter(other.values())))
    harmed = {label: [b for b in benches if other[b][label]["hi"] < 0] for label in labels}
    rows = [[label, *(_diff(other[b][label]) for b in benches), ", ".join(harmed[label]) or "none"] for label in labels]
    return [
        f"## Elsewhere: {_metric(hl['metric'])} on the other benchmarks",
        "",
        f"Model − base in {_metric(hl['metric'])} on each evaluated benchmark other than the headline's "
        f"({hl['benchmark']}), pooled over each model's seeds and paired on the same examples. Significant "
        "harm: the 95% interval lies below zero.",
        "",
        *_table(["model", *benches, "significant harm"], rows),
    ]


def mcq_md(s: Study, mcq: dict[str, Any]) -> list[str]:
    if not mcq["benchmarks"]:
        return []
    runs = mcq["runs"]
    lines = [
        "## MCQ benchmarks",
        "",
        "Per benchmark, with 95% intervals: rot — the letter-probability accuracy invariant to the options' "
        "order; LL — the option with the best log-likelihood (rot and LL give a k-way tie 1/k); gen — the "
        "generative accuracy of the parsed answer. Then: circular — right under every rotation; LL norm — "
        "LL with length-normalized log-likelihoods; gold prob — the gold option's mean probability over "
        "rotations (%); parsed / finished — answers naming an option / that ended before the token limit; "
        "one-letter baseline — always answering the most frequent gold letter. Columns no run states are "
        "left out.",
        "",
    ]
    for b in mcq["benchmarks"]:
        accs = [m for m in MCQ_ACCURACIES if any(m in r[b] for r in runs.values())]
        cols = [c for c in MCQ_COLUMNS if any(c[1] in r[b] for r in runs.values())]
        rows = [
            [name, *(_ci(r[b].get(m)) for m in accs), *(_stated(r[b].get(k), f) for _, k, f in cols)]
            for name, r in runs.items()
        ]
        gold = mcq["gold_hist"][b]
        lines += [
            f"### {b}",
            "",
            *([f"Gold letters: {_hist(gold)}.", ""] if gold else []),
            *_table(["model", *(SHORT[m] for m in accs), *(h for h, _, _ in cols)], rows),
        ]
    accs = [m for m in MCQ_ACCURACIES if any(m in r["pooled"] for r in runs.values())]
    rows = [[name, *(_ci(r["pooled"].get(m)) for m in accs)] for name, r in runs.items()]
    return lines + [
        "### MCQ pooled",
        "",
        f"Mean over {', '.join(mcq['benchmarks'])}.",
        "",
        *_table(["model", *(SHORT[m] for m in accs)], rows),
    ]


def task_md(task: str, table: dict[str, Any]) -> list[str]:
    benches = table["benchmarks"]
    rows = [[name, *(_ci(r[b]) for b in benches), _ci(r["pooled"])] for name, r in table["runs"].items()]
    return [f"## {TASK_TITLES.get(task, task)}", "", *_table(["model", *benches, f"{task} (mean)"], rows)]


def flips_md(s: Study, flips: dict[str, Any]) -> list[str]:
    if not flips:
        return []

    def cell(per_metric: dict[str, dict[str, int]]) -> str:
        return (
            " · ".join(
                f"{SHORT.get(m, m)} +{_g(c['wrong_to_right'])} −{_g(c['right_to_wrong'])}"
                for m, c in per_metric.items()
            )
            or "—"
        )

    rows = [[name, f["reference"], *(cell(f["benchmarks"][b]) for b in s.benchmarks)] for name, f in flips.items()]
    metrics = dict.fromkeys(m for f in flips.values() for per_metric in f["benchmarks"].values() for m in per_metric)
    return [
        "## Flips against the base model",
        "",
        "Per benchmark, the examples that went wrong → right (+) and right → wrong (−) against the base run of "
        "the same seed, on "
        + " and ".join(f"{_metric(m)} ({SHORT.get(m, m)})" for m in metrics)
        + " where the benchmark has it: a net change near zero can hide many flips both ways.",
        "",
        *_table(["model", "base", *s.benchmarks], rows),
    ]


def seeds_md(s: Study, seeds: dict, hl: dict[str, Any]) -> list[str]:
    if not seeds:
        return []
    cols = ["headline", *s.benchmarks, OVERALL]
    rows = [
        [label, str(row[OVERALL]["n_seeds"]), *(f"{row[c]['mean']:.1f} ± {row[c]['std']:.1f}" for c in cols)]
        for label, row in seeds.items()
    ]
    return [
        "## Over seeds",
        "",
        f"Mean ± sample standard deviation (n − 1) over seeds: the headline ({hl['benchmark']} "
        f"{_metric(hl['metric'])}), then generative scores. Labels run with a single seed have no spread "
        "estimate and are not listed.",
        "",
        *_table(["label", "seeds", *(f"{c} (gen)" if c != "headline" else c for c in cols)], rows),
    ]


def comparison_md(title: str, note: str, comp: dict, cols: list[str], ref_header: str = "reference") -> list[str]:
    rows = [[name, c["reference"], *(_diff(c[col]) for col in cols)] for name, c in comp.items()]
    return [f"## {title}", "", note, "", *_table(["model", ref_header, *cols], rows)]


def drift_md(s: Study, drift_: dict) -> list[str]:
    lines = ["## Drift and fit", ""] + ([] if drift_ else ["No perplexities in the metrics.", ""])
    for key, title in DRIFT_KEYS.items():
        rows = [
            [name, *(_f(d[key].get(b), 3) for b in [*s.benchmarks, "mean"])] for name, d in drift_.items() if key in d
        ]
        if rows:
            lines += [f"### {title}", "", *_table(["model", *s.benchmarks, "mean"], rows)]
    return lines


def ablation_md(s: Study, comp: dict, inter: dict, skipped: list[str], loo: dict, agree: dict) -> list[str]:
    cols = [*s.benchmarks, OVERALL]
    lines: list[str] = []
    if comp:
        lines += comparison_md(
            "Component gains",
            "Each single component against the plain SD base `sd` (component − sd), in generative accuracy.",
            comp,
            cols,
        )
    if inter or skipped:
        rows = [
            [
                name,
                p["a"],
                p["b"],
                signed(p["gain_a"]),
                signed(p["gain_b"]),
                signed(p["gain_ab"]),
                f"{signed(p['interaction'])} [{signed(p['lo'])}, {signed(p['hi'])}]",
            ]
            for name, p in inter.items()
        ]
        lines += [
            "## Interactions",
            "",
            "Overall gains over `sd`; interaction = gain(A+B) − gain(A) − gain(B), "
            "with a bootstrap interval resampling the four models' answers jointly (0: additive).",
            "",
            *_table(["pair", "A", "B", "gain(A)", "gain(B)", "gain(A+B)", "interaction"], rows),
            *(f"- skipped {x}" for x in skipped),
            "",
        ]
    if loo:
        removed = {r.name: ", ".join(r.components) for r in s.of_kind("leave_one_out")}
        rows = [[name, removed[name], c["reference"], *(_diff(c[col]) for col in cols)] for name, c in loo.items()]
        lines += [
            "## Leave-one-out",
            "",
            "Drop = full − (full without the component): positive means the component helps.",
            "",
            *_table(["model", "removed", "full", *cols], rows),
        ]
    if agree:
        rows = [[name, a["a"], a["b"], _diff(a)] for name, a in agree.items()]
        lines += [
            "## Agreement variants",
            "",
            "Overall paired differences between agreement settings.",
            "",
            *_table(["comparison", "A", "B", "A − B (overall)"], rows),
        ]
    return lines


def _per_round(rounds: dict[str, list], keys: tuple[str, ...]) -> str:
    """Rounds separated by ';', the keys of one round by '/'."""
    n = max(len(rounds[k]) for k in keys if k in rounds)
    return "; ".join(" / ".join(_g(rounds[k][i]) if k in rounds else "—" for k in keys) for i in range(n))


def training_md(train: dict) -> list[str]:
    if not train:
        return []
    rows = [
        [
            name,
            str(t["steps"]),
            _f(t["final_loss"], 4),
            str(t["teacher_updates"]),
            _f(t["token_weight_mean"], 3),
            _f(t["token_weight_min"], 3),
            _f(t["clipped_frac"], 4),
        ]
        for name, t in train.items()
    ]
    lines = [
        "## Training",
        "",
        "What each mechanism did: EMA teacher updates, agreement token weights (mean over "
        "steps, and the smallest), the fraction of tokens whose divergence was clipped (mean over steps); — "
        "where the mechanism is off.",
        "",
        *_table(
            [
                "model",
                "steps",
                "final loss",
                "teacher updates",
                "token weight mean",
                "token weight min",
                "clipped fraction",
            ],
            rows,
        ),
    ]
    diagnosed = {name: t["rounds"] for name, t in train.items() if t["rounds"]}
    if not diagnosed:
        return lines
    cols = [(h, keys) for h, keys in DIAGNOSTICS if any(k in r for r in diagnosed.values() for k in keys)]
    weights = sorted({k for r in diagnosed.values() for k in r} - set(FILTER_KEYS))  # agreement-weight stats
    cols += [(k, (k,)) for k in weights]
    rows = [
        [name, *(_per_round(r, keys) if any(k in r for k in keys) else "—" for _, keys in cols)]
        for name, r in diagnosed.items()
    ]
    return lines + [
        "### Teacher diagnostics (filter stage)",
        "",
        "Per round (rounds separated by ';'): the end-of-turn log-probability the teacher and the "
        "student give on the student's trajectories (a teacher below the student teaches it to keep "
        "talking), their letter accuracies, the student's sample accuracy, truncated trajectories "
        "dropped, the filtered fraction, the mean teacher disagreement and the agreement weights.",
        "",
        *_table(["model", *(h for h, _ in cols)], rows),
    ]


def _wall(c: dict[str, Any]) -> str:
    t = c.get("wall_time_s")
    if t is None:
        return "—"
    return f"{t:.0f} s ({t / 3600:.2f} h)" + ("" if c.get("computed", True) else ", from cache")


def cells_md(s: Study) -> list[str]:
    cells = s.info.get("cells")
    if not cells:
        return []
    rows = [
        [
            name,
            c["status"],
            _wall(c),
            c.get("finished") or "—",
            " / ".join(f"{k} {v[:8]}" for k, v in (c.get("code") or {}).items()) or "—",
        ]
        for name, c in cells.items()
    ]
    return [
        "## Wall time per cell",
        "",
        "Each cell's wall time as recorded when it finished, to plan sittings: done — evaluated under these "
        "params (a restarted study skips it); unrecorded — evaluated before cells recorded their time; "
        "missing — not run yet; stale — run under other params (rerun by the study, left out of this "
        'report). "from cache" — the cell\'s evaluation was written earlier (by this cell or another one), so '
        "the time is the cache's. "
        "Code: digests of the evaluation and training code the cell ran with.",
        "",
        *_table(["cell", "status", "wall time", "finished", "code"], rows),
    ]


def best_note(s: Study, best: str) -> str:
    return (
        f"The best baseline is `{best}`, the baseline with the best seed-mean headline score on this {s.split} "
        "split. Choosing it on the evaluation split is itself a selection in the baseline's favour, so this is "
        "the most demanding comparison."
    )


def markdown(s: Study, data: dict) -> str:
    cols = [*s.benchmarks, OVERALL]
    hl, best = data["headline"], data["best_baseline"]
    lines = [*header_md(s), *headline_md(s, hl), *paper_md(s, hl), *elsewhere_md(s, hl, data["elsewhere"])]
    lines += mcq_md(s, data["mcq"])
    for task in s.tasks:
        if task != "mcq":
            lines += task_md(task, data[task])
    lines += [*flips_md(s, data["flips"]), *seeds_md(s, data["seeds"], hl)]
    if data["vs_base"]:
        lines += comparison_md(
            "Gain over the base model (generative)",
            "model − base in generative accuracy (pass@1 for code), paired on the same examples.",
            data["vs_base"],
            cols,
            "base",
        )
    if data["vs_best_baseline"]:
        lines += comparison_md(
            "Gain over the best baseline (generative)",
            best_note(s, best),
            data["vs_best_baseline"],
            cols,
            "best baseline",
        )
    lines += drift_md(s, data["drift"])
    lines += ablation_md(
        s, data["components"], data["interactions"], data["skipped_pairs"], data["leave_one_out"], data["agreement"]
    )
    lines += [*training_md(data["training"]), *cells_md(s), "## Figures", ""]
    lines += [f"![{name}]({path})\n" for name, path in data["figures"].items()]
    lines += [f"- {name}: skipped ({why})" for name, why in data["skipped_figures"].items()]
    return "\n".join(lines + [""])
