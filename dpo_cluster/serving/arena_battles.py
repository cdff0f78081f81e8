"""One battle of the blind A/B arena: its record, its errors, its checks, and the rows it exports as.

A battle is one prompt answered by both models, shown to a voter as answers "A" and "B" in a random
order; which model is which stays server side until the vote. A vote names the better answer
("A", "B", "tie", or "both_bad") and can be cast once per battle. The export rows live beside the
record, not in the store, because they are the contract with the next round's data pipeline
(`dpo_cluster.data.formats`) and FastChat's rating scripts, whatever holds the battles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

WINNERS: tuple[str, ...] = ("A", "B", "tie", "both_bad")

# FastChat's battle-log spelling of each verdict.
FASTCHAT_WINNERS: dict[str, str] = {
    "A": "model_a",
    "B": "model_b",
    "tie": "tie",
    "both_bad": "tie (bothbad)",
}


class BattleNotFound(KeyError):
    """No battle with this id in the store."""

    def __init__(self, battle_id: str) -> None:
        super().__init__(battle_id)
        self.battle_id = battle_id

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its argument, which reads badly in an error response.
        return f"no arena battle with id {self.battle_id!r}"


class AlreadyVoted(RuntimeError):
    """The battle already has a vote; the first one stands."""

    def __init__(self, battle_id: str, winner: str) -> None:
        super().__init__(f"arena battle {battle_id!r} has already been voted on (winner: {winner!r})")
        self.battle_id = battle_id
        self.winner = winner

    def __reduce__(self) -> tuple[type[AlreadyVoted], tuple[str, str]]:
        # Exceptions pickle as cls(*args); args holds only the message here, so rebuild from the
        # fields instead (Ray ships exceptions between processes by pickling them).
        return (AlreadyVoted, (self.battle_id, self.winner))


@dataclass(frozen=True)
class Battle:
    """One prompt, both models' answers under the blind labels A and B, and the vote if cast."""

    id: str  # uuid4 hex
    created_at: float  # unix seconds
    prompt: str | None  # raw text prompt, or None when messages were given
    messages: list[dict[str, str]] | None  # chat messages [{"role", "content"}], or None
    answers: dict[str, str]  # {"A": text, "B": text}
    models: dict[str, str]  # {"A": model name, "B": model name}; not for the voter's eyes before the vote
    params: dict[str, Any]  # sampling parameters used (JSON-able)
    winner: str | None = None  # one of WINNERS once voted
    voted_at: float | None = None


def check_new_battle(
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    answers_by_model: dict[str, str],
    params: dict[str, Any],
) -> str:
    """Raise ValueError naming the argument at fault for a malformed battle; the params as JSON.

    Exactly one of `prompt` / `messages` must be given, `answers_by_model` must map exactly two
    model names to answer strings, and `params` must be a JSON-able dict without NaN or Infinity.
    """
    _check_prompt(prompt, messages)
    if not isinstance(answers_by_model, dict) or len(answers_by_model) != 2:
        raise ValueError(
            "answers_by_model: expected exactly two models, got "
            f"{list(answers_by_model) if isinstance(answers_by_model, dict) else answers_by_model!r}"
        )
    for model, answer in answers_by_model.items():
        if not isinstance(model, str) or not model:
            raise ValueError(f"answers_by_model: model names must be non-empty strings, got {model!r}")
        if not isinstance(answer, str):
            raise ValueError(f"answers_by_model[{model!r}]: expected a string, got {type(answer).__name__}")
    if not isinstance(params, dict):
        raise ValueError(f"params: expected a dict, got {type(params).__name__}")
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and exports must be readable by any parser.
        return json.dumps(params, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params: not JSON-serialisable: {exc}") from exc


def _check_prompt(prompt: str | None, messages: list[dict[str, str]] | None) -> None:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text) or messages (a chat)")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role', 'content'} messages")
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or set(message) != {"role", "content"}
                or not isinstance(message["role"], str)
                or not isinstance(message["content"], str)
            ):
                raise ValueError(
                    f"messages[{i}]: expected {{'role': str, 'content': str}} and nothing else, "
                    f"got {message!r}"
                )


def build_dpo_row(battle: Battle) -> dict[str, Any]:
    """The preference pair of a decisive vote (winner "A" or "B").

    A chat battle gives a conversational row {"prompt": messages, "chosen": [assistant message],
    "rejected": [assistant message]}; a text battle a standard row {"prompt": str, "chosen": str,
    "rejected": str}. Both carry "battle_id", "chosen_model", "rejected_model" and "voted_at",
    which the data pipeline ignores.
    """
    assert battle.winner in ("A", "B") and battle.voted_at is not None
    loser = "B" if battle.winner == "A" else "A"
    chosen, rejected = battle.answers[battle.winner], battle.answers[loser]
    row: dict[str, Any]
    if battle.messages is not None:
        row = {
            "prompt": battle.messages,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    else:
        row = {"prompt": battle.prompt, "chosen": chosen, "rejected": rejected}
    row.update(
        battle_id=battle.id,
        chosen_model=battle.models[battle.winner],
        rejected_model=battle.models[loser],
        voted_at=battle.voted_at,
    )
    return row


def build_fastchat_row(battle: Battle) -> dict[str, Any]:
    """A voted battle as a row of FastChat's Chatbot Arena battle log.

    {"question_id", "model_a", "model_b", "winner" ("model_a" | "model_b" | "tie" |
    "tie (bothbad)"), "judge": "arena", "turn", "anony": True, "tstamp": vote time,
    "conversation_a", "conversation_b"}; a conversation is the chat messages (a text prompt
    becomes one user message) followed by that side's answer. "turn" counts the user messages,
    so it is 1 for every single-turn battle.
    """
    assert battle.winner is not None
    context = battle.messages if battle.messages is not None else [{"role": "user", "content": battle.prompt}]
    turns = max(1, sum(1 for m in context if m.get("role") == "user"))
    return {
        "question_id": battle.id,
        "model_a": battle.models["A"],
        "model_b": battle.models["B"],
        "winner": FASTCHAT_WINNERS[battle.winner],
        "judge": "arena",
        "turn": turns,
        "anony": True,
        "tstamp": battle.voted_at,
        "conversation_a": [*context, {"role": "assistant", "content": battle.answers["A"]}],
        "conversation_b": [*context, {"role": "assistant", "content": battle.answers["B"]}],
    }
