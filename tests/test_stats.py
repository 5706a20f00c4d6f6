"""unisd.stats against independent computations: analytic widths, a naive bootstrap,
hand-counted McNemar tables, scipy's binomial test, hand-worked overall scores, and a
brute-force enumeration of every resample and sign flip of a tiny pooled case."""

import itertools
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest

from unisd.stats import (
    bootstrap_ci,
    flip_counts,
    interaction,
    mcnemar_exact,
    overall_ci,
    paired_overall_test,
    paired_test,
    pooled_ci,
    pooled_paired_test,
    seed_summary,
)


def _ids(values) -> dict[str, bool]:
    return {f"q{i}": bool(v) for i, v in enumerate(values)}


def test_bootstrap_ci_contains_mean_with_normal_width():
    x = np.array([1] * 120 + [0] * 180)  # p = 0.4, n = 300
    mean, lo, hi = bootstrap_ci(x)
    assert mean == pytest.approx(40.0) and lo < 40.0 < hi
    analytic = 2 * 1.96 * math.sqrt(0.4 * 0.6 / 300) * 100
    assert hi - lo == pytest.approx(analytic, rel=0.1)


def test_bootstrap_ci_matches_naive_resampling():
    """The multinomial shortcut gives the same interval as redrawing indices."""
    x = np.random.default_rng(1).random(80) < 0.3
    rng = np.random.default_rng(2)
    naive = [x[rng.integers(0, len(x), len(x))].mean() * 100 for _ in range(4000)]
    _, lo, hi = bootstrap_ci(x, n_boot=4000, seed=3)
    assert lo == pytest.approx(np.quantile(naive, 0.025), abs=1.5)
    assert hi == pytest.approx(np.quantile(naive, 0.975), abs=1.5)


def test_bootstrap_is_seeded():
    x = [1, 0, 0, 1, 1, 0, 1]
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)


def test_overall_is_mean_of_benchmark_means():
    # 3/4 = 75 and 1/3 = 33.3: overall 54.17, not the pooled 4/7 = 57.1
    mean, lo, hi = overall_ci({"a": [1, 0, 1, 1], "b": [0, 0, 1]})
    assert mean == pytest.approx((75.0 + 100 / 3) / 2) and lo <= mean <= hi


def test_overall_ci_is_stratified():
    """Width of the mean of two independent benchmark means: sqrt(v1/n1 + v2/n2) / 2."""
    per_bench = {"a": [1] * 50 + [0] * 150, "b": [1] * 300 + [0] * 100}
    _, lo, hi = overall_ci(per_bench)
    se = math.sqrt(0.25 * 0.75 / 200 + 0.75 * 0.25 / 400) / 2
    assert hi - lo == pytest.approx(2 * 1.96 * se * 100, rel=0.1)


def test_mcnemar_counts_by_hand():
    a = _ids([1, 1, 0, 0, 1, 1])
    b = _ids([1, 0, 1, 0, 0, 1])
    result = paired_test(a, b)
    assert (result["b10"], result["b01"], result["n"]) == (2, 1, 6)  # a-only right: q1, q4; b-only: q2
    assert result["diff_pct"] == pytest.approx(100 / 6)
    assert result["mcnemar_p"] == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_sign_flip_p_matches_exact_mcnemar():
    """For 0/1 outcomes the sign-flip test is McNemar's exact test, up to Monte Carlo error."""
    scipy_stats = pytest.importorskip("scipy.stats")
    a = _ids([1] * 18 + [0] * 7 + [1] * 40 + [0] * 35)
    b = _ids([0] * 18 + [1] * 7 + [1] * 40 + [0] * 35)
    result = paired_test(a, b, n_perm=20000)
    exact = scipy_stats.binomtest(7, 25, 0.5).pvalue
    assert result["mcnemar_p"] == pytest.approx(exact)
    assert result["p_value"] == pytest.approx(exact, abs=0.01)


def test_clearly_better_model_is_significant():
    rng = np.random.default_rng(0)
    b = rng.random(200) < 0.4
    a = b | (rng.random(200) < 0.4)  # a fixes many of b's errors and breaks none
    result = paired_test(_ids(a), _ids(b))
    assert result["p_value"] < 0.001 and result["lo"] > 0 and result["b01"] == 0


