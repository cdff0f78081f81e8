"""Tests of `dpo_cluster.stats` against values worked out by hand.

Throughout, z = 1.959963984540054 (the 95% normal quantile), z^2 = 3.8414588206941254, and the
Wilson interval of a proportion p = s/n is
    center = (p + z^2/(2n)) / (1 + z^2/n),  half = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n).
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from dpo_cluster.stats import (
    ELO_INIT,
    bradley_terry,
    bradley_terry_two,
    online_elo,
    rate_with_ci,
    wilson_interval,
)

# Elo points per natural-log-odds unit: 400 / ln(10).
TO_ELO = 400.0 / math.log(10.0)


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


def _games(a: str, b: str, wins_a: int, wins_b: int, ties: int) -> list[tuple[str, str, float]]:
    """Outcome rows of a record between a and b, sides mixed so orientation is exercised."""
    rows = [(a, b, 1.0)] * wins_a + [(b, a, 1.0)] * wins_b + [(b, a, 0.5)] * ties
    return rows


def _by_model(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["model"]: row for row in rows}


@pytest.mark.parametrize(
    "wins_a, wins_b, ties", [(6, 2, 2), (10, 0, 0), (0, 7, 3), (1, 1, 0), (3, 1, 0), (0, 0, 4), (500, 20, 40)]
)
def test_bradley_terry_two_players_equals_closed_form(wins_a: int, wins_b: int, ties: int) -> None:
    """For two players the single pair carries a virtual tie of weight 1 / (2 - 1) = 1, the prior
    of `bradley_terry_two`, so Newton's maximum is its closed form: ratings equal within 1e-6."""
    rating_a, rating_b, _, _ = bradley_terry_two(wins_a, wins_b, ties)
    rows = _by_model(bradley_terry(_games("a", "b", wins_a, wins_b, ties)))
    assert rows["a"]["rating"] == pytest.approx(rating_a, abs=1e-6)
    assert rows["b"]["rating"] == pytest.approx(rating_b, abs=1e-6)
    assert rows["a"]["games"] == rows["b"]["games"] == wins_a + wins_b + ties


def test_bradley_terry_fisher_interval_by_hand() -> None:
    """6 wins, 2 losses, 2 ties plus the virtual tie: n = 11, p = 7.5 / 11 = 0.681818, ratings
    1066.199 and 933.801 (test_bradley_terry_closed_form).
    Information of the difference d = theta_a - theta_b: n p (1 - p) = 11 * 0.681818 * 0.318182
    = 2.386364, so var(d) = 0.419048; anchored on theta_a + theta_b = 0, theta_a = d / 2 and
    var(theta_a) = 0.104762, sd 0.323669 -> 0.323669 * 400 / ln 10 = 56.2267 Elo;
    1.959964 * 56.2267 = 110.2031 -> a in (955.996, 1176.402), b in (823.598, 1044.004)."""
    rows = _by_model(bradley_terry(_games("a", "b", 6, 2, 2)))
    assert rows["a"]["rating"] == pytest.approx(1066.199, abs=1e-3)
    assert (rows["a"]["ci_low"], rows["a"]["ci_high"]) == pytest.approx((955.996, 1176.402), abs=1e-3)
    assert (rows["b"]["ci_low"], rows["b"]["ci_high"]) == pytest.approx((823.598, 1044.004), abs=1e-3)


