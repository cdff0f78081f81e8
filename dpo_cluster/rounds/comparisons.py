"""What a round's judge decides about two candidates of one prompt, and the judges that score
candidates one at a time (a rule, a reward model) turned into those decisions.

A comparison names its two candidates by sample index; `winner` is one of them, or None for a tie
with the tie's reason, so the round's report can say why every undecided pair was undecided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

from dpo_cluster.config import Config
from dpo_cluster.evaluation.judges import Prompt

# Why a comparison decided nothing.
EQUAL_SCORES = "equal_scores"  # rule or reward model: both pass / both fail / the same score
ORDERS_DISAGREE = "orders_disagree"  # llm_judge: each order preferred the answer shown first (or second)
JUDGE_NAMED_NEITHER = "judge_named_neither"  # llm_judge: a reply that names neither A nor B
VOTED_TIE = "voted_tie"  # arena: the voter said tie
VOTED_BOTH_BAD = "voted_both_bad"  # arena: the voter said both are bad
NO_VOTE_BY_DEADLINE = "no_vote_by_deadline"  # arena: nobody voted before rounds.arena_deadline_s


@dataclass(frozen=True)
class Comparison:
    """The judge's decision on candidates `first` and `second` (sample indices) of a prompt."""

    prompt_index: int
    first: int
    second: int
    winner: int | None  # first or second; None is a tie
    tie_reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # scores, the judge's replies, the vote

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def candidate_pairs(samples_by_prompt: dict[int, list[int]]) -> list[tuple[int, int, int]]:
    """Every unordered pair of each prompt's kept candidates: [(prompt_index, first, second)]."""
    return [
        (index, first, second)
        for index, samples in sorted(samples_by_prompt.items())
        for first, second in combinations(sorted(samples), 2)
    ]


def compare_by_scores(
    pairs: Sequence[tuple[int, int, int]], scores: dict[tuple[int, int], float]
) -> list[Comparison]:
    """Each pair decided by its candidates' scores ({(prompt_index, sample): score}): the higher
    wins, equal scores tie."""
    decided = []
    for index, first, second in pairs:
        a, b = scores[(index, first)], scores[(index, second)]
        winner = first if a > b else second if b > a else None
        decided.append(
            Comparison(
                index, first, second, winner, None if winner is not None else EQUAL_SCORES, {"scores": [a, b]}
            )
        )
    return decided


def score_candidates(
    config: Config, prompts: Sequence[Prompt], texts: dict[tuple[int, int], str]
) -> dict[tuple[int, int], float]:
    """Each candidate's score under rounds.judge rule (1.0 passes, 0.0 fails; evaluation.rule or
    evaluation.pattern) or reward_model (evaluation.reward_model's scalar)."""
    from dpo_cluster.evaluation.judges import RewardModelJudge, build_rule

    ev, keys = config.evaluation, list(texts)
    if config.rounds.judge == "rule":
        passes, _ = build_rule(ev.rule, ev.pattern, ev.pattern_must_match)
        return {key: float(passes(texts[key])) for key in keys}
    assert ev.reward_model is not None  # checked when the rounds start
    judge = RewardModelJudge(
        ev.reward_model,
        device=ev.device,
        dtype=ev.dtype,
        batch_size=ev.batch_size,
        trust_remote_code=config.model.trust_remote_code,
    )
    values = judge.score([prompts[index] for index, _ in keys], [texts[key] for key in keys])
    return dict(zip(keys, (float(v) for v in values), strict=True))