def test_identical_models_and_null_p_values():
    same = _ids(np.random.default_rng(0).random(100) < 0.5)
    result = paired_test(same, same)
    assert result["diff_pct"] == 0 and result["p_value"] == 1.0 and result["lo"] == result["hi"] == 0
    # two independent models of equal accuracy: p-values roughly uniform (a discrete test is
    # conservative, so their mean sits a little above 1/2)
    rng = np.random.default_rng(1)
    ps = [
        paired_test(_ids(rng.random(60) < 0.5), _ids(rng.random(60) < 0.5), n_perm=500, n_boot=100, seed=i)["p_value"]
        for i in range(150)
    ]
    assert 0.4 < np.mean(ps) < 0.75 and np.mean(np.array(ps) < 0.05) < 0.1


def test_paired_overall_is_mean_of_benchmark_differences():
    a = {"x": _ids([1, 1, 1, 0]), "y": _ids([1, 0])}
    b = {"x": _ids([1, 0, 0, 0]), "y": _ids([1, 1])}
    result = paired_overall_test(a, b)
    assert result["diff_pct"] == pytest.approx((50.0 - 50.0) / 2)
    assert (result["b10"], result["b01"], result["n"]) == (2, 1, 6)
    assert result["lo"] <= result["diff_pct"] <= result["hi"]


def test_paired_tests_need_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_test(_ids([1, 0, 1]), _ids([1, 0]))
    with pytest.raises(ValueError, match="same benchmarks"):
        paired_overall_test({"x": _ids([1])}, {"y": _ids([1])})


def test_seed_summary():
    assert seed_summary([1.0, 2.0, 3.0]) == pytest.approx((2.0, statistics.stdev([1.0, 2.0, 3.0])))
    assert seed_summary([4.0]) == (4.0, 0.0)


def _fixes(n: int, fixed: set[int]) -> dict[str, bool]:
    return _ids([i in fixed for i in range(n)])


def test_interaction_of_additive_components_is_zero():
    """A fixes examples 0-9, B fixes 10-14, A+B fixes both: gains add up exactly."""
    n, fa, fb = 50, set(range(10)), set(range(10, 15))
    suites = [{"s": _fixes(n, f)} for f in (set(), fa, fb, fa | fb)]
    result = interaction(*suites)
    assert (result["gain_a"], result["gain_b"], result["gain_ab"]) == pytest.approx((20.0, 10.0, 30.0))
    assert result["interaction"] == pytest.approx(0.0, abs=1e-9)
    assert result["lo"] == pytest.approx(0.0, abs=1e-9) and result["hi"] == pytest.approx(0.0, abs=1e-9)


def test_interaction_of_synergistic_components_is_positive():
    """A+B also fixes 20 examples that neither fixes alone."""
    n, fa, fb = 100, set(range(10)), set(range(10, 20))
    suites = [{"s": _fixes(n, f)} for f in (set(), fa, fb, fa | fb | set(range(20, 40)))]
    result = interaction(*suites)
    assert result["interaction"] == pytest.approx(20.0) and result["lo"] > 0


def test_flip_counts_by_hand():
    before = _ids([1, 1, 0, 0, 1, 0])
    after = _ids([1, 0, 1, 1, 1, 0])  # q2, q3 gained; q1 lost
    assert flip_counts(after, before) == {"wrong_to_right": 2, "right_to_wrong": 1}
    with pytest.raises(ValueError, match="same examples"):
        flip_counts(_ids([1, 0]), _ids([1, 0, 1]))


def test_pooled_estimate_by_hand():
    """Three seeds of A against one of B: A's seed-mean score minus B's."""
    a = [_ids([1, 1, 0, 0]), _ids([1, 0, 0, 0]), _ids([1, 1, 1, 0])]  # 50, 25, 75: mean 50
    b = [_ids([0, 1, 0, 0])]  # 25
    result = pooled_paired_test(a, b, n_boot=500, n_perm=500)
    assert result["diff_pct"] == pytest.approx(25.0)
    assert (result["n"], result["seeds_a"], result["seeds_b"]) == (4, 3, 1)
    assert pooled_ci(a, n_boot=500)[0] == pytest.approx(50.0)


