"""Small-sample statistics for pairwise comparisons: win rates with confidence intervals and ratings.

Shared by the serving arena's leaderboard and by model evaluation, so both report the same numbers
for the same counts:

- `wilson_interval` / `rate_with_ci`: a binomial proportion with its Wilson score interval, which
  (unlike the normal approximation) stays inside [0, 1] and is usable at 0/n and n/n.
- `bradley_terry_two`: Bradley-Terry ratings of two players on the Elo scale, as Chatbot Arena's
  `compute_mle_elo` computes them, in closed form, with a 95% interval on the rating difference.
- `bradley_terry`: the same model for any number of players, fitted by Newton's method, with 95%
  intervals from the observed Fisher information; equal to `bradley_terry_two` for two players.
- `online_elo`: FastChat's sequential `compute_online_elo`.

Pure math: no I/O, standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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


# Newton's method on the Bradley-Terry log-likelihood: at most this many iterations, stopping once
# no rating moves by more than BT_TOL Elo points. The objective is strictly concave (see
# `bradley_terry`), so a handful of iterations reach the tolerance; the cap only guards the loop.
BT_MAX_ITER = 100
BT_TOL = 1e-9


def bradley_terry(
    outcomes: Iterable[tuple[str, str, float]],
    models: Sequence[str] | None = None,
    max_iter: int = BT_MAX_ITER,
    tol: float = BT_TOL,
) -> list[dict[str, Any]]:
    """Bradley-Terry maximum-likelihood ratings of any number of players on the Elo scale, with 95%
    intervals.

    outcomes: (model_a, model_b, score_a) games, score_a being 1 (A won), 0 (B won) or 0.5 (a tie;
    any score in [0, 1] counts as that share of a win). models: every player to report, in order,
    including players without games; by default the players of `outcomes` in order of first
    appearance. An outcome naming a player outside `models` is a ValueError.

    Returns one dict per player, highest rating first (players of equal rating in `models` order):
    {"model", "rating", "ci_low", "ci_high", "games"}, games being the player's real games.

    Model (as Chatbot Arena's `compute_mle_elo`): P(i beats j) = 1 / (1 + BASE^(-(r_i - r_j)/SCALE)),
    SCALE=400, BASE=10, a tie counted as half a win for each side. With theta = r * ln(BASE)/SCALE
    and s_ij the points i scored against j out of n_ij games, the log-likelihood is
        L(theta) = sum over pairs i<j of s_ij log sigma(theta_i - theta_j) + s_ji log sigma(theta_j - theta_i).

    Prior: among the M players that have at least one game, every pair gets a virtual tie of weight
    1 / (M - 1) (half a point to each side), so each such player carries one virtual game in all,
    spread evenly over the others. For M = 2 that is the single virtual tie of `bradley_terry_two`,
    which therefore gives the same ratings. The virtual ties connect every pair, so the fit is
    well-posed even when the real comparison graph is disconnected or a player won every game
    (Hunter 2004, "MM algorithms for generalized Bradley-Terry models", Assumption 1: the MLE exists
    and is unique up to a shift); players of different components are pulled towards each other by
    the prior only. Players without games are not fitted: rating ELO_INIT, ci_low = ci_high = None
    (JSON null; nothing is known about them).

    Anchoring: the ratings are shifted so that the mean rating of the fitted players is ELO_INIT
    (the likelihood only sees differences). For two players that is `bradley_terry_two`'s centring,
    1000 +- diff/2; with the unfitted players at ELO_INIT, the mean over `models` is ELO_INIT too.

    Fit: Newton's method with backtracking (step halving until L does not decrease) on the
    sum-zero subspace, from equal ratings, until no rating moves by more than `tol` Elo points
    (RuntimeError after `max_iter` iterations). L is strictly concave on that subspace, so Newton
    converges quadratically where Hunter's MM algorithm converges only linearly; both find the same
    maximum.

    Interval: from the observed Fisher information I = -Hessian of L (prior included) at the
    maximum. Under the sum-zero anchoring the covariance of theta is the pseudo-inverse of I,
    computed as (I + J/M)^-1 - J/M (J the all-ones matrix: I's null space is the constant vector);
    the map to the Elo scale is linear, so rating_i +- 1.96 * sqrt(cov_ii) * SCALE / ln(BASE).
    This is the Wald interval of a rating relative to the mean of the field. Chosen over FastChat's
    bootstrap because it is deterministic (the served leaderboard reads the same on every request)
    and costs one matrix inverse instead of hundreds of refits per request; for two players
    `bradley_terry_two`'s Wilson interval is the better small-sample choice and is what the
    two-model leaderboard reports.
    """
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected a positive finite number, got {tol!r}")
    order: list[str] = list(dict.fromkeys(models)) if models is not None else []
    if models is not None and len(order) != len(models):
        raise ValueError("models: names must be distinct")
    index = {name: i for i, name in enumerate(order)}
    # points[(i, j)] with i < j: [points of i, points of j, games] against each other.
    pairs: dict[tuple[int, int], list[float]] = {}
    games = [0] * len(order)
    for k, (model_a, model_b, score_a) in enumerate(outcomes):
        if model_a == model_b:
            raise ValueError(f"outcome {k}: a model cannot play itself ({model_a!r})")
        if isinstance(score_a, bool) or not (isinstance(score_a, (int, float)) and 0.0 <= score_a <= 1.0):
            raise ValueError(f"outcome {k}: score_a must be a number in [0, 1], got {score_a!r}")
        for name in (model_a, model_b):
            if name not in index:
                if models is not None:
                    raise ValueError(f"outcome {k}: model {name!r} is not in models")
                index[name] = len(order)
                order.append(name)
                games.append(0)
        a, b = index[model_a], index[model_b]
        games[a] += 1
        games[b] += 1
        key, points = ((a, b), (score_a, 1.0 - score_a)) if a < b else ((b, a), (1.0 - score_a, score_a))
        cell = pairs.setdefault(key, [0.0, 0.0, 0.0])
        cell[0] += points[0]
        cell[1] += points[1]
        cell[2] += 1.0

    played = [i for i in range(len(order)) if games[i] > 0]
    rows = [
        {"model": name, "rating": ELO_INIT, "ci_low": None, "ci_high": None, "games": 0} for name in order
    ]
    if len(played) >= 2:
        to_elo = ELO_SCALE / math.log(ELO_BASE)
        theta, cov = _fit_bradley_terry(played, pairs, max_iter, tol / to_elo)
        for slot, i in enumerate(played):
            half = Z95 * math.sqrt(max(cov[slot][slot], 0.0)) * to_elo
            rating = ELO_INIT + theta[slot] * to_elo
            rows[i].update(rating=rating, ci_low=rating - half, ci_high=rating + half, games=games[i])
    # Stable sort: equal ratings keep the order of `models`.
    rows.sort(key=lambda row: row["rating"], reverse=True)
    return rows


def _fit_bradley_terry(
    played: list[int], pairs: dict[tuple[int, int], list[float]], max_iter: int, tol: float
) -> tuple[list[float], list[list[float]]]:
    """Newton's method for `bradley_terry` on the natural scale: (theta, covariance) of the players
    `played` (indices into the pair table), theta summing to zero; tol in natural units."""
    m = len(played)
    prior = 1.0 / (m - 1)
    # (slot_i, slot_j, points of i, points of j, games) over every pair of fitted players, the
    # virtual tie included: every pair has games > 0, which is what makes L strictly concave.
    table: list[tuple[int, int, float, float, float]] = []
    for si in range(m):
        for sj in range(si + 1, m):
            s_i, s_j, n = pairs.get((played[si], played[sj]), (0.0, 0.0, 0.0))
            table.append((si, sj, s_i + prior / 2.0, s_j + prior / 2.0, n + prior))
    theta = [0.0] * m
    loglik = _bt_loglik(theta, table)
    for _ in range(max_iter):
        grad, info = _bt_grad_info(theta, table)
        # Newton step on the sum-zero subspace: (I + J/m) step = grad. grad sums to zero and I has
        # the constant vector as its null space, so the step sums to zero too (theta stays anchored).
        step = _mat_vec(_inverse([[v + 1.0 / m for v in row] for row in info]), grad)
        # Backtracking keeps every iteration an ascent step, which makes Newton globally
        # convergent on a concave objective; near the optimum the full step is always taken.
        size = 1.0
        trial = [t + d for t, d in zip(theta, step)]
        trial_loglik = _bt_loglik(trial, table)
        while trial_loglik < loglik and size > 1e-10:
            size /= 2.0
            trial = [t + size * d for t, d in zip(theta, step)]
            trial_loglik = _bt_loglik(trial, table)
        if trial_loglik < loglik:
            # No step improves L in floating point: theta is the maximum to rounding.
            break
        theta, loglik = trial, trial_loglik
        if max(abs(size * d) for d in step) <= tol:
            break
    else:
        raise RuntimeError(f"Bradley-Terry fit did not converge in {max_iter} iterations")
    _, info = _bt_grad_info(theta, table)
    inv = _inverse([[v + 1.0 / m for v in row] for row in info])
    cov = [[v - 1.0 / m for v in row] for row in inv]
    # Remove the rounding drift of the mean so the anchoring is exact.
    mean = sum(theta) / m
    return [t - mean for t in theta], cov


def _log_sigmoid(x: float) -> float:
    """log(1 / (1 + exp(-x))) without overflow for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _bt_loglik(theta: list[float], table: list[tuple[int, int, float, float, float]]) -> float:
    return sum(
        s_i * _log_sigmoid(theta[i] - theta[j]) + s_j * _log_sigmoid(theta[j] - theta[i])
        for i, j, s_i, s_j, _ in table
    )


def _bt_grad_info(
    theta: list[float], table: list[tuple[int, int, float, float, float]]
) -> tuple[list[float], list[list[float]]]:
    """Gradient of L and the observed information -d2L, for p_ij = sigma(theta_i - theta_j):
    dL/dtheta_i = sum_j (s_ij - n_ij p_ij); I_ii = sum_j n_ij p_ij p_ji, I_ij = -n_ij p_ij p_ji."""
    m = len(theta)
    grad = [0.0] * m
    info = [[0.0] * m for _ in range(m)]
    for i, j, s_i, _, n in table:
        p = _sigmoid(theta[i] - theta[j])
        g = s_i - n * p
        grad[i] += g
        grad[j] -= g
        w = n * p * (1.0 - p)
        info[i][i] += w
        info[j][j] += w
        info[i][j] -= w
        info[j][i] -= w
    return grad, info


def _mat_vec(a: list[list[float]], x: list[float]) -> list[float]:
    return [sum(v * w for v, w in zip(row, x)) for row in a]


def _inverse(a: list[list[float]]) -> list[list[float]]:
    """Inverse of a small non-singular matrix, Gauss-Jordan elimination with partial pivoting."""
    n = len(a)
    work = [list(row) + [1.0 if i == j else 0.0 for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(work[r][col]))
        if work[pivot][col] == 0.0:
            raise ValueError("singular matrix")
        work[col], work[pivot] = work[pivot], work[col]
        scale = work[col][col]
        work[col] = [v / scale for v in work[col]]
        for r in range(n):
            if r != col and work[r][col] != 0.0:
                f = work[r][col]
                work[r] = [v - f * w for v, w in zip(work[r], work[col])]
    return [row[n:] for row in work]