def test_bradley_terry_three_player_cycle_by_hand() -> None:
    """a beats b, b beats c, c beats a: by symmetry all rate 1000 (the mean anchor).
    Each pair: 1 game plus a virtual tie of weight 1 / (3 - 1) = 0.5, so n = 1.5 and p = 1/2,
    weight w = n p (1 - p) = 0.375. The information is the weighted Laplacian w (3 Id - J), whose
    pseudo-inverse is (Id - J/3) / (3 w): var(theta_i) = (2/3) / 1.125 = 0.592593, sd 0.769800
    -> 0.769800 * 173.717793 = 133.7280 Elo; * 1.959964 = 262.1023 -> (737.898, 1262.102)."""
    rows = bradley_terry([("a", "b", 1.0), ("b", "c", 1.0), ("c", "a", 1.0)])
    assert [row["model"] for row in rows] == ["a", "b", "c"]  # equal ratings keep first appearance
    for row in rows:
        assert row["rating"] == pytest.approx(1000.0, abs=1e-9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((737.898, 1262.102), abs=1e-3)


def _reference_loglik(theta: dict[str, float], points: dict[tuple[str, str], float]) -> float:
    """The same log-likelihood written independently: sum over ordered pairs of the points i
    scored against j times log P(i beats j)."""
    return sum(s * -math.log1p(math.exp(theta[j] - theta[i])) for (i, j), s in points.items())


def _reference_points(
    outcomes: list[tuple[str, str, float]], names: list[str]
) -> dict[tuple[str, str], float]:
    """Points of i against j, one virtual tie of weight 1 / (M - 1) per pair split in halves."""
    prior = 1.0 / (len(names) - 1)
    points = {(i, j): prior / 2.0 for i in names for j in names if i != j}
    for a, b, score in outcomes:
        points[(a, b)] += score
        points[(b, a)] += 1.0 - score
    return points


def _mm_fit(points: dict[tuple[str, str], float], names: list[str]) -> dict[str, float]:
    """Hunter (2004) MM iteration for Bradley-Terry, ties as half wins:
    gamma_i <- W_i / sum_j n_ij / (gamma_i + gamma_j), W_i the points of i, then renormalised so
    that the mean log-strength is 0. Returns natural-scale theta = log gamma."""
    gamma = dict.fromkeys(names, 1.0)
    for _ in range(20000):
        new = {}
        for i in names:
            won = sum(points[(i, j)] for j in names if j != i)
            denom = sum((points[(i, j)] + points[(j, i)]) / (gamma[i] + gamma[j]) for j in names if j != i)
            new[i] = won / denom
        mean_log = sum(math.log(g) for g in new.values()) / len(names)
        new = {k: g / math.exp(mean_log) for k, g in new.items()}
        moved = max(abs(math.log(new[k]) - math.log(gamma[k])) for k in names)
        gamma = new
        if moved < 1e-14:
            break
    return {k: math.log(g) for k, g in gamma.items()}


def test_bradley_terry_three_players_against_mm_and_finite_differences() -> None:
    """A 3-player record, fitted independently: Hunter's MM algorithm on the same points gives the
    ratings; the central finite-difference Hessian of an independently written log-likelihood,
    restricted to the sum-zero plane (basis e1 - e3, e2 - e3), gives the covariance whose diagonal
    sets the intervals."""
    names = ["x", "y", "z"]
    outcomes = (
        _games("x", "y", 7, 3, 2) + _games("y", "z", 5, 4, 1) + _games("x", "z", 6, 1, 0) + [("z", "y", 0.5)]
    )
    rows = _by_model(bradley_terry(outcomes, models=names))
    points = _reference_points(outcomes, names)
    theta = _mm_fit(points, names)
    for name in names:
        assert rows[name]["rating"] == pytest.approx(ELO_INIT + theta[name] * TO_ELO, abs=1e-6)
    assert sum(rows[name]["rating"] for name in names) / 3 == pytest.approx(ELO_INIT, abs=1e-9)

    # Hessian of L(u, v) with theta = theta_hat + (u, v, -u - v), by central differences.
    h = 1e-4

    def f(u: float, v: float) -> float:
        return _reference_loglik({"x": theta["x"] + u, "y": theta["y"] + v, "z": theta["z"] - u - v}, points)

    huu = (f(h, 0) - 2 * f(0, 0) + f(-h, 0)) / h**2
    hvv = (f(0, h) - 2 * f(0, 0) + f(0, -h)) / h**2
    huv = (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (4 * h**2)
    # Covariance of (u, v) is the inverse of -H; theta_z = -u - v.
    det = huu * hvv - huv**2
    var_u, var_v, cov_uv = -hvv / det, -huu / det, huv / det
    variances = {"x": var_u, "y": var_v, "z": var_u + var_v + 2 * cov_uv}
    for name in names:
        half = 1.959963984540054 * math.sqrt(variances[name]) * TO_ELO
        assert rows[name]["ci_low"] == pytest.approx(rows[name]["rating"] - half, abs=1e-3)
        assert rows[name]["ci_high"] == pytest.approx(rows[name]["rating"] + half, abs=1e-3)


def test_bradley_terry_unplayed_and_disconnected() -> None:
    """a-b and c-d never meet each other; "idle" never plays. The virtual ties join every pair of
    players with games, so the fit is finite and unique; idle stays at 1000 with no interval.
    The mean of the fitted ratings is 1000; winners rate above their losers; order of games does
    not matter (unlike online Elo)."""
    outcomes = _games("a", "b", 5, 0, 0) + _games("c", "d", 3, 0, 1)
    models = ["a", "b", "c", "d", "idle"]
    rows = _by_model(bradley_terry(outcomes, models=models))
    assert rows["idle"] == {"model": "idle", "rating": ELO_INIT, "ci_low": None, "ci_high": None, "games": 0}
    fitted = [rows[m] for m in "abcd"]
    for row in fitted:
        assert math.isfinite(row["rating"]) and row["ci_low"] < row["rating"] < row["ci_high"]
    assert sum(row["rating"] for row in fitted) / 4 == pytest.approx(ELO_INIT, abs=1e-9)
    assert rows["a"]["rating"] > rows["c"]["rating"] > rows["d"]["rating"] > rows["b"]["rating"]
    shuffled = list(outcomes)
    random.Random(0).shuffle(shuffled)
    again = _by_model(bradley_terry(shuffled, models=models))
    for m in models:
        assert again[m]["rating"] == pytest.approx(rows[m]["rating"], abs=1e-9)
    # No games at all: everyone unrated.
    assert [r["ci_low"] for r in bradley_terry([], models=["p", "q", "r"])] == [None, None, None]


def test_bradley_terry_intervals_shrink_with_votes() -> None:
    """The same 3:1 record among three players at 1x, 4x, 16x and 64x the games: the intervals
    narrow every time, roughly halving per 4x once the prior no longer matters."""
    widths = []
    for scale in (1, 4, 16, 64):
        outcomes = _games("a", "b", 3 * scale, scale, 0) + _games("b", "c", 3 * scale, scale, 0)
        outcomes += _games("a", "c", 3 * scale, scale, 0)
        row = _by_model(bradley_terry(outcomes))["a"]
        widths.append(row["ci_high"] - row["ci_low"])
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4
    assert widths[3] / widths[2] == pytest.approx(0.5, abs=0.03)


def _simulate(strengths: dict[str, float], games: int, seed: int) -> list[tuple[str, str, float]]:
    """Decisive games between uniformly drawn pairs, A winning with the Bradley-Terry probability."""
    rng = random.Random(seed)
    names = list(strengths)
    outcomes = []
    for _ in range(games):
        a, b = rng.sample(names, 2)
        p_a = 1.0 / (1.0 + 10.0 ** (-(strengths[a] - strengths[b]) / 400.0))
        outcomes.append((a, b, 1.0 if rng.random() < p_a else 0.0))
    return outcomes


STRENGTHS = {"m1": 1150.0, "m2": 1050.0, "m3": 1000.0, "m4": 950.0, "m5": 850.0}  # mean 1000


def test_bradley_terry_recovers_a_simulated_arena() -> None:
    """20,000 seeded games among five players of known strength (mean 1000, the anchor): the
    ranking is recovered, every estimate is within 15 points and within 1.7 half-widths (a 99.9%
    interval) of the truth, and at least 4 of the 5 nominal 95% intervals hold the true rating (with
    this seed m4's lower bound is 950.49 against a true 950)."""
    rows = bradley_terry(_simulate(STRENGTHS, 20000, seed=0))
    assert [row["model"] for row in rows] == list(STRENGTHS)
    covered = 0
    for row in rows:
        true = STRENGTHS[row["model"]]
        half = row["ci_high"] - row["rating"]
        assert half < 10.0  # about 7 points at this size
        assert abs(row["rating"] - true) < min(15.0, 1.7 * half)
        covered += row["ci_low"] <= true <= row["ci_high"]
    assert covered >= 4


def test_bradley_terry_interval_coverage() -> None:
    """Coverage sanity: 40 seeded arenas of 1,000 games each, 200 intervals in all; the nominal
    95% intervals must cover the true rating at least 90% of the time (192 of 200 with these seeds)."""
    covered = 0
    for seed in range(40):
        for row in bradley_terry(_simulate(STRENGTHS, 1000, seed=seed)):
            covered += row["ci_low"] <= STRENGTHS[row["model"]] <= row["ci_high"]
    assert covered >= 180


def test_bradley_terry_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="itself"):
        bradley_terry([("a", "a", 1.0)])
    with pytest.raises(ValueError, match="score_a"):
        bradley_terry([("a", "b", 1.5)])
    with pytest.raises(ValueError, match="not in models"):
        bradley_terry([("a", "c", 1.0)], models=["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        bradley_terry([], models=["a", "a"])
    with pytest.raises(ValueError, match="max_iter"):
        bradley_terry([], max_iter=0)
