"""Judges of base-vs-tuned answers (a rule, a reward model, or the arena's votes), and the
statistics of their verdicts. Every rate carries a 95% Wilson interval (`dpo_cluster.stats`) and
win rates leave ties out, as the arena's leaderboard does, so both report the same numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpo_cluster import stats
from dpo_cluster.data.samples import is_good_title, is_plain_title
from dpo_cluster.paths import looks_local

Prompt = str | list[dict[str, Any]]
"""A text prompt, or a chat as a list of {"role", "content"} messages."""

# Named rules: name -> whether an answer passes.
RULES: dict[str, Callable[[str], bool]] = {
    "title_length": is_good_title,
    "plain_title": is_plain_title,
}

TUNED, BASE, TIE = "tuned", "base", "tie"


def build_rule(
    rule: str | None, pattern: str | None, pattern_must_match: bool = True
) -> tuple[Callable[[str], bool], dict[str, Any]]:
    """The pass check of the rule judge and a JSON-able description of it.

    Exactly one of `rule` (a key of RULES) and `pattern` (a Python regular expression, searched
    anywhere in the answer with re.search) must be given; with a pattern, an answer passes when
    the pattern is found (pattern_must_match) or when it is not found (not pattern_must_match).
    Raises ValueError otherwise.
    """
    if (rule is None) == (pattern is None):
        raise ValueError("give exactly one of rule and pattern")
    if rule is not None:
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
        return RULES[rule], {"rule": rule}
    assert pattern is not None
    compiled = re.compile(pattern)

    def passes(answer: str) -> bool:
        return (compiled.search(answer) is not None) == pattern_must_match

    return passes, {"pattern": pattern, "pattern_must_match": pattern_must_match}


def verdict(tuned_better: bool, base_better: bool) -> str:
    """ "tuned", "base" or "tie" for one prompt."""
    if tuned_better and not base_better:
        return TUNED
    if base_better and not tuned_better:
        return BASE
    return TIE


def newcombe_difference_interval(successes_1: int, n_1: int, successes_2: int, n_2: int) -> dict[str, Any]:
    """The difference of two proportions p1 - p2 with its 95% hybrid score interval.

    Newcombe (1998), "Interval estimation for the difference between independent proportions:
    comparison of eleven methods", method 10. With (l1, u1) and (l2, u2) the Wilson 95% intervals
    of p1 = successes_1 / n_1 and p2 = successes_2 / n_2, and d = p1 - p2:

        low  = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)

    Like the Wilson interval it stays inside [-1, 1] and is usable at 0/n and n/n; for 56/70 vs
    48/80 it gives (0.0524, 0.3339), Newcombe's Table II. It treats the two samples as independent.
    Base and tuned answer the same prompts, so their passes are paired and usually positively
    correlated, which makes the true interval narrower: this one is conservative for them.

    Returns {"difference", "ci_low", "ci_high", "method"}, with None for all three when either
    sample is empty.
    """
    method = "newcombe_hybrid_score"
    if n_1 == 0 or n_2 == 0:
        # Check the counts as wilson_interval would, then report "unknown".
        stats.wilson_interval(successes_1, n_1)
        stats.wilson_interval(successes_2, n_2)
        return {"difference": None, "ci_low": None, "ci_high": None, "method": method}
    l1, u1 = stats.wilson_interval(successes_1, n_1)
    l2, u2 = stats.wilson_interval(successes_2, n_2)
    p1, p2 = successes_1 / n_1, successes_2 / n_2
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"difference": d, "ci_low": max(-1.0, low), "ci_high": min(1.0, high), "method": method}


def summarize_passes(base_pass: Sequence[bool], tuned_pass: Sequence[bool]) -> dict[str, Any]:
    """Statistics of the rule judge over N prompts; base_pass[i] / tuned_pass[i]: whether each
    model's answer to prompt i passes.

    pass_rate: per model, passes / N with its Wilson interval. difference: tuned minus base pass
    rate with Newcombe's interval. win_rate: tuned wins / decisive prompts (exactly one passes),
    Wilson interval. counts: tuned_wins, base_wins, ties_both_pass, ties_neither_pass.
    """
    if len(base_pass) != len(tuned_pass):
        raise ValueError(f"{len(base_pass)} base verdicts but {len(tuned_pass)} tuned verdicts")
    n = len(base_pass)
    base_passes = sum(bool(b) for b in base_pass)
    tuned_passes = sum(bool(t) for t in tuned_pass)
    pairs = list(zip(base_pass, tuned_pass))
    tuned_wins = sum(1 for b, t in pairs if t and not b)
    base_wins = sum(1 for b, t in pairs if b and not t)
    return {
        "prompts": n,
        "pass_rate": {
            BASE: stats.rate_with_ci(base_passes, n),
            TUNED: stats.rate_with_ci(tuned_passes, n),
        },
        "difference": newcombe_difference_interval(tuned_passes, n, base_passes, n),
        "win_rate": stats.rate_with_ci(tuned_wins, tuned_wins + base_wins),
        "counts": {
            "tuned_wins": tuned_wins,
            "base_wins": base_wins,
            "ties_both_pass": sum(1 for b, t in pairs if b and t),
            "ties_neither_pass": sum(1 for b, t in pairs if not b and not t),
        },
    }


def summarize_scores(base_scores: Sequence[float], tuned_scores: Sequence[float]) -> dict[str, Any]:
    """Statistics of the reward-model judge over N prompts: mean score per model, the mean of
    tuned - base, and tuned's win rate over decisive prompts (a higher score wins, equal scores
    tie) with its Wilson interval."""
    if len(base_scores) != len(tuned_scores):
        raise ValueError(f"{len(base_scores)} base scores but {len(tuned_scores)} tuned scores")
    n = len(base_scores)
    tuned_wins = sum(1 for b, t in zip(base_scores, tuned_scores) if t > b)
    base_wins = sum(1 for b, t in zip(base_scores, tuned_scores) if b > t)

    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "prompts": n,
        "mean_score": {BASE: mean(base_scores), TUNED: mean(tuned_scores)},
        "mean_score_difference": mean([t - b for b, t in zip(base_scores, tuned_scores)]),
        "win_rate": stats.rate_with_ci(tuned_wins, tuned_wins + base_wins),
        "counts": {"tuned_wins": tuned_wins, "base_wins": base_wins, "ties": n - tuned_wins - base_wins},
    }


class RewardModelJudge:
    """Scores (prompt, answer) pairs with a sequence-classification reward model (num_labels 1).

    The text scored is rendered the way training renders a pair: a chat prompt gets the answer as
    an assistant message and goes through the reward tokenizer's chat template (the project's
    plain template when it has none), encoded without special tokens; a text prompt is followed
    directly by the answer and encoded with the tokenizer's special tokens. Sequences longer than
    the tokenizer's model_max_length are cut by the tokenizer's own truncation.

    Batches are right-padded with the model's pad token, so each row is read at its last real
    token exactly as in an unpadded forward. A model whose config has no pad_token_id takes the
    tokenizer's (as TRL's reward trainer does); with neither, rows are scored one at a time.
    Raises ValueError naming the path when the model cannot be loaded or has num_labels != 1.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpo_cluster.modeling import resolve_name_or_path
        from dpo_cluster.serving.generation import resolve_dtype

        self.name_or_path = name_or_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        path = resolve_name_or_path(name_or_path)
        if looks_local(path) and not Path(path).expanduser().is_dir():
            raise ValueError(f"could not load reward model {name_or_path!r}: no such local directory")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=resolve_dtype(dtype, self.device), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"could not load reward model {name_or_path!r}: {exc}") from exc
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {name_or_path!r}: expected one output (num_labels 1), "
                f"got num_labels {self.model.config.num_labels}"
            )
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            text_config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_token_id: int | None = text_config.pad_token_id
        self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    def encode(self, prompt: Prompt, answer: str) -> list[int]:
        """Token ids of prompt + answer, as the class docstring describes."""
        from dpo_cluster.data.tokenize import chat_template_override

        if isinstance(prompt, str):
            return list(
                self.tokenizer(prompt + answer, add_special_tokens=True, truncation=True)["input_ids"]
            )
        messages = [*prompt, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=chat_template_override(self.tokenizer, None), tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False, truncation=True)["input_ids"])

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        """One float score per (prompt, answer), in order: the model's single logit."""
        import torch

        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        encoded = [tuple(self.encode(p, a)) for p, a in zip(prompts, answers)]
        # Each distinct text is scored once, so identical answers get identical scores (a tie),
        # whatever batch and padding they would otherwise have been scored in.
        ids = list(dict.fromkeys(encoded))
        step = self.batch_size if self.pad_token_id is not None else 1
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                width = max(len(row) for row in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_token_id or 0, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, row in enumerate(chunk):
                    input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                    attention_mask[i, : len(row)] = 1
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                ).logits  # (b, 1)
                scores.extend(logits[:, 0].float().tolist())
        score_of = dict(zip(ids, scores))
        return [score_of[row] for row in encoded]


