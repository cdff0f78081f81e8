"""Durable store of the blind A/B arena between two served models: battles, votes, leaderboard, exports.

A battle is one prompt answered by both models, shown to a voter as answers "A" and "B" in a random
order; which model is which stays server side until the vote. A vote names the better answer
("A", "B", "tie", or "both_bad") and can be cast once per battle.

Storage is one SQLite file shared by every web replica on a node:
- WAL journal, so readers (leaderboard, exports) never block a writer and vice versa;
- `synchronous=FULL`, so a committed vote is on disk before `vote()` returns;
- a busy timeout, so concurrent writers from several processes queue instead of failing;
- one short-lived connection per operation, so the store is safe to share between threads and
  processes and no connection outlives a call;
- "one vote per battle" is a UNIQUE constraint checked inside a `BEGIN IMMEDIATE` transaction, so
  of two processes racing to vote on the same battle exactly one succeeds.
WAL needs shared memory between the processes using the file: keep it on a local disk, not NFS.

Exports turn the votes into the next round's data: `export_dpo` yields preference pairs in the
layouts this project's data pipeline reads (`dpo_cluster.data.formats`), `export_fastchat` yields
Chatbot Arena battle-log rows for FastChat's rating scripts.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_cluster import stats

WINNERS: tuple[str, ...] = ("A", "B", "tie", "both_bad")

# FastChat's battle-log spelling of each verdict.
FASTCHAT_WINNERS: dict[str, str] = {
    "A": "model_a",
    "B": "model_b",
    "tie": "tie",
    "both_bad": "tie (bothbad)",
}

# Model names that get the conventional orientation (tuned vs base) in the leaderboard.
BASE_MODEL = "base"
TUNED_MODEL = "tuned"

RATING_METHOD = (
    "Bradley-Terry MLE on the Elo scale (400, base 10), ties as half wins, one virtual tie as prior; "
    "95% CI from the Wilson interval"
)
ONLINE_ELO_K = 4.0

SCHEMA_VERSION = 1
# How long an operation waits for another process's write lock before failing with
# "database is locked". Writes are single small rows, so waiting this long means something is wrong.
BUSY_TIMEOUT_S = 30.0
# Exports read this many votes per connection, so no read transaction stays open while the
# caller consumes rows (an open reader would keep the WAL from being checkpointed).
EXPORT_PAGE = 100

_SCHEMA = """
CREATE TABLE battles (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    prompt TEXT,
    messages TEXT,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    params TEXT NOT NULL,
    CHECK ((prompt IS NULL) <> (messages IS NULL)),
    CHECK (model_a <> model_b)
);
CREATE TABLE votes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    battle_id TEXT NOT NULL UNIQUE REFERENCES battles(id),
    winner TEXT NOT NULL CHECK (winner IN ('A', 'B', 'tie', 'both_bad')),
    voted_at REAL NOT NULL
);
"""

_BATTLE_COLUMNS = (
    "b.id, b.created_at, b.prompt, b.messages, b.model_a, b.model_b, b.answer_a, b.answer_b, b.params"
)


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


class ArenaStore:
    """The arena's SQLite file. Every method opens, uses and closes its own connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    # -----------------------------------------------------------------------------------------
    # Writes

    def create_battle(
        self,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        answers_by_model: dict[str, str],
        params: dict[str, Any],
        rng: random.Random | None = None,
    ) -> Battle:
        """Record a new battle and return it; committed before return.

        Exactly one of `prompt` / `messages` must be given, and `answers_by_model` must name exactly
        two models. Which model becomes "A" is drawn from `rng`, by default the OS's secure source
        (a voter must not be able to predict the order); pass a seeded `random.Random` in tests.
        Raises ValueError for malformed arguments.
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
                raise ValueError(
                    f"answers_by_model[{model!r}]: expected a string, got {type(answer).__name__}"
                )
        if not isinstance(params, dict):
            raise ValueError(f"params: expected a dict, got {type(params).__name__}")
        try:
            # allow_nan=False: NaN/Infinity are not JSON, and exports must be readable by any parser.
            params_json = json.dumps(params, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"params: not JSON-serialisable: {exc}") from exc
        # Sorting first makes the order depend on the draw alone, not on the caller's dict order,
        # so a seeded rng reproduces the same assignment.
        first, second = sorted(answers_by_model)
        draw = (rng or secrets.SystemRandom()).random()
        model_a, model_b = (first, second) if draw < 0.5 else (second, first)
        clean_messages = None if messages is None else [dict(m) for m in messages]
        battle = Battle(
            id=uuid.uuid4().hex,
            created_at=time.time(),
            prompt=prompt,
            messages=clean_messages,
            answers={"A": answers_by_model[model_a], "B": answers_by_model[model_b]},
            models={"A": model_a, "B": model_b},
            params=json.loads(params_json),
        )
        with self._transaction("IMMEDIATE") as conn:
            conn.execute(
                "INSERT INTO battles (id, created_at, prompt, messages, model_a, model_b, answer_a, "
                "answer_b, params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    battle.id,
                    battle.created_at,
                    prompt,
                    None if clean_messages is None else json.dumps(clean_messages, ensure_ascii=False),
                    model_a,
                    model_b,
                    battle.answers["A"],
                    battle.answers["B"],
                    params_json,
                ),
            )
        return battle

    def vote(self, battle_id: str, winner: str) -> Battle:
        """Record the vote on a battle and return the battle with `winner` set; durable on return.

        Raises ValueError for a winner not in WINNERS, BattleNotFound for an unknown id, and
        AlreadyVoted (naming the recorded winner) when the battle has a vote already, including one
        cast a moment earlier by another process: the UNIQUE battle_id of the votes table decides,
        under the write lock BEGIN IMMEDIATE takes, so two racing voters cannot both succeed.
        """
        if winner not in WINNERS:
            raise ValueError(f"winner: expected one of {', '.join(WINNERS)}, got {winner!r}")
        voted_at = time.time()
        with self._transaction("IMMEDIATE") as conn:
            row = conn.execute(
                f"SELECT {_BATTLE_COLUMNS} FROM battles b WHERE b.id = ?", (battle_id,)
            ).fetchone()
            if row is None:
                raise BattleNotFound(battle_id)
            try:
                conn.execute(
                    "INSERT INTO votes (battle_id, winner, voted_at) VALUES (?, ?, ?)",
                    (battle_id, winner, voted_at),
                )
            except sqlite3.IntegrityError as exc:
                recorded = conn.execute(
                    "SELECT winner FROM votes WHERE battle_id = ?", (battle_id,)
                ).fetchone()
                if recorded is None:  # some other constraint failed: not a double vote
                    raise
                raise AlreadyVoted(battle_id, recorded[0]) from exc
        return _battle_from_row((*row, winner, voted_at))

    # -----------------------------------------------------------------------------------------
    # Reads

    def get_battle(self, battle_id: str) -> Battle:
        """The battle with this id, with its vote if cast; BattleNotFound otherwise."""
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_BATTLE_COLUMNS}, v.winner, v.voted_at FROM battles b "
                "LEFT JOIN votes v ON v.battle_id = b.id WHERE b.id = ?",
                (battle_id,),
            ).fetchone()
        if row is None:
            raise BattleNotFound(battle_id)
        return _battle_from_row(row)

    def counts(self) -> dict[str, int]:
        """{"battles": battles created, "votes": votes cast}."""
        with self._transaction("DEFERRED") as conn:
            return self._counts(conn)

    def leaderboard(self) -> dict[str, Any]:
        """Vote counts, win rate and ratings of the two models, computed from all votes.

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
        with self._transaction("DEFERRED") as conn:
            totals = self._counts(conn)
            names = [
                r[0] for r in conn.execute("SELECT model_a FROM battles UNION SELECT model_b FROM battles")
            ]
            votes = conn.execute(
                "SELECT b.model_a, b.model_b, v.winner FROM votes v JOIN battles b ON b.id = v.battle_id "
                "ORDER BY v.seq"
            ).fetchall()
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
        rating_s, rating_o, diff_low, diff_high = stats.bradley_terry_two(
            wins[subject], wins[opponent], n_ties
        )
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
        elo = stats.online_elo(outcomes, k=ONLINE_ELO_K)
        return {
            "battles": totals["battles"],
            "votes": totals["votes"],
            "subject": subject,
            "opponent": opponent,
            "counts": {subject: wins[subject], opponent: wins[opponent], **ties},
            f"{subject}_win_rate": stats.rate_with_ci(wins[subject], wins[subject] + wins[opponent]),
            f"{subject}_win_rate_ties_half": (wins[subject] + 0.5 * n_ties) / n_votes if n_votes else None,
            "ratings": ratings,
            "rating_method": RATING_METHOD,
            "online_elo": {name: elo.get(name, stats.ELO_INIT) for name in (subject, opponent)},
        }

    def export_dpo(self) -> Iterator[dict[str, Any]]:
        """One preference pair per decisive vote (A or B), in vote order; ties and both_bad are skipped.

        A chat battle gives a conversational row {"prompt": messages, "chosen": [assistant message],
        "rejected": [assistant message]}; a text battle a standard row {"prompt": str, "chosen": str,
        "rejected": str}. Both carry "battle_id", "chosen_model", "rejected_model" and "voted_at",
        which the data pipeline ignores. The pipeline detects one format per file, so an arena that
        mixed chat and text battles should be exported into two files (split on the prompt's type).
        """
        for battle in self._voted_battles(decisive_only=True):
            assert battle.winner is not None and battle.voted_at is not None
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
            yield row

    def export_fastchat(self) -> Iterator[dict[str, Any]]:
        """Every vote as a row of FastChat's Chatbot Arena battle log, in vote order.

        {"question_id", "model_a", "model_b", "winner" ("model_a" | "model_b" | "tie" |
        "tie (bothbad)"), "judge": "arena", "turn", "anony": True, "tstamp": vote time,
        "conversation_a", "conversation_b"}; a conversation is the chat messages (a text prompt
        becomes one user message) followed by that side's answer. "turn" counts the user messages,
        so it is 1 for every single-turn battle.
        """
        for battle in self._voted_battles(decisive_only=False):
            assert battle.winner is not None
            context = (
                battle.messages
                if battle.messages is not None
                else [{"role": "user", "content": battle.prompt}]
            )
            turns = max(1, sum(1 for m in context if m.get("role") == "user"))
            yield {
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

    # -----------------------------------------------------------------------------------------
    # Internals

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: the sqlite3 module must not open transactions behind our back; every
        # transaction here is an explicit BEGIN so its lock mode is ours to choose. The timeout is
        # SQLite's busy timeout.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            # Per-connection settings (not stored in the file), so set on every connection.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN <mode>: committed on normal exit, rolled back on any exception.

        IMMEDIATE takes the write lock up front, so a read-then-write cannot be interleaved with
        another writer; DEFERRED gives readers one consistent snapshot across several SELECTs.
        """
        with self._connect() as conn:
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                # SQLite may already have rolled back on some errors (e.g. disk full).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._connect() as conn:
            # The journal mode is stored in the file, so this is a no-op once any process set it.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(
                    f"{self.path}: SQLite refused WAL journal mode (got {mode!r}); "
                    "the arena store needs a local filesystem"
                )
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return  # the common case: no write lock needed
            # Several replicas may start at once on a fresh file: the write lock serialises them and
            # the version is re-read under it, so the schema is created exactly once.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    # One statement at a time: executescript() would COMMIT first and so run
                    # outside the write lock taken above.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path}: arena store schema version {version}, this code reads version "
                        f"{SCHEMA_VERSION}; use a matching dpo-cluster version or a new store path"
                    )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _counts(conn: sqlite3.Connection) -> dict[str, int]:
        battles = conn.execute("SELECT COUNT(*) FROM battles").fetchone()[0]
        votes = conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        return {"battles": battles, "votes": votes}

    def _voted_battles(self, *, decisive_only: bool) -> Iterator[Battle]:
        """Voted battles in vote order, read a page per connection (keyset pagination on seq)."""
        condition = "AND v.winner IN ('A', 'B')" if decisive_only else ""
        last_seq = 0
        while True:
            with self._connect() as conn:
                rows = conn.execute(
                    f"SELECT {_BATTLE_COLUMNS}, v.winner, v.voted_at, v.seq FROM votes v "
                    f"JOIN battles b ON b.id = v.battle_id WHERE v.seq > ? {condition} "
                    "ORDER BY v.seq LIMIT ?",
                    (last_seq, EXPORT_PAGE),
                ).fetchall()
            for row in rows:
                yield _battle_from_row(row[:-1])
            if len(rows) < EXPORT_PAGE:
                return
            last_seq = rows[-1][-1]


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


def _orientation(names: list[str]) -> tuple[str, str]:
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


def _battle_from_row(row: tuple[Any, ...]) -> Battle:
    (
        battle_id,
        created_at,
        prompt,
        messages,
        model_a,
        model_b,
        answer_a,
        answer_b,
        params,
        winner,
        voted_at,
    ) = row
    return Battle(
        id=battle_id,
        created_at=created_at,
        prompt=prompt,
        messages=None if messages is None else json.loads(messages),
        answers={"A": answer_a, "B": answer_b},
        models={"A": model_a, "B": model_b},
        params=json.loads(params),
        winner=winner,
        voted_at=voted_at,
    )
