"""Honest statistics over per-example correctness: bootstrap intervals, paired tests,
seed spread and component interactions.

Correctness is a credit in [0, 1] per example: 0/1 for most metrics, a share 1/k where a
metric splits a k-way tie (unisd.choice_scores). Everything below holds for credits;
only McNemar's test needs 0/1 outcomes.

Scores are percentages. The overall score is the mean of the benchmark scores (docs/method.md §4),
so its resampling is stratified: examples are redrawn within each benchmark and the
benchmark means averaged. Comparisons between models are paired: every model answers
the same example ids, and an example is redrawn with all of its models' answers.

Resampling n examples with replacement is a multinomial draw over the distinct rows
of the [n, models] correctness matrix (at most 2^models patterns for 0/1 outcomes, a
few more with ties), so the bootstrap is exact and cheap however large the split.
Several seeds of one model are pooled by averaging each example's correctness over them
(again a few more patterns, the same draws). Everything is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Correct = Mapping[str, float]  # example id -> credit in [0, 1] (a bool, or a tie's share), one benchmark
Suite = Mapping[str, Correct]  # benchmark -> per-example correctness


def _boot_means(rows: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, m] column means of `rows` ([n, m]) over resamples of its rows."""
    patterns, counts = np.unique(rows, axis=0, return_counts=True)
    n = len(rows)
    draws = rng.multinomial(n, counts / n, size=n_boot)
    means: np.ndarray = draws @ patterns / n
    return means


def _estimate(mats: Sequence[np.ndarray], weights: Sequence[float]) -> float:
    """mean_b(w · column means of mats[b]), in percent: a contrast of overall scores."""
    if not mats or any(len(m) == 0 for m in mats):
        raise ValueError("every benchmark needs at least one example")
    return 100 * float(np.mean([m.mean(axis=0) @ np.asarray(weights, dtype=float) for m in mats]))


def _stratified(
    mats: Sequence[np.ndarray], weights: Sequence[float], n_boot: int, seed: int, level: float
) -> tuple[float, float, float]:
    """The contrast with its percentile interval, examples redrawn within each benchmark."""
    estimate = _estimate(mats, weights)
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float)
    boot = np.mean([_boot_means(m, n_boot, rng) @ w for m in mats], axis=0)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return estimate, 100 * float(lo), 100 * float(hi)


