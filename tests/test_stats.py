"""unisd.stats against independent computations: analytic widths, a naive bootstrap,
hand-counted McNemar tables, scipy's binomial test, hand-worked overall scores."""

import math
import statistics

import numpy as np
import pytest

from unisd.stats import (bootstrap_ci, interaction, mcnemar_exact, overall_ci, paired_overall_test, paired_test,
                         seed_summary)


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
    ps = [paired_test(_ids(rng.random(60) < 0.5), _ids(rng.random(60) < 0.5), n_perm=500, n_boot=100,
                      seed=i)["p_value"] for i in range(150)]
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
