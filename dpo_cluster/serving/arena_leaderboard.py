"""The arena's leaderboard: counts, win rates and ratings of its models, computed from the votes.

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
# More than two models: the same model and the same prior spread over all pairs (`stats.bradley_terry`).
RATING_METHOD_MULTI = (
    "Bradley-Terry MLE on the Elo scale (400, base 10), ties as half wins, one virtual game per model "
    "as prior (a tie of weight 1/(M-1) per pair), mean rating 1000; 95% CI from the observed Fisher "
    "information"
)
ONLINE_ELO_K = 4.0


def compute_leaderboard(
    totals: dict[str, int], names: Iterable[str], votes: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """The leaderboard of `votes`, (model_a, model_b, winner) rows in the order they were cast.

    totals: {"battles", "votes"} counts; names: every model name the battles used (models of
    the votes are added if missing). Tie and both_bad both count as a tie in ratings, as Chatbot
    Arena does. Keys:

    - models: the models, in leaderboard order: [subject, opponent] for two models, otherwise
      alphabetical with "base" last.
    - subject, opponent: with two models, "tuned" vs "base" when so named, otherwise the
      alphabetically first model vs the second (with no battle yet, "tuned" and "base"). With more
      models, "tuned" vs "base" when both are present, otherwise both None.
    - <subject>_win_rate: Wilson interval over the decisive votes between subject and opponent
      (ties and both_bad left out); <subject>_win_rate_ties_half: (wins + (tie + both_bad) / 2) /
      votes between the two, None without such votes. Absent when subject is None.
    - counts: wins of each model, and tie, both_bad over all votes.
    - ratings: one row per model, highest rating first: {"model", "rating", "ci_low", "ci_high",
      "wins", "losses", "ties", "battles"}, battles being the model's voted battles (wins + losses
      + ties). Two models: `stats.bradley_terry_two` (Wilson interval), as `RATING_METHOD` says.
      More: `stats.bradley_terry` (Fisher-information interval; a model without votes rates 1000
      with ci_low = ci_high = None), as `RATING_METHOD_MULTI` says. rating_method names the one used.
    - online_elo: FastChat's sequential Elo (K=4) of every model over the votes in the order cast.
    - pairwise: one row per pair of models that met in a vote, {"models": [x, y], "wins": {x, y},
      "tie", "both_bad", "votes"}, x and y in `models` order.
    - vs_base: when "base" is among the models, {model: win rate against base} for every other
      model: `stats.rate_with_ci` over their decisive votes against each other, plus "votes" and
      "win_rate_ties_half" as above; {} without a base model.
    """
    found = list(dict.fromkeys([*names, *(m for a, b, _ in votes for m in (a, b))]))
    models = _model_order(found)
    subject, opponent = _orientation(models)
    wins = dict.fromkeys(models, 0)
    ties = {"tie": 0, "both_bad": 0}
    # pair_counts[(x, y)] with x before y in `models`: [wins of x, wins of y, tie, both_bad].
    pair_counts: dict[tuple[str, str], list[int]] = {}
    rank = {name: i for i, name in enumerate(models)}
    outcomes: list[tuple[str, str, float]] = []
    for model_a, model_b, winner in votes:
        pair = (model_a, model_b) if rank[model_a] < rank[model_b] else (model_b, model_a)
        cell = pair_counts.setdefault(pair, [0, 0, 0, 0])
        if winner in ("A", "B"):
            won = model_a if winner == "A" else model_b
            wins[won] += 1
            cell[0 if won == pair[0] else 1] += 1
            outcomes.append((model_a, model_b, 1.0 if winner == "A" else 0.0))
        else:
            ties[winner] += 1
            cell[2 if winner == "tie" else 3] += 1
            outcomes.append((model_a, model_b, 0.5))
    pairwise = [
        {
            "models": [x, y],
            "wins": {x: cell[0], y: cell[1]},
            "tie": cell[2],
            "both_bad": cell[3],
            "votes": sum(cell),
        }
        for (x, y), cell in sorted(pair_counts.items(), key=lambda item: (rank[item[0][0]], rank[item[0][1]]))
    ]
    elo = stats.online_elo(outcomes, k=ONLINE_ELO_K)
    board: dict[str, Any] = {
        "battles": totals["battles"],
        "votes": totals["votes"],
        "models": models,
        "subject": subject,
        "opponent": opponent,
    }
    if subject is not None and opponent is not None:
        head = _head_to_head(pair_counts, subject, opponent)
        board[f"{subject}_win_rate"] = head["win_rate"]
        board[f"{subject}_win_rate_ties_half"] = head["win_rate_ties_half"]
    board["counts"] = {**wins, **ties}
    if len(models) == 2:
        board["ratings"] = _ratings_two(subject, opponent, pair_counts)
        board["rating_method"] = RATING_METHOD
    else:
        board["ratings"] = _ratings_multi(models, outcomes, pair_counts)
        board["rating_method"] = RATING_METHOD_MULTI
    board["online_elo"] = {name: elo.get(name, stats.ELO_INIT) for name in models}
    board["pairwise"] = pairwise
    board["vs_base"] = {}
    if BASE_MODEL in models:
        for name in models:
            if name != BASE_MODEL:
                head = _head_to_head(pair_counts, name, BASE_MODEL)
                board["vs_base"][name] = {
                    **head["win_rate"],
                    "votes": head["votes"],
                    "win_rate_ties_half": head["win_rate_ties_half"],
                }
    return board


def _head_to_head(pair_counts: dict[tuple[str, str], list[int]], model: str, other: str) -> dict[str, Any]:
    """`model`'s record against `other`: {"wins", "losses", "ties", "votes", "win_rate" (Wilson over
    decisive votes), "win_rate_ties_half" (None without votes)}; ties include both_bad."""
    if (model, other) in pair_counts:
        won, lost, tie, both_bad = pair_counts[(model, other)]
    else:
        lost, won, tie, both_bad = pair_counts.get((other, model), [0, 0, 0, 0])
    n_ties = tie + both_bad
    n = won + lost + n_ties
    return {
        "wins": won,
        "losses": lost,
        "ties": n_ties,
        "votes": n,
        "win_rate": stats.rate_with_ci(won, won + lost),
        "win_rate_ties_half": (won + 0.5 * n_ties) / n if n else None,
    }


def _ratings_two(
    subject: str | None, opponent: str | None, pair_counts: dict[tuple[str, str], list[int]]
) -> list[dict[str, Any]]:
    """Both models' Bradley-Terry ratings with 95% Wilson intervals, highest first."""
    assert subject is not None and opponent is not None  # always set for two models
    head = _head_to_head(pair_counts, subject, opponent)
    won, lost, n_ties = head["wins"], head["losses"], head["ties"]
    rating_s, rating_o, diff_low, diff_high = stats.bradley_terry_two(won, lost, n_ties)
    ratings = [
        {
            "model": subject,
            "rating": rating_s,
            "ci_low": stats.ELO_INIT + diff_low / 2.0,
            "ci_high": stats.ELO_INIT + diff_high / 2.0,
            "wins": won,
            "losses": lost,
            "ties": n_ties,
            "battles": head["votes"],
        },
        {
            "model": opponent,
            "rating": rating_o,
            "ci_low": stats.ELO_INIT - diff_high / 2.0,
            "ci_high": stats.ELO_INIT - diff_low / 2.0,
            "wins": lost,
            "losses": won,
            "ties": n_ties,
            "battles": head["votes"],
        },
    ]
    # Stable sort: with equal ratings (no votes yet) the subject stays first.
    ratings.sort(key=lambda r: r["rating"], reverse=True)
    return ratings