def summarize_arena(
    db_path: str | Path, max_examples: int = 5
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The arena's verdicts: its leaderboard (tuned vs base when the models are named so) and the
    first voted battles as side-by-side examples. Raises ValueError when the file does not exist
    (reading would otherwise create an empty store)."""
    from dpo_cluster.serving.arena_store import ArenaStore

    path = Path(db_path).expanduser()
    if not path.is_file():
        raise ValueError(f"no arena database at {path} (serve the models and vote in the arena first)")
    store = ArenaStore(path)
    board = store.leaderboard()
    subject = board["subject"]
    if subject is None:
        raise ValueError(
            f"the arena at {path} holds battles of {', '.join(board['models'])} without a tuned vs base "
            "pair to judge; its leaderboard (GET /v1/arena/leaderboard) rates them all"
        )
    summary = {
        "arena_db": str(path),
        "battles": board["battles"],
        "votes": board["votes"],
        "subject": subject,
        "opponent": board["opponent"],
        "counts": board["counts"],
        "win_rate": board[f"{subject}_win_rate"],
        "win_rate_ties_half": board[f"{subject}_win_rate_ties_half"],
        "ratings": board["ratings"],
    }
    examples: list[dict[str, Any]] = []
    for row in store.export_fastchat():  # voted battles, in vote order
        if len(examples) >= max_examples:
            break
        battle = store.get_battle(row["question_id"])
        example: dict[str, Any] = {"prompt": battle.prompt if battle.prompt is not None else battle.messages}
        for label in ("A", "B"):
            example[battle.models[label]] = battle.answers[label]
        assert battle.winner is not None
        example["verdict"] = battle.models[battle.winner] if battle.winner in ("A", "B") else battle.winner
        examples.append(example)
    return summary, examples
