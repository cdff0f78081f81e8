"""The arena's leaderboard: counts, win rate and ratings of its two models, computed from the votes.

Pure arithmetic over vote rows (no database), so the store reads everything in one snapshot and
the numbers can be checked by hand; the statistics themselves are `dpo_cluster.stats`, shared with
model evaluation so both report the same figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from dpo_cluster import stats

# Model names that get the conventional orientation (tuned vs base) in the leaderboard.
BASE_MODEL = "base"
TUNED_MODEL = "tuned"

RATING_METHOD = (
    "Bradley-Terry MLE on the Elo scale (400, base 10), ties as half wins, one virtual tie as prior; "
    "95% CI from the Wilson interval"
)
ONLINE_ELO_K = 4.0


def compute_leaderboard(
    totals: dict[str, int], names: Iterable[str], votes: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """The leaderboard of `votes`, (model_a, model_b, winner) rows in the order they were cast.

    totals: {"battles", "votes"} counts; names: every model name the battles used.
    Orientation: when the models are named "base" and "tuned" the statistics are tuned vs base;
    otherwise the alphabetically first model vs the second. Keys "<model>_win_rate" and
    "<model>_win_rate_ties_half" are named after that first model ("subject"; the other is
    "opponent"). With no battle yet the names default to "tuned" and "base".

    - counts: wins of each model, ties, both_bad.
    - <subject>_win_rate: Wilson interval over decisive votes (ties and both_bad left out).
    - <subject>_win_rate_ties_half: (wins + (tie + both_bad) / 2) / votes, None without votes.
    - ratings: Bradley-Terry ratings with 95% intervals (`stats.bradley_terry_two`), tie and
      both_bad both counted as ties as Chatbot Arena does; highest rating first.
    - online_elo: FastChat's sequential Elo (K=4) over the votes in the order they were cast.
    Raises RuntimeError when the battles involve more than two models.
    """
    subject, opponent = _orientation(names)
    wins = {subject: 0, opponent: 0}
    ties = {"tie": 0, "both_bad": 0}
    outcomes: list[tuple[str, str, float]] = []
    for model_a, model_b, winner in votes:
        if winner == "A":
            wins[model_a] += 1
            outcomes.append((model_a, model_b, 1.0))
        elif winner == "B":
            wins[model_b] += 1
            outcomes.append((model_a, model_b, 0.0))
        else:
            ties[winner] += 1
            outcomes.append((model_a, model_b, 0.5))
    n_votes = len(votes)
    n_ties = ties["tie"] + ties["both_bad"]
    elo = stats.online_elo(outcomes, k=ONLINE_ELO_K)
    return {
        "battles": totals["battles"],
        "votes": totals["votes"],
        "subject": subject,
        "opponent": opponent,
        "counts": {subject: wins[subject], opponent: wins[opponent], **ties},
        f"{subject}_win_rate": stats.rate_with_ci(wins[subject], wins[subject] + wins[opponent]),
        f"{subject}_win_rate_ties_half": (wins[subject] + 0.5 * n_ties) / n_votes if n_votes else None,
        "ratings": _ratings(subject, opponent, wins, n_ties),
        "rating_method": RATING_METHOD,
        "online_elo": {name: elo.get(name, stats.ELO_INIT) for name in (subject, opponent)},
    }


def _ratings(subject: str, opponent: str, wins: dict[str, int], n_ties: int) -> list[dict[str, Any]]:
    """Both models' Bradley-Terry ratings with 95% intervals, highest first."""
    rating_s, rating_o, diff_low, diff_high = stats.bradley_terry_two(wins[subject], wins[opponent], n_ties)
    ratings = [
        {
            "model": subject,
            "rating": rating_s,
            "ci_low": stats.ELO_INIT + diff_low / 2.0,
            "ci_high": stats.ELO_INIT + diff_high / 2.0,
            "wins": wins[subject],
            "losses": wins[opponent],
            "ties": n_ties,
        },
        {
            "model": opponent,
            "rating": rating_o,
            "ci_low": stats.ELO_INIT - diff_high / 2.0,
            "ci_high": stats.ELO_INIT - diff_low / 2.0,
            "wins": wins[opponent],
            "losses": wins[subject],
            "ties": n_ties,
        },
    ]
    # Stable sort: with equal ratings (no votes yet) the subject stays first.
    ratings.sort(key=lambda r: r["rating"], reverse=True)
    return ratings


def _orientation(names: Iterable[str]) -> tuple[str, str]:
    """(subject, opponent) of the leaderboard for the model names the battles used."""
    found = set(names)
    if len(found) > 2:
        raise RuntimeError(
            f"the arena store holds battles of {len(found)} models ({', '.join(sorted(found))}); "
            "the leaderboard compares two: use one store per pair of models"
        )
    if found <= {BASE_MODEL, TUNED_MODEL}:
        return TUNED_MODEL, BASE_MODEL
    first, second = sorted(found)
    return first, second