def _ratings_multi(
    models: list[str], outcomes: list[tuple[str, str, float]], pair_counts: dict[tuple[str, str], list[int]]
) -> list[dict[str, Any]]:
    """Every model's Bradley-Terry rating with its 95% interval (`stats.bradley_terry`), highest
    first, with its record over all its votes."""
    record = {name: [0, 0, 0] for name in models}  # wins, losses, ties
    for (x, y), (wins_x, wins_y, tie, both_bad) in pair_counts.items():
        record[x][0] += wins_x
        record[x][1] += wins_y
        record[y][0] += wins_y
        record[y][1] += wins_x
        record[x][2] += tie + both_bad
        record[y][2] += tie + both_bad
    ratings = []
    for row in stats.bradley_terry(outcomes, models=models):
        won, lost, n_ties = record[row["model"]]
        ratings.append(
            {
                "model": row["model"],
                "rating": row["rating"],
                "ci_low": row["ci_low"],
                "ci_high": row["ci_high"],
                "wins": won,
                "losses": lost,
                "ties": n_ties,
                "battles": won + lost + n_ties,
            }
        )
    return ratings


def _model_order(found: list[str]) -> list[str]:
    """The leaderboard's model order: the two-model orientation, else alphabetical with base last
    (the reference the others are read against)."""
    if len(found) <= 2:
        return list(_two_model_orientation(found))
    return sorted(found, key=lambda name: (name == BASE_MODEL, name))


def _two_model_orientation(found: list[str]) -> tuple[str, str]:
    """(subject, opponent) for at most two model names: tuned vs base by convention, else
    alphabetical; "tuned" and "base" before any battle."""
    if set(found) <= {BASE_MODEL, TUNED_MODEL}:
        return TUNED_MODEL, BASE_MODEL
    if len(found) == 1:  # a battle always has two models; a lone name is read against base
        return found[0], BASE_MODEL
    first, second = sorted(found)
    return first, second


def _orientation(models: list[str]) -> tuple[str | None, str | None]:
    """(subject, opponent) of the leaderboard: the two models, or tuned vs base among more."""
    if len(models) == 2:
        return models[0], models[1]
    if TUNED_MODEL in models and BASE_MODEL in models:
        return TUNED_MODEL, BASE_MODEL
    return None, None