def _column(correct: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(correct, dtype=float).reshape(-1, 1)


def _aligned(suites: Sequence[Suite]) -> dict[str, np.ndarray]:
    """Per benchmark, the [n, models] credit matrix over the shared example ids.

    Paired statistics are only meaningful on the same examples, so differing benchmark
    or id sets (e.g. evaluations run with different limits) are an error.
    """
    benches = list(suites[0])
    if any(set(s) != set(benches) for s in suites[1:]):
        raise ValueError("the models were not evaluated on the same benchmarks")
    mats = {}
    for bench in benches:
        ids = sorted(suites[0][bench])
        for s in suites[1:]:
            if set(s[bench]) != set(ids):
                raise ValueError(f"{bench}: the models were not evaluated on the same examples")
        mats[bench] = np.array([[float(s[bench][i]) for s in suites] for i in ids], dtype=float).reshape(len(ids), -1)
    return mats


def bootstrap_ci(
    correct: Sequence[float] | np.ndarray, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(score %, lo %, hi %): percentile bootstrap over one benchmark's test examples."""
    return _stratified([_column(correct)], [1.0], n_boot, seed, level)


def overall_ci(
    per_benchmark: Mapping[str, Sequence[float]], n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(overall %, lo %, hi %): the mean of benchmark scores, resampled within each benchmark."""
    return _stratified([_column(v) for v in per_benchmark.values()], [1.0], n_boot, seed, level)


def mcnemar_exact(b01: int, b10: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(b01 + b10, 1/2) test on the discordant pairs."""
    n = b01 + b10
    tail = sum(math.comb(n, k) for k in range(min(b01, b10) + 1))
    return min(1.0, float(2 * tail / 2**n))


def _sign_flip_p(mats: Sequence[np.ndarray], n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided paired permutation p-value for mean_b(mean(a - b)), one sign flip per example.

    Only nonzero differences change under a flip, and the k differences of one magnitude v
    flip to v·(2·Binomial(k, 1/2) − k) in sum: the same distribution as flipping each one.
    With 0/1 outcomes that is one binomial per benchmark over its discordant examples;
    seed-averaged outcomes (fractions) have a few magnitudes more.
    """
    diffs = [m[:, 0] - m[:, 1] for m in mats]
    observed = np.mean([d.mean() for d in diffs])
    flipped = np.zeros(n_perm)
    for d in diffs:
        magnitudes, counts = np.unique(np.abs(d[d != 0]), return_counts=True)
        for v, k in zip(magnitudes, counts):
            flipped += v * (2 * rng.binomial(k, 0.5, size=n_perm) - k) / len(d)
    flipped /= len(diffs)
    extreme = np.count_nonzero(np.abs(flipped) >= abs(observed) - 1e-12)
    return float((1 + extreme) / (1 + n_perm))


def _discordant(m: np.ndarray) -> tuple[float, float]:
    """(b10, b01) of a [n, 2] credit matrix: the credit the first has over the second,
    summed over examples, and the reverse. With 0/1 outcomes these are the counts of
    examples the first gets right and the second wrong, and the reverse."""
    d = m[:, 0] - m[:, 1]
    return _whole(np.clip(d, 0, None).sum()), _whole(np.clip(-d, 0, None).sum())


def _whole(x: float) -> float | int:
    """An int when the sum of credits is whole (always, for 0/1 outcomes): counts read as counts."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def paired_overall_test(
    a: Suite, b: Suite, n_perm: int = 10000, seed: int = 0, n_boot: int = 10000, level: float = 0.95
) -> dict[str, float | int]:
    """Overall (mean over benchmarks) score difference a − b on the same examples.

    diff_pct with a stratified paired bootstrap interval [lo, hi], the sign-flip p_value,
    and the discordant counts summed over benchmarks: b10 (a right, b wrong) and b01
    (a wrong, b right). No McNemar p here: the overall weights benchmarks, not examples.
    """
    mats = list(_aligned([a, b]).values())
    diff, lo, hi = _stratified(mats, [1.0, -1.0], n_boot, seed, level)
    p = _sign_flip_p(mats, n_perm, np.random.default_rng([seed, 1]))
    b10, b01 = (_whole(x) for x in np.sum([_discordant(m) for m in mats], axis=0))
    return {
        "diff_pct": diff,
        "lo": lo,
        "hi": hi,
        "p_value": p,
        "b01": b01,
        "b10": b10,
        "n": int(sum(len(m) for m in mats)),
    }


def paired_test(
    a: Correct, b: Correct, n_perm: int = 10000, seed: int = 0, n_boot: int = 10000, level: float = 0.95
) -> dict[str, float | int | None]:
    """Score difference a − b on one benchmark's examples: paired bootstrap [lo, hi],
    sign-flip p_value, McNemar counts b10 (a right, b wrong), b01 and their exact p
    (None when an outcome is a tie's share: McNemar's test needs 0/1 outcomes)."""
    result = paired_overall_test({"_": a}, {"_": b}, n_perm, seed, n_boot, level)
    binary = all(v in (0, 1) for v in (*a.values(), *b.values()))
    return {**result, "mcnemar_p": mcnemar_exact(int(result["b01"]), int(result["b10"])) if binary else None}


def flip_counts(after: Correct, before: Correct) -> dict[str, float | int]:
    """Examples that went wrong → right and right → wrong from `before` to `after`: the two
    sides of a net change, which a small net gain can hide when both are large. A tie's
    share counts as that share of an example (0 → ½ is half an example gained)."""
    gained, lost = _discordant(_aligned([{"_": after}, {"_": before}])["_"])
    return {"wrong_to_right": gained, "right_to_wrong": lost}


def _seed_means(models: Sequence[Sequence[Correct]]) -> np.ndarray:
    """[n, models]: each example's correctness averaged over each model's runs (its seeds),
    examples aligned by id across every run of every model."""
    if any(not runs for runs in models):
        raise ValueError("pooling needs at least one run per model")
    mat = _aligned([{"_": r} for runs in models for r in runs])["_"]
    ends = np.cumsum([len(runs) for runs in models])
    return np.column_stack([mat[:, end - len(runs) : end].mean(axis=1) for runs, end in zip(models, ends)])


def pooled_ci(
    runs: Sequence[Correct], n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(score %, lo %, hi %) of one model over its seeds: each example's correctness is
    averaged over the seeds, and the percentile bootstrap redraws examples (seeds held fixed)."""
    return _stratified([_seed_means([runs])], [1.0], n_boot, seed, level)


def pooled_paired_test(
    a: Sequence[Correct],
    b: Sequence[Correct],
    n_perm: int = 10000,
    seed: int = 0,
    n_boot: int = 10000,
    level: float = 0.95,
) -> dict[str, float | int]:
    """Score difference of model A (runs `a`, one per seed) and model B (runs `b`), pooled over seeds.

    The estimator: every example i gets ā(i), its correctness averaged over A's seeds, and
    b̄(i) over B's (the two may have different seed counts, and need not share seeds); the
    difference is 100 · mean_i (ā(i) − b̄(i)), which equals A's seed-mean score minus B's.
    The interval is a percentile bootstrap that redraws examples with replacement, each
    carrying its pair (ā(i), b̄(i)): it measures the sampling of examples, with the seeds
    held fixed, so seed-to-seed variation enters through the averaging only, not as a
    variance component of its own (few seeds cannot estimate one). p_value flips the sign
    of each example's difference ā(i) − b̄(i). With one run on each side this is
    `paired_test`'s difference, interval and p-value.
    """
    pooled = _seed_means([a, b])
    diff, lo, hi = _stratified([pooled], [1.0, -1.0], n_boot, seed, level)
    p = _sign_flip_p([pooled], n_perm, np.random.default_rng([seed, 1]))
    return {"diff_pct": diff, "lo": lo, "hi": hi, "p_value": p, "n": len(pooled), "seeds_a": len(a), "seeds_b": len(b)}


def seed_summary(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with n − 1) over seeds; with one seed the std is 0.0, which
    means "not estimated", not "no spread"; callers should say so."""
    if not values:
        raise ValueError("seed_summary needs at least one value")
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def interaction(
    base: Suite, a: Suite, b: Suite, ab: Suite, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """gain(A+B) − gain(A) − gain(B), gains over `base`, on the overall (mean over benchmarks) score.

    The four models' answers to each example are resampled jointly (stratified by
    benchmark), so the interval reflects the pairing. For one benchmark pass one-entry
    suites. 0 means the components add up; > 0 they help each other.
    """
    mats = list(_aligned([base, a, b, ab]).values())
    gains = {
        name: _estimate(mats, w)
        for name, w in (("gain_a", [-1, 1, 0, 0]), ("gain_b", [-1, 0, 1, 0]), ("gain_ab", [-1, 0, 0, 1]))
    }
    value, lo, hi = _stratified(mats, [1.0, -1.0, -1.0, 1.0], n_boot, seed, level)
    return {**gains, "interaction": value, "lo": lo, "hi": hi}
