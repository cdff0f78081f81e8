"""Tests of `dpo_cluster.stats` against values worked out by hand.

Throughout, z = 1.959963984540054 (the 95% normal quantile), z^2 = 3.8414588206941254, and the
Wilson interval of a proportion p = s/n is
    center = (p + z^2/(2n)) / (1 + z^2/n),  half = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n).
"""

from __future__ import annotations

import math

import pytest

from dpo_cluster.stats import bradley_terry_two, online_elo, rate_with_ci, wilson_interval


def test_wilson_8_of_10() -> None:
    """p = 0.8, z^2/n = 0.384146, 1 + z^2/n = 1.384146.
    center = (0.8 + 0.192073) / 1.384146 = 0.716740
    half = 1.959964 * sqrt(0.016 + 0.0096037) / 1.384146 = 1.959964 * 0.160011 / 1.384146 = 0.226578
    -> (0.490162, 0.943318), the textbook (0.4902, 0.9433)."""
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert low == pytest.approx(0.490162, abs=1e-6)
    assert high == pytest.approx(0.943318, abs=1e-6)


def test_wilson_edges() -> None:
    """0/0: nothing known -> (0, 1).
    0/5: p = 0, center = half = (z^2/10) / (1 + z^2/5), so low = 0 exactly and
        high = (z^2/5) / (1 + z^2/5) = z^2 / (5 + z^2) = 3.841459 / 8.841459 = 0.434482.
    5/5: mirrored, low = 5 / (5 + z^2) = 5 / 8.841459 = 0.565518, high = 1 exactly."""
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 5)
    assert low == 0.0
    assert high == pytest.approx(0.434482, abs=1e-6)
    low, high = wilson_interval(5, 5)
    assert low == pytest.approx(0.565518, abs=1e-6)
    assert high == 1.0


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="must not exceed"):
        wilson_interval(6, 5)
    with pytest.raises(ValueError, match=">= 0"):
        wilson_interval(-1, 5)
    with pytest.raises(ValueError, match="expected an int"):
        wilson_interval(1.0, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z"):
        wilson_interval(1, 5, z=0.0)


def test_rate_with_ci() -> None:
    """6/8 = 0.75; z^2/n = 0.480182, 1 + z^2/n = 1.480182.
    center = (0.75 + 0.240091) / 1.480182 = 0.668898
    half = 1.959964 * sqrt(0.0234375 + 0.0150057) / 1.480182 = 1.959964 * 0.196070 / 1.480182 = 0.259623
    -> (0.409275, 0.928521)."""
    result = rate_with_ci(6, 8)
    assert set(result) == {"successes", "n", "rate", "ci_low", "ci_high", "method"}
    assert result["successes"] == 6 and result["n"] == 8 and result["method"] == "wilson"
    assert result["rate"] == 0.75
    assert result["ci_low"] == pytest.approx(0.409275, abs=1e-5)
    assert result["ci_high"] == pytest.approx(0.928521, abs=1e-5)
    empty = rate_with_ci(0, 0)
    assert empty["rate"] is None
    assert (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)


def test_bradley_terry_closed_form() -> None:
    """6 wins, 2 losses, 2 ties, plus one virtual tie:
    p = (6 + 2/2 + 0.5) / (10 + 1) = 7.5 / 11 = 0.681818
    diff = 400 * log10(0.681818 / 0.318182) = 400 * log10(2.142857) = 400 * 0.330993 = 132.397
    ratings 1000 +- 66.199 -> 1066.199 and 933.801.
    Wilson on 7.5 of 11: z^2/n = 0.349224, center = (0.681818 + 0.174612) / 1.349224 = 0.634758,
    half = 1.959964 * sqrt(0.0197221 + 0.0079368) / 1.349224 = 0.241592 -> p in (0.393166, 0.876349)
    diff_low = 400 * log10(0.393166 / 0.606834) = 400 * log10(0.647897) = -75.398
    diff_high = 400 * log10(0.876349 / 0.123651) = 400 * log10(7.087290) = 340.192."""
    rating_a, rating_b, diff_low, diff_high = bradley_terry_two(6, 2, 2)
    assert rating_a - rating_b == pytest.approx(132.397, abs=1e-3)
    assert rating_a == pytest.approx(1066.199, abs=1e-3)
    assert rating_b == pytest.approx(933.801, abs=1e-3)
    assert diff_low == pytest.approx(-75.398, abs=1e-3)
    assert diff_high == pytest.approx(340.192, abs=1e-3)


def test_bradley_terry_symmetry() -> None:
    """Swapping the players mirrors everything: p -> 1 - p, so diff -> -diff and the interval
    (lo, hi) -> (-hi, -lo)."""
    a = bradley_terry_two(6, 2, 2)
    b = bradley_terry_two(2, 6, 2)
    assert b[0] == pytest.approx(a[1], abs=1e-9)
    assert b[1] == pytest.approx(a[0], abs=1e-9)
    assert b[2] == pytest.approx(-a[3], abs=1e-9)
    assert b[3] == pytest.approx(-a[2], abs=1e-9)


def test_bradley_terry_ties_count_half() -> None:
    """Only the points (wins + ties/2) and the number of games enter the estimate:
    2 wins, 0 losses, 2 ties: p = (2 + 2/2 + 0.5) / (4 + 1) = 3.5 / 5 = 0.7
    3 wins, 1 loss, 0 ties:   p = (3 + 0 + 0.5) / (4 + 1) = 3.5 / 5 = 0.7
    -> both diff = 400 * log10(0.7 / 0.3) = 400 * 0.367977 = 147.191."""
    with_ties = bradley_terry_two(2, 0, 2)
    decisive = bradley_terry_two(3, 1, 0)
    assert with_ties[0] - with_ties[1] == pytest.approx(147.191, abs=1e-3)
    assert decisive[0] - decisive[1] == pytest.approx(147.191, abs=1e-3)


def test_bradley_terry_all_one_way_is_finite() -> None:
    """10-0: p = (10 + 0.5) / 11 = 0.954545, diff = 400 * log10(10.5 / 0.5) = 400 * log10(21)
    = 400 * 1.322219 = 528.888 -> ratings 1264.444 and 735.556.
    Wilson on 10.5 of 11: center = (0.954545 + 0.174612) / 1.349224 = 0.836894, half = 0.158342
    -> p in (0.678552, 0.995236); diff_low = 400 * log10(2.110924) = 129.789,
    diff_high = 400 * log10(208.913) = 927.986."""
    rating_a, rating_b, diff_low, diff_high = bradley_terry_two(10, 0, 0)
    assert all(math.isfinite(x) for x in (rating_a, rating_b, diff_low, diff_high))
    assert rating_a == pytest.approx(1264.444, abs=1e-3)
    assert rating_b == pytest.approx(735.556, abs=1e-3)
    assert diff_low == pytest.approx(129.789, abs=1e-3)
    assert diff_high == pytest.approx(927.986, abs=1e-3)


def test_bradley_terry_no_games() -> None:
    """0 games: p = 0.5 / 1 = 1/2 -> equal ratings. Wilson on 0.5 of 1: center = 1/2,
    half = z * sqrt(1/4 + z^2/4) / (1 + z^2) = z / (2 * sqrt(1 + z^2)) = 1.959964 / 4.400213 = 0.445379
    -> p in (0.054621, 0.945379); diff = +-400 * log10(0.945379 / 0.054621) = +-400 * log10(17.308059)
    = +-495.299."""
    rating_a, rating_b, diff_low, diff_high = bradley_terry_two(0, 0, 0)
    assert (rating_a, rating_b) == (1000.0, 1000.0)
    assert diff_low == pytest.approx(-495.299, abs=1e-3)
    assert diff_high == pytest.approx(495.299, abs=1e-3)


def test_bradley_terry_rejects_negative() -> None:
    with pytest.raises(ValueError, match="wins_b"):
        bradley_terry_two(1, -1, 0)


def test_online_elo_two_games() -> None:
    """Game 1, a beats b: ea = 1/(1 + 10^0) = 0.5; a = 1000 + 4 * 0.5 = 1002,
    b = 1000 + 4 * (0 - 0.5) = 998.
    Game 2, listed as (b, a), b beats a: ra = 998 (b), rb = 1002 (a);
    ea = 1/(1 + 10^(4/400)) = 1/(1 + 1.023293) = 0.494244;
    b = 998 + 4 * (1 - 0.494244) = 998 + 2.023025 = 1000.023025,
    a = 1002 + 4 * (1 - 1 - 0.505756) = 1002 - 2.023025 = 999.976975."""
    ratings = online_elo([("a", "b", 1.0), ("b", "a", 1.0)])
    assert list(ratings) == ["a", "b"]
    assert ratings["a"] == pytest.approx(999.976975, abs=1e-6)
    assert ratings["b"] == pytest.approx(1000.023025, abs=1e-6)


def test_online_elo_tie_and_parameters() -> None:
    """A tie between equals changes nothing: ea = 0.5 = score. Then with k=32, init=1500, a wins:
    a = 1500 + 32 * 0.5 = 1516, b = 1484."""
    assert online_elo([("a", "b", 0.5)]) == {"a": 1000.0, "b": 1000.0}
    assert online_elo([("a", "b", 1)], k=32, init=1500) == {"a": 1516.0, "b": 1484.0}
    assert online_elo([]) == {}
    with pytest.raises(ValueError, match="score_a"):
        online_elo([("a", "b", 2.0)])
    with pytest.raises(ValueError, match="itself"):
        online_elo([("a", "a", 1.0)])