# A (two seeds) against B (two seeds) on five examples; per example ā − b̄ = 1, 1, −½, −½, ½
POOLED_A = [_ids([1, 1, 0, 0, 1]), _ids([1, 1, 0, 1, 0])]
POOLED_B = [_ids([0, 0, 0, 1, 0]), _ids([0, 0, 1, 1, 0])]


def _exact_quantile(values: list[Fraction], q: float) -> Fraction:
    """The smallest value whose CDF reaches q, checked to be far from a CDF step so a
    Monte Carlo percentile lands on it."""
    atoms = sorted(set(values))
    cdf = [sum(v <= x for v in values) / len(values) for x in atoms]
    i = next(i for i, c in enumerate(cdf) if c >= q)
    assert cdf[i] - q > 0.005 and q - (cdf[i - 1] if i else 0.0) > 0.005
    return atoms[i]


def test_pooled_paired_test_matches_enumeration():
    """Every one of the 5^5 equally likely resamples of the examples, and every sign flip."""
    diffs = [
        Fraction(sum(a[q] for a in POOLED_A), 2) - Fraction(sum(b[q] for b in POOLED_B), 2) for q in sorted(POOLED_A[0])
    ]
    assert diffs == [1, 1, Fraction(-1, 2), Fraction(-1, 2), Fraction(1, 2)]
    n = len(diffs)
    means = [sum(diffs[i] for i in draw) / n for draw in itertools.product(range(n), repeat=n)]
    observed = sum(diffs) / n
    flips = [sum(s * d for s, d in zip(signs, diffs)) / n for signs in itertools.product((1, -1), repeat=n)]
    p_exact = sum(abs(f) >= abs(observed) for f in flips) / len(flips)

    result = pooled_paired_test(POOLED_A, POOLED_B, n_boot=100000, n_perm=100000, seed=7)
    assert result["diff_pct"] == pytest.approx(100 * float(observed))  # 30: 60 − 30
    assert result["lo"] == pytest.approx(100 * float(_exact_quantile(means, 0.025)))
    assert result["hi"] == pytest.approx(100 * float(_exact_quantile(means, 0.975)))
    assert result["p_value"] == pytest.approx(p_exact, abs=0.01)


def test_pooled_with_one_seed_is_the_paired_test():
    rng = np.random.default_rng(3)
    a, b = _ids(rng.random(50) < 0.6), _ids(rng.random(50) < 0.4)
    pooled, paired = pooled_paired_test([a], [b], n_boot=2000, n_perm=2000), paired_test(a, b, n_boot=2000, n_perm=2000)
    assert [pooled[k] for k in ("diff_pct", "lo", "hi", "p_value")] == pytest.approx(
        [paired[k] for k in ("diff_pct", "lo", "hi", "p_value")]
    )
    assert pooled_ci([a], n_boot=2000) == pytest.approx(bootstrap_ci(list(a.values()), n_boot=2000))


def test_pooling_needs_the_same_examples_and_a_run():
    with pytest.raises(ValueError, match="same examples"):
        pooled_paired_test([_ids([1, 0])], [_ids([1, 0, 1])])
    with pytest.raises(ValueError, match="at least one run"):
        pooled_paired_test([], [_ids([1])])


def test_tie_credits_by_hand():
    """A metric that splits a two-way tie gives half a credit; McNemar needs 0/1 and says nothing."""
    a = {"q0": 1.0, "q1": 0.5, "q2": 0.0, "q3": 0.5}
    b = {"q0": 0.0, "q1": 1.0, "q2": 0.0, "q3": 0.5}
    result = paired_test(a, b, n_boot=500, n_perm=500)
    assert result["diff_pct"] == pytest.approx(100 * (1 - 0.5) / 4)
    assert (result["b10"], result["b01"], result["mcnemar_p"]) == (1, 0.5, None)
    assert flip_counts(a, b) == {"wrong_to_right": 1, "right_to_wrong": 0.5}
    assert bootstrap_ci(list(a.values()), n_boot=500)[0] == pytest.approx(50.0)
