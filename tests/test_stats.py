"""sorsa/tools/stats.py against values computed by hand: t intervals, McNemar's exact p, Holm's correction, and the
paired bootstrap against the exact distribution of small cases enumerated here."""
import itertools
import math

import pytest

from sorsa.tools.stats import holm, mcnemar_exact, mean_ci, paired_bootstrap


def test_mean_ci_is_the_student_t_interval():
    # n = 3: mean 70, sd 10, t_{0.975, 2} = 4.3027 (a t table) -> half-width 4.3027 * 10 / sqrt(3) = 24.841
    ci = mean_ci([60.0, 70.0, 80.0])
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(70.0) and ci["sd"] == pytest.approx(10.0)
    assert ci["half_width"] == pytest.approx(4.3027 * 10 / math.sqrt(3), rel=2e-5)
    assert (ci["low"], ci["high"]) == pytest.approx((70 - 24.841, 70 + 24.841), abs=1e-3)
    # n = 2: t_{0.975, 1} = 12.7062; sd of (0.5, 1.5) = 1/sqrt(2) -> half-width 12.7062 / 2
    assert mean_ci([0.5, 1.5])["half_width"] == pytest.approx(12.7062 / 2, rel=2e-5)
    # 90 %: t_{0.95, 2} = 2.9200
    assert mean_ci([60.0, 70.0, 80.0], 0.90)["half_width"] == pytest.approx(2.9200 * 10 / math.sqrt(3), rel=2e-5)
    one = mean_ci([42.0])
    assert one["mean"] == 42.0 and math.isnan(one["half_width"]) and math.isnan(one["sd"])
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])


def test_mcnemar_exact_p_by_hand():
    # 8 items only A gets right, 2 only B, 10 concordant: p = 2 * P(X <= 2 | n=10, 1/2) = 2 * 56 / 1024
    a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 5
    result = mcnemar_exact(a, b)
    assert (result["a_only"], result["b_only"]) == (8, 2)
    assert result["p"] == pytest.approx(112 / 1024, rel=1e-12)
    # pooled over seeds: the same counts split over two rows give the same p
    assert mcnemar_exact([a[:10], a[10:]], [b[:10], b[10:]])["p"] == pytest.approx(112 / 1024, rel=1e-12)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p"] == 1.0  # no discordant pair
    assert mcnemar_exact([1, 1, 1, 1, 1], [0, 0, 0, 0, 0])["p"] == pytest.approx(2 / 32)  # 2 * (1/2)^5


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 * 0.8 capped at 1, and monotone after it
    assert holm([0.02, 0.3]) == pytest.approx([0.04, 0.3])
    assert holm([0.6, 0.7, 0.9]) == pytest.approx([1.0, 1.0, 1.0])


def test_paired_bootstrap_one_seed_matches_the_exact_distribution():
    # D = a - b = [1, 1, 1, 0], d = 0.75. Resampling 4 items: d* = K/4 with K ~ Binomial(4, 3/4).
    # p = P(|d* - 0.75| >= 0.75) = P(K = 0) = 1/256; percentile interval: 2.5 % -> K = 1, 97.5 % -> K = 4.
    result = paired_bootstrap([[1, 1, 1, 0]], [[0, 0, 0, 0]], samples=40000, seed=1)
    assert result["diff"] == 0.75 and (result["seeds"], result["items"]) == (1, 4)
    assert result["p"] == pytest.approx(1 / 256, abs=0.0015)
    assert (result["low"], result["high"]) == (0.25, 1.0)
    # the same seed gives the same numbers
    assert paired_bootstrap([[1, 1, 1, 0]], [[0, 0, 0, 0]], samples=40000, seed=1) == result


def test_paired_bootstrap_two_seeds_matches_enumeration():
    # D rows (seeds) [1, 0] and [1, 1]: each replicate draws 2 of the rows and 2 of the columns with replacement;
    # all 16 draws are equally likely, so the exact p and mean are enumerated here.
    a, b = [[1, 0], [1, 1]], [[0, 0], [0, 0]]
    D = [[1, 0], [1, 1]]
    d = 0.75
    stats = []
    for rows in itertools.product(range(2), repeat=2):
        for cols in itertools.product(range(2), repeat=2):
            stats.append(sum(D[r][c] for r in rows for c in cols) / 4)
    exact_p = sum(abs(s - d) >= d for s in stats) / len(stats)  # d* = 0 only when row 0 twice and column 1 twice
    assert exact_p == pytest.approx(1 / 16)
    result = paired_bootstrap(a, b, samples=40000, seed=3)
    assert result["diff"] == d
    assert result["p"] == pytest.approx(exact_p, abs=0.006)
    # d* takes 0, 0.5, 0.75, 1 with 1, 4, 4, 7 of the 16 draws: P(d* = 0) = 1/16 > 2.5 %, P(d* = 1) = 7/16
    assert (result["low"], result["high"]) == (0.0, 1.0)


def test_paired_bootstrap_identical_methods_and_bad_shapes():
    same = paired_bootstrap([[1, 0, 1], [0, 0, 1]], [[1, 0, 1], [0, 0, 1]], samples=200)
    assert same["diff"] == 0.0 and same["p"] == 1.0 and (same["low"], same["high"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap([[1, 0]], [[1, 0, 1]])
