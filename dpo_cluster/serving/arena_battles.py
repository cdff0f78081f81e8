"""One battle of the blind A/B arena: its record, its errors, its checks, and the rows it exports as.

A battle is one prompt answered by two of the served models (every pair equally likely), shown to
a voter as answers "A" and "B" in a random order; which model is which stays server side until
the vote. A chat battle may go on for more turns before the vote: each follow-up user message is
shared, and each side answers it from its own conversation (the shared user messages and that
side's own earlier answers). A vote judges the whole conversation, naming the better side ("A",
"B", "tie", or "both_bad"), and can be cast once per battle. The export rows live beside the
record, not in the store, because they are the contract with the next round's data pipeline
(`dpo_cluster.data.formats`) and FastChat's rating scripts, whatever holds the battles.
"""

from __future__ import annotations

import json
import random
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

WINNERS: tuple[str, ...] = ("A", "B", "tie", "both_bad")
SIDES: tuple[str, str] = ("A", "B")
# A queued battle's "models" are labels of two answers someone posted (a preference round's
# candidates, `POST /v1/arena/queue`), spelled with this prefix so that the leaderboard, which
# rates served models, leaves them out.
QUEUED_PREFIX = "queued:"

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


class TurnRefused(RuntimeError):
    """The battle cannot take this turn: it began with a text prompt (only a chat goes on), or
    another request recorded this turn first."""

    def __init__(self, battle_id: str, reason: str) -> None:
        super().__init__(f"arena battle {battle_id!r} takes no turn here: {reason}")
        self.battle_id = battle_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[TurnRefused], tuple[str, str]]:
        # As AlreadyVoted: rebuild from the fields, not from the formatted message.
        return (TurnRefused, (self.battle_id, self.reason))


@dataclass(frozen=True)
class Turn:
    """A follow-up of a chat battle: the user's next message and each side's answer to it."""

    content: str  # the user's message, shared by both sides
    answers: dict[str, str]  # {"A": text, "B": text}
    created_at: float  # unix seconds


@dataclass(frozen=True)
class Battle:
    """One prompt, both models' answers under the blind labels A and B, the follow-up turns, and
    the vote if cast. `answers` are the first turn's; `followups` the turns after it, in order."""

    id: str  # uuid4 hex
    created_at: float  # unix seconds
    prompt: str | None  # raw text prompt, or None when messages were given
    messages: list[dict[str, str]] | None  # chat messages [{"role", "content"}], or None
    answers: dict[str, str]  # {"A": text, "B": text}
    models: dict[str, str]  # {"A": model name, "B": model name}; not for the voter's eyes before the vote
    params: dict[str, Any]  # sampling parameters used (JSON-able)
    winner: str | None = None  # one of WINNERS once voted
    voted_at: float | None = None
    followups: tuple[Turn, ...] = ()

    @property
    def turn_count(self) -> int:
        """User turns answered so far: the first prompt and every follow-up."""
        return 1 + len(self.followups)

    def context(self) -> list[dict[str, str]]:
        """The messages the first answers reply to; a text prompt reads as one user message."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def continuation(self, side: str) -> list[dict[str, str]]:
        """What follows the context on `side`: its first answer, then each follow-up message and
        that side's answer to it (assistant, user, assistant, ...)."""
        messages = [{"role": "assistant", "content": self.answers[side]}]
        for turn in self.followups:
            messages.append({"role": "user", "content": turn.content})
            messages.append({"role": "assistant", "content": turn.answers[side]})
        return messages

    def said_nothing(self, side: str) -> bool:
        """Whether every answer `side` gave is empty or whitespace (a model can stop at once)."""
        return all(not m["content"].strip() for m in self.continuation(side) if m["role"] == "assistant")

    def conversation(self, side: str) -> list[dict[str, str]]:
        """`side`'s whole conversation, the one its model continues and the voter judges."""
        return [*self.context(), *self.continuation(side)]


def new_battle_id() -> str:
    """A fresh battle id (uuid4 hex): unguessable, so nobody votes on battles not shown to them."""
    return uuid.uuid4().hex


def draw_pair(models: Iterable[str], rng: random.Random | None = None) -> list[str]:
    """Two of the served models for a battle, every pair equally likely (with only two, both).

    Drawn from `rng`, by default the OS's secure source, as `draw_sides` is. Raises ValueError
    for fewer than two distinct names.
    """
    names = sorted(set(models))
    if len(names) < 2:
        raise ValueError(f"models: a battle needs two models, got {names!r}")
    return (rng or secrets.SystemRandom()).sample(names, 2)


def draw_sides(models: Iterable[str], rng: random.Random | None = None) -> dict[str, str]:
    """Which of the two models sits on side A and which on B: {"A": name, "B": name}.

    Drawn from `rng`, by default the OS's secure source, so a voter cannot predict the order;
    pass a seeded `random.Random` in tests. The names are sorted first, so the order depends on
    the draw alone, not on the caller's order, and a seeded rng reproduces the same assignment.
    Raises ValueError unless exactly two distinct names are given.
    """
    names = sorted(set(models))
    if len(names) != 2:
        raise ValueError(f"models: expected exactly two distinct model names, got {names!r}")
    first, second = names
    draw = (rng or secrets.SystemRandom()).random()
    return {"A": first, "B": second} if draw < 0.5 else {"A": second, "B": first}


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


