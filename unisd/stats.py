"""Honest statistics over per-example correctness: bootstrap intervals, paired tests,
seed spread and component interactions.

Scores are percentages. The overall score is the mean of the benchmark scores (SPEC §4),
so its resampling is stratified: examples are redrawn within each benchmark and the
benchmark means averaged. Comparisons between models are paired: every model answers
the same example ids, and an example is redrawn with all of its models' answers.

Resampling n examples with replacement is a multinomial draw over the distinct rows
of the [n, models] correctness matrix (at most 2^models patterns), so the bootstrap is
exact and cheap however large the split. Everything is seeded.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

Correct = Mapping[str, bool]  # example id -> correct, one benchmark
Suite = Mapping[str, Correct]  # benchmark -> per-example correctness


def _boot_means(rows: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, m] column means of `rows` ([n, m]) over resamples of its rows."""
    patterns, counts = np.unique(rows, axis=0, return_counts=True)
    n = len(rows)
    draws = rng.multinomial(n, counts / n, size=n_boot)
    return draws @ patterns / n


def _estimate(mats: Sequence[np.ndarray], weights: Sequence[float]) -> float:
    """mean_b(w · column means of mats[b]), in percent: a contrast of overall scores."""
    if not mats or any(len(m) == 0 for m in mats):
        raise ValueError("every benchmark needs at least one example")
    return 100 * float(np.mean([m.mean(axis=0) @ np.asarray(weights, dtype=float) for m in mats]))


def _stratified(mats: Sequence[np.ndarray], weights: Sequence[float], n_boot: int, seed: int,
                level: float) -> tuple[float, float, float]:
    """The contrast with its percentile interval, examples redrawn within each benchmark."""
    estimate = _estimate(mats, weights)
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float)
    boot = np.mean([_boot_means(m, n_boot, rng) @ w for m in mats], axis=0)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return estimate, 100 * float(lo), 100 * float(hi)


def _column(correct: Sequence[bool] | np.ndarray) -> np.ndarray:
    return np.asarray(correct, dtype=float).reshape(-1, 1)


def _aligned(suites: Sequence[Suite]) -> dict[str, np.ndarray]:
    """Per benchmark, the [n, models] correctness matrix over the shared example ids.

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
        mats[bench] = np.array([[bool(s[bench][i]) for s in suites] for i in ids], dtype=float).reshape(len(ids), -1)
    return mats


def bootstrap_ci(correct: Sequence[bool] | np.ndarray, n_boot: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(score %, lo %, hi %): percentile bootstrap over one benchmark's test examples."""
    return _stratified([_column(correct)], [1.0], n_boot, seed, level)


def overall_ci(per_benchmark: Mapping[str, Sequence[bool]], n_boot: int = 10000, seed: int = 0,
               level: float = 0.95) -> tuple[float, float, float]:
    """(overall %, lo %, hi %): the mean of benchmark scores, resampled within each benchmark."""
    return _stratified([_column(v) for v in per_benchmark.values()], [1.0], n_boot, seed, level)


def mcnemar_exact(b01: int, b10: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(b01 + b10, 1/2) test on the discordant pairs."""
    n = b01 + b10
    tail = sum(math.comb(n, k) for k in range(min(b01, b10) + 1))
    return min(1.0, 2 * tail / 2**n)


def _sign_flip_p(mats: Sequence[np.ndarray], n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided paired permutation p-value for mean_b(mean(a - b)), one sign flip per example.

    With 0/1 outcomes only discordant examples (d = ±1) change under a flip, and a
    randomly flipped ±1 is a fair coin, so a benchmark's flipped sum is 2·Binomial(k, 1/2) − k
    for its k discordant examples: the same distribution as flipping each one.
    """
    diffs = [m[:, 0] - m[:, 1] for m in mats]
    observed = np.mean([d.sum() / len(d) for d in diffs])
    flipped = np.zeros(n_perm)
    for d in diffs:
        k = int(np.count_nonzero(d))
        flipped += (2 * rng.binomial(k, 0.5, size=n_perm) - k) / len(d)
    flipped /= len(diffs)
    extreme = np.count_nonzero(np.abs(flipped) >= abs(observed) - 1e-12)
    return float((1 + extreme) / (1 + n_perm))


def paired_overall_test(a: Suite, b: Suite, n_perm: int = 10000, seed: int = 0, n_boot: int = 10000,
                        level: float = 0.95) -> dict[str, float | int]:
    """Overall (mean over benchmarks) score difference a − b on the same examples.

    diff_pct with a stratified paired bootstrap interval [lo, hi], the sign-flip p_value,
    and the discordant counts summed over benchmarks: b10 (a right, b wrong) and b01
    (a wrong, b right). No McNemar p here: the overall weights benchmarks, not examples.
    """
    mats = list(_aligned([a, b]).values())
    diff, lo, hi = _stratified(mats, [1.0, -1.0], n_boot, seed, level)
    p = _sign_flip_p(mats, n_perm, np.random.default_rng([seed, 1]))
    b10 = int(sum(np.sum((m[:, 0] == 1) & (m[:, 1] == 0)) for m in mats))
    b01 = int(sum(np.sum((m[:, 0] == 0) & (m[:, 1] == 1)) for m in mats))
    return {"diff_pct": diff, "lo": lo, "hi": hi, "p_value": p, "b01": b01, "b10": b10,
            "n": int(sum(len(m) for m in mats))}


def paired_test(a: Correct, b: Correct, n_perm: int = 10000, seed: int = 0, n_boot: int = 10000,
                level: float = 0.95) -> dict[str, float | int]:
    """Score difference a − b on one benchmark's examples: paired bootstrap [lo, hi],
    sign-flip p_value, McNemar counts b10 (a right, b wrong), b01 and their exact p."""
    result = paired_overall_test({"_": a}, {"_": b}, n_perm, seed, n_boot, level)
    return {**result, "mcnemar_p": mcnemar_exact(result["b01"], result["b10"])}


def seed_summary(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with n − 1) over seeds; with one seed the std is 0.0, which
    means "not estimated", not "no spread"; callers should say so."""
    if not values:
        raise ValueError("seed_summary needs at least one value")
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def interaction(base: Suite, a: Suite, b: Suite, ab: Suite, n_boot: int = 10000, seed: int = 0,
                level: float = 0.95) -> dict[str, float]:
    """gain(A+B) − gain(A) − gain(B), gains over `base`, on the overall (mean over benchmarks) score.

    The four models' answers to each example are resampled jointly (stratified by
    benchmark), so the interval reflects the pairing. For one benchmark pass one-entry
    suites. 0 means the components add up; > 0 they help each other.
    """
    mats = list(_aligned([base, a, b, ab]).values())
    gains = {name: _estimate(mats, w)
             for name, w in (("gain_a", [-1, 1, 0, 0]), ("gain_b", [-1, 0, 1, 0]), ("gain_ab", [-1, 0, 0, 1]))}
    value, lo, hi = _stratified(mats, [1.0, -1.0, -1.0, 1.0], n_boot, seed, level)
    return {**gains, "interaction": value, "lo": lo, "hi": hi}
