"""Small-sample statistics for pairwise comparisons: win rates with confidence intervals and ratings.

Shared by the serving arena's leaderboard and by model evaluation, so both report the same numbers
for the same counts:

- `wilson_interval` / `rate_with_ci`: a binomial proportion with its Wilson score interval, which
  (unlike the normal approximation) stays inside [0, 1] and is usable at 0/n and n/n.
- `bradley_terry_two`: Bradley-Terry ratings of two players on the Elo scale, as Chatbot Arena's
  `compute_mle_elo` computes them, in closed form, with a 95% interval on the rating difference.
- `online_elo`: FastChat's sequential `compute_online_elo`.

Pure math: no I/O, standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# The two-sided 95% normal quantile, Phi^-1(0.975).
Z95 = 1.959963984540054

# The Elo scale Chatbot Arena reports on: a difference of SCALE points means odds of BASE to 1.
ELO_SCALE = 400.0
ELO_BASE = 10.0
ELO_INIT = 1000.0

# Probabilities are clamped into [P_CLAMP, 1 - P_CLAMP] before the logit so that a proportion of
# exactly 0 or 1 (e.g. the Wilson bound of an empty sample) maps to a large finite rating gap rather
# than to an infinity that JSON cannot carry.
P_CLAMP = 1e-6


def _wilson(successes: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval on (possibly fractional) counts; n > 0 and 0 <= successes <= n.

    center = (p + z^2/(2n)) / (1 + z^2/n)
    half   = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n)
    """
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    low = max(0.0, center - half)
    high = min(1.0, center + half)
    # At 0/n (n/n) the lower (upper) bound is exactly 0 (1) in exact arithmetic; rounding would
    # otherwise leave something like 1e-17 there.
    if successes == 0:
        low = 0.0
    if successes == n:
        high = 1.0
    return low, high


def _check_count(name: str, value: Any) -> None:
    # bool is an int subclass; True as a count is almost certainly a caller bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a binomial proportion successes / n.

    With n == 0 nothing is known and the interval is the whole range (0.0, 1.0).
    Raises ValueError unless 0 <= successes <= n are ints and z is positive and finite.
    """
    _check_count("successes", successes)
    _check_count("n", n)
    if successes > n:
        raise ValueError(f"successes ({successes}) must not exceed n ({n})")
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
        raise ValueError(f"z: expected a positive finite number, got {z!r}")
    if n == 0:
        return 0.0, 1.0
    return _wilson(float(successes), float(n), float(z))


def rate_with_ci(successes: int, n: int) -> dict[str, Any]:
    """A proportion with its 95% Wilson interval, as a JSON-able dict.

    {"successes", "n", "rate" (None when n == 0), "ci_low", "ci_high", "method": "wilson"}.
    """
    low, high = wilson_interval(successes, n)
    return {
        "successes": successes,
        "n": n,
        "rate": successes / n if n else None,
        "ci_low": low,
        "ci_high": high,
        "method": "wilson",
    }


def _elo_diff(p: float) -> float:
    """Rating difference (A minus B) at which A beats B with probability p, p clamped."""
    p = min(max(p, P_CLAMP), 1.0 - P_CLAMP)
    return ELO_SCALE * math.log(p / (1.0 - p), ELO_BASE)


def bradley_terry_two(wins_a: int, wins_b: int, ties: int) -> tuple[float, float, float, float]:
    """Bradley-Terry maximum-likelihood ratings of two players on the Elo scale, with a 95% interval.

    Returns (rating_a, rating_b, diff_low, diff_high), where diff = rating_a - rating_b and
    (diff_low, diff_high) is the 95% interval of diff.

    Model: P(A beats B) = 1 / (1 + BASE^(-(r_a - r_b)/SCALE)) with SCALE=400, BASE=10, as Chatbot
    Arena's `compute_mle_elo`, which counts a tie as half a win for each side (it duplicates tie
    rows, one won by each side, at half the weight of a decisive game). For two players the
    likelihood depends on the difference only and its maximum is closed-form: with p the share of
    points A scored, diff = SCALE * log_BASE(p / (1 - p)).

    Prior: one virtual tie is added, i.e. p = (wins_a + ties/2 + 0.5) / (n + 1) with
    n = wins_a + wins_b + ties. Without it a 10-0 record would give an infinite difference; with it
    ratings are always finite, shrink towards equal by one game's worth, and no games at all give
    p = 1/2, equal ratings. Chatbot Arena fits without a prior, so on the same counts our
    difference is slightly smaller in magnitude.

    Ratings are centred on 1000: rating_a = 1000 + diff/2, rating_b = 1000 - diff/2 (the
    unpenalised fit Chatbot Arena runs is symmetric in the two players, so it centres them too).

    Interval: the Wilson 95% interval of p, computed on the same smoothed (fractional) counts,
    mapped through the same logit; both bounds are clamped into [1e-6, 1 - 1e-6] first so they
    stay finite. A player's own rating interval is rating_a in [1000 + diff_low/2, 1000 + diff_high/2]
    and rating_b in [1000 - diff_high/2, 1000 - diff_low/2].
    """
    _check_count("wins_a", wins_a)
    _check_count("wins_b", wins_b)
    _check_count("ties", ties)
    n = wins_a + wins_b + ties
    points_a = wins_a + ties / 2.0 + 0.5
    games = n + 1.0
    diff = _elo_diff(points_a / games)
    p_low, p_high = _wilson(points_a, games, Z95)
    diff_low, diff_high = _elo_diff(p_low), _elo_diff(p_high)
    return ELO_INIT + diff / 2.0, ELO_INIT - diff / 2.0, diff_low, diff_high


def online_elo(
    outcomes: Iterable[tuple[str, str, float]],
    k: float = 4,
    scale: float = ELO_SCALE,
    base: float = ELO_BASE,
    init: float = ELO_INIT,
) -> dict[str, float]:
    """Sequential Elo ratings, FastChat's `compute_online_elo`.

    For each (model_a, model_b, score_a) in order, score_a being 1 (A won), 0 (B won) or 0.5 (tie):
        ea = 1 / (1 + base^((rb - ra) / scale))
        ra += k * (score_a - ea)
        rb += k * (1 - score_a - (1 - ea))
    Both updates use the ratings from before the game. Unlike the Bradley-Terry fit the result
    depends on the order of the games. Returns {model: rating} in order of first appearance.
    """
    ratings: dict[str, float] = {}
    for i, (model_a, model_b, score_a) in enumerate(outcomes):
        if model_a == model_b:
            raise ValueError(f"outcome {i}: a model cannot play itself ({model_a!r})")
        if not (isinstance(score_a, (int, float)) and 0.0 <= score_a <= 1.0):
            raise ValueError(f"outcome {i}: score_a must be a number in [0, 1], got {score_a!r}")
        ra = ratings.setdefault(model_a, float(init))
        rb = ratings.setdefault(model_b, float(init))
        ea = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        ratings[model_a] = ra + k * (score_a - ea)
        ratings[model_b] = rb + k * (1.0 - score_a - (1.0 - ea))
    return ratings