def check_sides(sides: dict[str, str], answers_by_model: dict[str, str]) -> None:
    """Raise ValueError unless `sides` puts the two answering models on A and B, one each."""
    if (
        not isinstance(sides, dict)
        or set(sides) != set(SIDES)
        or sorted(sides.values()) != sorted(answers_by_model)
    ):
        raise ValueError(
            f"sides: expected {{'A': model, 'B': model}} over {sorted(answers_by_model)}, got {sides!r}"
        )


def check_followup(content: str, answers: dict[str, str]) -> None:
    """Raise ValueError naming the argument at fault for a malformed follow-up turn."""
    if not isinstance(content, str) or not content.strip():
        raise ValueError("content: the follow-up message must be a non-empty string")
    if not isinstance(answers, dict) or set(answers) != set(SIDES):
        raise ValueError(f"answers: expected {{'A': text, 'B': text}}, got {answers!r}")
    for side, answer in answers.items():
        if not isinstance(answer, str):
            raise ValueError(f"answers[{side!r}]: expected a string, got {type(answer).__name__}")


def check_can_continue(battle: Battle) -> None:
    """Raise AlreadyVoted for a voted battle and TurnRefused for a text battle: neither goes on."""
    if battle.winner is not None:
        raise AlreadyVoted(battle.id, battle.winner)
    if battle.messages is None:
        raise TurnRefused(
            battle.id, "it began with a text prompt; only a chat battle (messages) takes follow-up turns"
        )


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

    A chat battle gives a row in TRL's conversational format: {"prompt": the messages before the
    first answer, "chosen": the winner's whole continuation, "rejected": the loser's}, where a
    continuation is [assistant] for one turn and [assistant, user, assistant, ...] for more (the
    vote judged the whole conversation, so the whole of it is the preference). A text battle
    gives a standard row {"prompt": str, "chosen": str, "rejected": str}. Both carry "battle_id",
    "chosen_model", "rejected_model" and "voted_at", which the data pipeline ignores.
    """
    assert battle.winner in SIDES and battle.voted_at is not None
    loser = "B" if battle.winner == "A" else "A"
    row: dict[str, Any]
    if battle.messages is not None:
        row = {
            "prompt": battle.context(),
            "chosen": battle.continuation(battle.winner),
            "rejected": battle.continuation(loser),
        }
    else:
        row = {
            "prompt": battle.prompt,
            "chosen": battle.answers[battle.winner],
            "rejected": battle.answers[loser],
        }
    row.update(
        battle_id=battle.id,
        chosen_model=battle.models[battle.winner],
        rejected_model=battle.models[loser],
        voted_at=battle.voted_at,
    )
    return row


def build_kto_rows(battle: Battle) -> list[dict[str, Any]]:
    """The unpaired rows of a vote (TRL's unpaired preference format, for KTO).

    A decisive vote gives the winner's continuation as a desirable row (label true) and the
    loser's as an undesirable one (label false), except that a winner that said nothing gives no
    row (an empty desirable completion is a defect the pipeline drops). "both_bad" says something
    about each answer on its own, so it gives two undesirable rows; "tie" only says neither was
    better, nothing about either alone, so it gives none. Rows: {"prompt", "completion", "label"},
    conversational for a chat battle (the messages before the first answer; that side's whole
    continuation), strings for a text one, plus "battle_id", "model" and "voted_at".
    """
    assert battle.winner in WINNERS and battle.voted_at is not None
    if battle.winner == "tie":
        return []
    labels = {side: side == battle.winner for side in SIDES}
    rows = []
    for side in SIDES:
        if labels[side] and battle.said_nothing(side):
            continue
        if battle.messages is not None:
            prompt: Any = battle.context()
            completion: Any = battle.continuation(side)
        else:
            prompt, completion = battle.prompt, battle.answers[side]
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "label": labels[side],
                "battle_id": battle.id,
                "model": battle.models[side],
                "voted_at": battle.voted_at,
            }
        )
    return rows


def build_fastchat_row(battle: Battle) -> dict[str, Any]:
    """A voted battle as a row of FastChat's Chatbot Arena battle log.

    {"question_id", "model_a", "model_b", "winner" ("model_a" | "model_b" | "tie" |
    "tie (bothbad)"), "judge": "arena", "turn", "anony": True, "tstamp": vote time,
    "conversation_a", "conversation_b"}; a conversation is that side's whole conversation (a text
    prompt becomes one user message), every turn included. "turn" counts its user messages, so it
    is 1 for a single-turn battle with one user message.
    """
    assert battle.winner is not None
    conversation_a, conversation_b = battle.conversation("A"), battle.conversation("B")
    turns = max(1, sum(1 for m in conversation_a if m["role"] == "user"))
    return {
        "question_id": battle.id,
        "model_a": battle.models["A"],
        "model_b": battle.models["B"],
        "winner": FASTCHAT_WINNERS[battle.winner],
        "judge": "arena",
        "turn": turns,
        "anony": True,
        "tstamp": battle.voted_at,
        "conversation_a": conversation_a,
        "conversation_b": conversation_b,
    }
